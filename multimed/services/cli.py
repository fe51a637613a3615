"""`multimed`: the command-line interface. Heavy imports happen inside each subcommand so that
`multimed catalog` answers at once."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_BUNDLE = Path("artifacts/default-bundle")


def _catalog(args) -> int:
    from multimed.models.catalog import CATALOG

    doc = CATALOG.to_json()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"MultiMed catalog v{doc['catalog_version']}\n\nModalities:")
    for m in doc["modalities"]:
        print(f"  {m['id']:10s} {m['description']}  [{', '.join(m['forms'])}]")
    print("\nTasks:")
    for t in doc["tasks"]:
        req = t["required"]
        needs = " + ".join(
            req["all_of"] + ([f"any of ({', '.join(req['any_of'])})"] if req["any_of"] else [])
        )
        optional = f"; optional {', '.join(t['optional'])}" if t["optional"] else ""
        print(f"  {t['id']:38s} {t['output']:16s} needs {needs}{optional}")
        print(f"  {'':38s} labels: {', '.join(t['labels'])}  metric: {t['metric']}")
    return 0


def _synth(args) -> int:
    from multimed.models.data.files import write_cohort

    written = write_cohort(args.out, args.n, args.seed)
    print(f"wrote {written} patients to {args.out} (labels in {args.out / 'labels.json'})")
    return 0


def _train(args) -> int:
    from multimed.models.config import ModelConfig
    from multimed.models.evaluate import format_table
    from multimed.models.train import TrainSettings, train

    overrides = {
        k: v
        for k, v in (
            ("tasks", args.tasks),
            ("modalities", args.modalities),
            ("patients", args.patients),
            ("epochs", args.epochs),
            ("seed", args.seed),
        )
        if v is not None
    }
    settings = TrainSettings(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    )
    bundle = train(args.out, settings, ModelConfig(fusion=args.fusion, size=args.size))
    print(
        f"bundle {bundle.version} written to {bundle.path} "
        f"({bundle.manifest['training']['seconds']} s)\n"
    )
    print(format_table(bundle.manifest["metrics"]))
    return 0


def _evaluate(args) -> int:
    from multimed.models.evaluate import format_table
    from multimed.models.train import evaluate_bundle

    metrics = evaluate_bundle(args.bundle)
    print(json.dumps(metrics, indent=2) if args.json else format_table(metrics))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimed", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("catalog", help="list modalities and tasks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_catalog)

    p = sub.add_parser("synth", help="write a synthetic cohort as files in real formats")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)

    p = sub.add_parser("train", help="train a multitask bundle on the synthetic cohort")
    p.add_argument("--out", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--tasks", nargs="+")
    p.add_argument("--modalities", nargs="+")
    p.add_argument("--fusion", choices=("late", "early", "attention"), default="attention")
    p.add_argument("--size", choices=("tiny", "base"), default="tiny")
    p.add_argument("--patients", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="evaluate a bundle on its held-out data")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from multimed.models.errors import MultiMedError

    try:
        return args.func(args)
    except MultiMedError as e:
        print(f"multimed {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
