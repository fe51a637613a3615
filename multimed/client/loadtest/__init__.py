"""`multimed loadtest`: load a running server with inference calls, multimed.v1 `Predict` or the
Open Inference Protocol's `ModelInfer`, and report latency percentiles, throughput and errors by
status code. `inputs` makes what is sent, `wire` serializes it once, `driver` sends it and
`report` sums it up. Imports neither torch nor ray."""

from multimed.client.loadtest.driver import (
    Arrival,
    Bounds,
    ClosedLoop,
    Mix,
    OpenLoop,
    Plan,
    run,
    run_async,
)
from multimed.client.loadtest.report import Result, Stats, format_table
from multimed.client.loadtest.wire import APIS, MULTIMED, OIP, Api, TaskLoad, oip_request, prepare

__all__ = [
    "APIS",
    "MULTIMED",
    "OIP",
    "Api",
    "Arrival",
    "Bounds",
    "ClosedLoop",
    "Mix",
    "OpenLoop",
    "Plan",
    "Result",
    "Stats",
    "TaskLoad",
    "format_table",
    "oip_request",
    "prepare",
    "run",
    "run_async",
]
