"""CPU time of a server's whole process tree, read from /proc (Linux), and py-spy profile
summaries: what the serving bench reports per request and in "where the time goes"."""

from __future__ import annotations

import collections
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    pid: int
    name: str  # the command line's first words: Ray retitles its workers (ray::ServeReplica:...)
    cpu_s: float  # user + system, all threads


def _stat(pid: int) -> tuple[int, float] | None:
    """-> (parent pid, CPU seconds), or None for a process that has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(fields[1]), (int(fields[11]) + int(fields[12])) * TICK_S


def _name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split()[:3])[:160]


def tree(root: int) -> list[Proc]:
    """`root` and every process below it, with their CPU seconds so far."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (s := _stat(int(entry))) is not None:
            stats[int(entry)] = s
    children = collections.defaultdict(list)
    for pid, (parent, _) in stats.items():
        children[parent].append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out.append(Proc(pid, _name(pid), stats[pid][1]))
            todo.extend(children[pid])
    return out


def own_cpu_s() -> float:
    """This process's CPU seconds (every thread): the load generator's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class TreeCpu:
    """CPU spent by a process tree between `__init__` and `spent()`, split into the replicas
    (our code, and Ray's inside them) and the rest (Ray's own processes: GCS, raylet, agents,
    the Serve controller, the driver)."""

    def __init__(self, root: int):
        self.root = root
        self.before = {p.pid: p.cpu_s for p in tree(root)}

    def spent(self) -> dict[str, float]:
        by_kind = {"replicas": 0.0, "ray": 0.0}
        for p in tree(self.root):
            kind = "replicas" if "ServeReplica" in p.name else "ray"
            by_kind[kind] += p.cpu_s - self.before.get(p.pid, 0.0)
        return by_kind


def replica_pid(root: int, deployment: str) -> int | None:
    """The first live replica process of `deployment` below `root`."""
    for p in tree(root):
        if f"ServeReplica:multimed:{deployment}" in p.name:
            return p.pid
    return None


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """py-spy sampling `pid` for `seconds` (non-blocking: the process is not paused), written
    as collapsed stacks to `out`; the caller waits on the returned process."""
    return subprocess.Popen(
        [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# Where a sample's innermost frame lives (py-spy names files from site-packages down), first
# match wins.
AREAS = (
    ("torch (the model)", ("torch/",)),
    ("ray serve", ("ray/serve/",)),
    ("ray core", ("ray/",)),
    ("grpc", ("grpc/", "grpc_")),
    ("protobuf", ("google/protobuf/",)),
    ("numpy", ("numpy/",)),
    ("multimed", ("multimed/", "modalities/", "fusion.py", "trust.py", "tasks.py")),
    ("asyncio, threads", ("asyncio/", "threading.py", "queue.py", "concurrent/")),
    ("pickle", ("pickle",)),
)


def summarise(collapsed: Path, top: int = 8) -> dict:
    """Samples by area of the innermost frame, and the innermost functions taking the most."""
    areas: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        leaf = stack.split(";")[-1]
        total += n
        leaves[leaf] += n
        where = leaf.rpartition("(")[2]
        area = next((a for a, marks in AREAS if any(where.startswith(m) for m in marks)), "other")
        areas[area] += n
    return {
        "samples": total,
        "areas": {a: n / total for a, n in areas.most_common()} if total else {},
        "top": [(leaf, n / total) for leaf, n in leaves.most_common(top)] if total else [],
    }
