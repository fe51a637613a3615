"""`multimed score`: an archive scored on Ray Data with the bundle and the code that serve
online: each worker holds the encoders' pipelines (`EncoderCore`, as the encoder deployment)
and the router (fusion, heads, checks) in process, so the answers equal the server's.

Output: one parquet file, a row per (item, task) with its answer or its error. Rows are written
in checkpoint parts as they arrive; a run that stops leaves its parts, and the next run keeps
them, skips every item already answered and merges all into the one file at the end."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from multimed.client.files import read_input
from multimed.models.catalog import CATALOG
from multimed.models.cohort.writer import FILES, QUESTION_FILE
from multimed.models.inputs import RawInput
from multimed.services.errors import Status, to_status
from multimed.services.types import PredictCall, PredictResult

log = logging.getLogger("multimed.score")

SCHEMA = pa.schema(
    [
        ("item", pa.string()),
        ("task", pa.string()),
        ("status", pa.string()),  # gRPC status name, as the server would answer
        ("error", pa.string()),  # why, when not OK (names the modality, never quotes input)
        ("predicted", pa.list_(pa.string())),  # top label(s); per token for per-token tasks
        ("scores", pa.list_(pa.list_(pa.float64()))),  # one row, or one per token
        ("labels", pa.list_(pa.string())),  # what each score column is
        ("used", pa.list_(pa.string())),  # modalities the answer used
        ("bundle_version", pa.string()),
    ]
)
# Answers that a new attempt would repeat: the item is done. Anything else (a worker lost, an
# encoder fault) is tried again by the next run.
FINAL = frozenset({Status.OK.name, Status.INVALID_ARGUMENT.name, Status.NOT_FOUND.name})
# No caller waits on a batch offline: an encoder's batch (a few dozen CT series, say) may take
# far longer than the server's 30 s before it counts as stuck.
ENCODE_S = 3600.0


@dataclass(frozen=True)
class ScoreOptions:
    bundle: Path
    tasks: tuple[str, ...]
    source: FolderSource | PacsSource
    out: Path
    ray_address: str | None = None  # None: a local Ray of our own
    batch_size: int = 16  # items per Ray Data batch (and per encoder forward)
    workers: int = 1  # scoring actors
    checkpoint_every: int = 64  # items per checkpoint part
    device: str = "auto"
    progress: bool = True


def item_inputs(folder: Path, task: str) -> tuple[RawInput, ...]:
    """The task's inputs in an item folder: every accepted modality whose file is there, named
    as `multimed synth` names them (xray.dcm, ct/, note.txt, ...); VQA's text is its question."""
    files = {m: folder / name for m, name in FILES.items()}
    if task == "medical_vqa" and (folder / QUESTION_FILE).exists():
        files["text"] = folder / QUESTION_FILE
    spec = CATALOG.task(task)
    return tuple(read_input(m, files[m]) for m in spec.accepted if files[m].exists())


@dataclass(frozen=True)
class FolderSource:
    """`--input DIR`: each subfolder is an item (a `multimed synth` cohort's patients)."""

    root: Path

    def items(self) -> list[str]:
        if not self.root.is_dir():
            raise ValueError(f"--input {self.root}: not a directory")
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def inputs(self, item: str, task: str) -> tuple[RawInput, ...]:
        return item_inputs(self.root / item, task)


