"""Offline against online, row by row: each row of a `multimed score --input COHORT` parquet file
asked again of a running server through the SDK with the same files; prints how many predicted
labels agree and the largest score difference.

    .venv/bin/python bench/score_vs_online.py --cohort cohort --results results.parquet \
        --url 127.0.0.1:8001 [--token-file F]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from multimed.client.sdk import MultiMedClient
from multimed.services.score import item_inputs
from multimed.services.tokens import client_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--token-file")
    args = parser.parse_args()
    rows = [r for r in pq.read_table(args.results).to_pylist() if r["status"] == "OK"]
    equal, worst, started = 0, 0.0, time.perf_counter()
    with MultiMedClient(args.url, token=client_token(args.token_file)) as client:
        for row in rows:
            inputs = {
                raw.modality: raw for raw in item_inputs(args.cohort / row["item"], row["task"])
            }
            answer = client.predict(row["task"], inputs, timeout=120)
            if answer.tokens:
                predicted = [t.label for t in answer.tokens]
                scores = [[s.score for s in t.scores] for t in answer.tokens]
            else:
                predicted, scores = list(answer.predicted), [[s.score for s in answer.scores]]
            equal += row["predicted"] == predicted
            worst = max(worst, float(np.abs(np.array(row["scores"]) - np.array(scores)).max()))
    print(
        f"{len(rows)} OK rows: predicted equal in {equal}/{len(rows)}, largest score difference "
        f"{worst:.2e} ({time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