class PacsSource:
    """`--pacs NAME --studies FILE`: each listed Study Instance UID is an item, read from a
    PACS of the serve config as PredictStudy reads it (QIDO-RS, the series rules, WADO-RS):
    per modality the first series, in Series Number order, that retrieves as valid DICOM."""

    def __init__(self, name: str, settings, rules: Sequence, studies: Sequence[str]):
        from multimed.services.frontends.hospital.pacs import is_uid

        bad = next((s for s in studies if not is_uid(s)), None)
        if bad is not None:
            raise ValueError(f"--studies: line {studies.index(bad) + 1} is not a DICOM UID")
        self.name, self.settings, self.rules = name, settings, tuple(rules)
        self.studies = list(dict.fromkeys(studies))
        self._read: tuple[str, dict[str, RawInput] | Exception] | None = None  # the last study
        self._pacs = None

    def __getstate__(self) -> dict:  # a worker opens its own PACS session
        return {**self.__dict__, "_read": None, "_pacs": None}

    def items(self) -> list[str]:
        return self.studies

    def inputs(self, item: str, task: str) -> tuple[RawInput, ...]:
        """Each task of a study reuses its one reading, or its one failure (not found, the PACS
        down): the PACS is asked once a study."""
        if self._read is None or self._read[0] != item:
            try:
                self._read = (item, self._series(item))
            except Exception as error:
                self._read = (item, error)
        reads = self._read[1]
        if isinstance(reads, Exception):
            raise reads
        return tuple(reads[m] for m in CATALOG.task(task).accepted if m in reads)

    def _series(self, study: str) -> dict[str, RawInput]:
        from pydicom.errors import InvalidDicomError

        from multimed.services.frontends.hospital.pacs import Pacs, SeriesTooBig, wire_input
        from multimed.services.frontends.hospital.routing import route

        if self._pacs is None:
            self._pacs = Pacs(self.name, self.settings)
        pacs = self._pacs
        reads: dict[str, RawInput] = {}
        for r in (route(s, self.rules) for s in pacs.series(study)):
            if not r.modality or r.modality in reads:
                continue
            try:
                instances = pacs.retrieve(study, r.series)
                if instances:
                    reads[r.modality] = wire_input(r.modality, instances)
            except (SeriesTooBig, InvalidDicomError, ValueError, AttributeError):
                continue  # the next series of that modality, if any
        return reads


def answer_row(item: str, task: str, outcome: PredictResult | BaseException) -> dict:
    if isinstance(outcome, BaseException):
        status, message = to_status(outcome)
        return {"item": item, "task": task, "status": status.name, "error": message}
    p = outcome.prediction
    per_token = bool(p.scores) and isinstance(p.scores[0], list)
    return {
        "item": item,
        "task": task,
        "status": Status.OK.name,
        "predicted": list(p.predicted),
        "scores": [list(s) for s in p.scores] if per_token else [list(p.scores)],
        "labels": list(p.labels),
        "used": list(outcome.used),
        "bundle_version": outcome.bundle_version,
    }


class Scorer:
    """A Ray Data worker: the router with every needed encoder in process (no embedding cache:
    each item is seen once). Called with a batch of item names; returns their rows."""

    def __init__(self, bundle: str, tasks: Sequence[str], source, device: str, batch_size: int):
        import torch

        from multimed.models.bundle import load_bundle
        from multimed.models.modalities.registry import build_pipeline
        from multimed.models.tasks import TaskModels
        from multimed.services.encoder import pick_device
        from multimed.services.encoding import EncoderCore, LocalEncoder
        from multimed.services.router import Router

        torch.set_num_threads(1)  # one scoring worker a core: Ray Data runs several
        loaded = load_bundle(bundle)
        needed = {m for t in tasks for m in CATALOG.task(t).accepted}
        encoders = {}
        for m in sorted(needed):
            pipeline = build_pipeline(m, loaded.config)
            pipeline.setup(pick_device(device), loaded.encoder_state(m))
            encoders[m] = LocalEncoder(EncoderCore(m, pipeline), batch_size)
        task_models = TaskModels(loaded.config)
        task_models.load_state_dict(loaded.tasks_state())
        self.router = Router(
            encoders, task_models, loaded.version, cache_entries=0, encoder_timeout_s=ENCODE_S
        )
        self.tasks = tuple(tasks)
        self.source = source
        self.loop = asyncio.new_event_loop()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict] = []
        calls: list[tuple[str, str, PredictCall]] = []
        for item in batch.column("item").to_pylist():
            for task in self.tasks:
                try:
                    inputs = self.source.inputs(item, task)
                except Exception as error:  # unreadable, not found: this item's, no other's
                    rows.append(answer_row(item, task, error))
                    continue
                calls.append((item, task, PredictCall(f"{item}/{task}", task, inputs)))
        results = self.loop.run_until_complete(self.router.predict_many([c for *_, c in calls]))
        rows += [answer_row(i, t, r) for (i, t, _), r in zip(calls, results, strict=True)]
        return pa.Table.from_pylist(rows, schema=SCHEMA)


class Results:
    """The output file and its checkpoint parts (`OUT.parts/part-NNNNN.parquet`, each written
    whole then renamed into place, so a stopped run leaves only complete parts)."""

    def __init__(self, out: Path):
        self.out = out
        self.parts = out.with_name(out.name + ".parts")
        self.written = len(list(self.parts.glob("part-*.parquet"))) if self.parts.is_dir() else 0

    def previous(self) -> pa.Table:
        tables = [pq.read_table(self.out, schema=SCHEMA)] if self.out.exists() else []
        if self.parts.is_dir():
            parts = sorted(self.parts.glob("part-*.parquet"))
            tables += [pq.read_table(p, schema=SCHEMA) for p in parts]
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()

    def done(self, tasks: Sequence[str]) -> set[str]:
        """Items with a final answer for every task asked (later rows win)."""
        latest: dict[tuple[str, str], str] = {}
        table = self.previous()
        for item, task, status in zip(
            *(table.column(c).to_pylist() for c in ("item", "task", "status")), strict=True
        ):
            latest[(item, task)] = status
        items = {item for item, _ in latest}
        return {i for i in items if all(latest.get((i, t)) in FINAL for t in tasks)}

    def checkpoint(self, rows: list[pa.Table]) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        path = self.parts / f"part-{self.written:05d}.parquet"
        pq.write_table(pa.concat_tables(rows), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        self.written += 1

    def merge(self) -> pa.Table:
        """Everything so far into OUT, one row per (item, task), the latest; parts removed."""
        table = self.previous()
        items, tasks = table.column("item").to_pylist(), table.column("task").to_pylist()
        keys = list(zip(items, tasks, strict=True))
        last = {key: i for i, key in enumerate(keys)}
        keep = sorted(last.values(), key=lambda i: keys[i])
        merged = table.take(pa.array(keep, type=pa.int64()))
        tmp = self.out.with_name(self.out.name + ".tmp")
        pq.write_table(merged, tmp)
        tmp.rename(self.out)
        for part in self.parts.glob("*") if self.parts.is_dir() else ():
            part.unlink()
        if self.parts.is_dir():
            self.parts.rmdir()
        return merged


@dataclass(frozen=True)
class ScoreSummary:
    items: int  # in the archive
    skipped: int  # answered by an earlier run
    scored: int  # this run
    statuses: dict[str, int]  # this run's rows by status
    seconds: float
    out: Path

    @property
    def items_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds else 0.0


def score(options: ScoreOptions) -> ScoreSummary:
    for task in options.tasks:
        CATALOG.task(task)  # an unknown task is refused before Ray starts
    items = options.source.items()
    results = Results(options.out)
    done = results.done(options.tasks)
    todo = [i for i in items if i not in done]
    started = time.perf_counter()
    statuses: Counter[str] = Counter()
    if todo:
        for rows in _run(options, todo, results):
            statuses.update(rows.column("status").to_pylist())
    results.merge()
    return ScoreSummary(
        len(items),
        len(items) - len(todo),
        len(todo),
        dict(statuses),
        time.perf_counter() - started,
        options.out,
    )


def _run(options: ScoreOptions, todo: list[str], results: Results) -> Iterator[pa.Table]:
    """Ray Data over the items still to do; yields each batch's rows (a checkpoint part is
    written every `checkpoint_every` items, and at the end)."""
    import ray
    from tqdm import tqdm

    local = options.ray_address is None
    ray.init(
        address=options.ray_address or "local",
        num_cpus=os.cpu_count() if local else None,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts items, not Ray Data's blocks
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan, on every run
        dataset = ray.data.from_items([{"item": i} for i in todo]).map_batches(
            Scorer,
            fn_constructor_args=(
                str(options.bundle.resolve()),
                options.tasks,
                options.source,
                options.device,
                options.batch_size,
            ),
            batch_size=options.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_cpus=1,
        )
        pending: list[pa.Table] = []
        pending_items = 0
        with tqdm(total=len(todo), unit="item", disable=not options.progress) as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = batch.select(SCHEMA.names).cast(SCHEMA)
                n = len(set(rows.column("item").to_pylist()))
                pending.append(rows)
                pending_items += n
                if pending_items >= options.checkpoint_every:
                    results.checkpoint(pending)
                    pending, pending_items = [], 0
                bar.update(n)
                yield rows
        if pending:
            results.checkpoint(pending)
    finally:
        if local:
            ray.shutdown()
