"""`multimed loadtest` against a real grpc.aio server started here on 127.0.0.1: a trivial
MultiMed and Open Inference Protocol servicer that answers after a short sleep, refuses every
tenth call with RESOURCE_EXHAUSTED, and keeps what it was sent."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from multimed.cli import main
from multimed.client import loadtest
from multimed.client.channel import ChannelSettings
from multimed.client.loadtest.inputs import synthetic_inputs
from multimed.models.catalog import CATALOG, InputForm
from multimed.models.config import ModelConfig
from multimed.models.inputs import RawInput
from multimed.models.modalities.registry import build_pipelines
from multimed.services.frontends.oip.convert import request_from_wire
from multimed.services.frontends.oip.models import Models
from multimed.services.triton import encoder_signature
from multimed.v1 import multimed_pb2 as pb
from multimed.v1 import multimed_pb2_grpc as pb_grpc

SERVICE_S = 0.005


class Seen:
    """What the server was sent: per call its request id, model and inputs (name -> payload)."""

    def __init__(self):
        self.calls: list[tuple[str, str, dict[str, bytes]]] = []
        self.peers: Counter[str] = Counter()  # calls by client address and port
        self.frozen: list[int] = []  # per call, the objects frozen out of collection (gc.freeze)

    async def answer(self, request_id: str, model: str, inputs: dict[str, bytes], context):
        self.calls.append((request_id, model, inputs))
        self.peers[context.peer()] += 1
        self.frozen.append(gc.get_freeze_count())  # the process's: the generator runs here too
        number = len(self.calls)
        await asyncio.sleep(SERVICE_S)
        if number % 10 == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "every tenth call")


class MultiMed(pb_grpc.MultiMedServicer):
    def __init__(self, seen: Seen):
        self.seen = seen

    async def Predict(self, request, context):
        inputs = {i.modality: i.SerializeToString() for i in request.inputs}
        await self.seen.answer(request.request_id, request.task, inputs, context)
        return pb.PredictResponse(request_id=request.request_id, task=request.task)


class Inference(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, seen: Seen):
        self.seen = seen

    async def ModelInfer(self, request, context):
        inputs = {
            f"{t.name}:{t.datatype}:{list(t.shape)}": raw
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        await self.seen.answer(request.id, request.model_name, inputs, context)
        return oip.ModelInferResponse(model_name=request.model_name, id=request.id)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Seen]]:
    """The server in a thread with its own event loop (the CLI runs asyncio.run itself)."""
    seen = Seen()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict = {}

    async def start():
        server = grpc.aio.server()
        pb_grpc.add_MultiMedServicer_to_server(MultiMed(seen), server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(Inference(seen), server)
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        state["server"] = server

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"127.0.0.1:{state['port']}", seen
    asyncio.run_coroutine_threadsafe(state["server"].stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def server(served) -> tuple[str, Seen]:
    """The server, with what it was sent (and its count towards every tenth call) cleared."""
    url, seen = served
    seen.calls.clear()
    seen.peers.clear()
    seen.frozen.clear()
    return url, seen


def notes(n: int, start: int = 0) -> list[dict[str, RawInput]]:
    """Distinct inputs that cost nothing to make (the server here decodes nothing)."""
    return [
        {"text": RawInput("text", InputForm.TEXT, f"note {i}")} for i in range(start, start + n)
    ]


def run(url: str, *tasks: loadtest.TaskLoad, api=loadtest.MULTIMED, **plan) -> loadtest.Result:
    plan.setdefault("load", loadtest.ClosedLoop(4))
    plan.setdefault("bounds", loadtest.Bounds(10, 100))
    return loadtest.run(ChannelSettings(url), api, loadtest.Plan(tasks, **plan))


def test_closed_loop_counts_errors_by_code_and_orders_percentiles(server):
    url, seen = server
    task = loadtest.prepare(loadtest.MULTIMED, "medical_vqa", notes(200))
    result = run(url, task, bounds=loadtest.Bounds(120, 100))  # the count ends it, not the clock
    assert result.stopped_by == "max_requests" and len(seen.calls) == 100
    s = result.overall
    assert (s.requests, s.ok, s.errors_by_code) == (100, 90, {"RESOURCE_EXHAUSTED": 10})
    assert result.tasks["medical_vqa"] == s
    assert SERVICE_S * 1000 <= s.p50_ms <= s.p90_ms <= s.p99_ms <= s.max_ms
    assert s.throughput_rps == pytest.approx(90 / result.duration_s, rel=0.01)
    assert result.load == {"mode": "closed", "concurrency": 4}
    ids = [request_id for request_id, _, _ in seen.calls]
    assert len(set(ids)) == 100  # each request its own id, though serialized before the run
    payloads = [inputs["text"] for _, _, inputs in seen.calls]
    assert len(set(payloads)) == 100  # and its own input


def test_the_duration_bounds_the_run_and_warm_up_is_not_counted(server):
    url, seen = server
    task = loadtest.prepare(loadtest.MULTIMED, "medical_vqa", notes(10))
    result = run(
        url,
        task,
        bounds=loadtest.Bounds(0.5, 100_000),
        warmup=loadtest.Bounds(10, 3),
        repeat_inputs=True,
    )
    # The drain waits for the calls in flight: on a busy machine one may take a while.
    drain_s = result.overall.max_ms / 1000 + 1
    assert result.stopped_by == "duration" and 0.5 <= result.duration_s < 0.5 + drain_s
    assert result.warmup_requests == 3
    assert 0 < result.overall.requests == len(seen.calls) - 3


@pytest.mark.parametrize("load", [loadtest.ClosedLoop(6), loadtest.OpenLoop(300)])
def test_the_load_is_dealt_over_its_connections(server, load):
    """Router replicas sharing a port get connections, not calls: a load over one connection
    reaches one replica. Three connections are three client ports, each carrying about a third
    (the open loop deals arrivals in turn; the closed loop's callers, two a connection, each
    send again when answered)."""
    url, seen = server
    run(url, loadtest.prepare(loadtest.MULTIMED, "t", notes(60)), load=load, connections=3)
    assert len(seen.peers) == 3 and sum(seen.peers.values()) == 60
    assert min(seen.peers.values()) >= 15, seen.peers
    seen.peers.clear()
    run(url, loadtest.prepare(loadtest.MULTIMED, "t", notes(30)), load=load)
    assert len(seen.peers) == 1
    with pytest.raises(ValueError, match="connections"):
        loadtest.Plan((), load, loadtest.Bounds(1, 1), connections=0)


def test_without_repeat_each_input_is_sent_once(server):
    url, seen = server
    task = loadtest.prepare(loadtest.MULTIMED, "medical_vqa", notes(7))
    result = run(url, task, warmup=loadtest.Bounds(10, 2))
    assert result.stopped_by == "inputs" and result.overall.requests == 5
    assert len({inputs["text"] for _, _, inputs in seen.calls}) == len(seen.calls) == 7


def test_weighted_tasks_take_turns(server):
    url, seen = server
    heavy = loadtest.prepare(loadtest.MULTIMED, "medical_vqa", notes(100), weight=3)
    light = loadtest.prepare(loadtest.MULTIMED, "bone_age_classification", notes(100, 100))
    for mix in loadtest.Mix:
        result = run(url, heavy, light, bounds=loadtest.Bounds(10, 40), mix=mix, repeat_inputs=True)
        assert {t: s.requests for t, s in result.tasks.items()} == {
            "medical_vqa": 30,
            "bone_age_classification": 10,
        }
    assert Counter(model for _, model, _ in seen.calls[-40:])["medical_vqa"] == 30


@pytest.mark.parametrize("arrival", list(loadtest.Arrival))
def test_open_loop_honours_the_rate(server, arrival):
    url, _ = server
    task = loadtest.prepare(loadtest.MULTIMED, "medical_vqa", notes(500))
    load = loadtest.OpenLoop(50, arrival)
    result = run(url, task, load=load, bounds=loadtest.Bounds(2.0, 500))
    assert result.stopped_by == "duration"
    # 100 due; a generator the machine stalls sends late, and past the end not at all.
    stalled_s = result.late_max_ms / 1000
    assert 0.8 * 50 * (2.0 - stalled_s) <= result.overall.requests <= 120, result
    assert result.load == {
        "mode": "open",
        "rate_rps": 50,
        "arrival": arrival,
        "max_outstanding": 256,
    }


def test_open_loop_latency_counts_from_the_schedule(server):
    """One request at a time against a 1000/s schedule: the queue behind it is latency."""
    url, _ = server
    task = loadtest.prepare(loadtest.MULTIMED, "medical_vqa", notes(500))
    load = loadtest.OpenLoop(1000, loadtest.Arrival.FIXED, max_outstanding=1)
    result = run(url, task, load=load, bounds=loadtest.Bounds(0.3, 500))
    assert result.overall.requests < 0.3 / SERVICE_S + 5  # the server's pace, not the schedule's
    assert result.overall.p99_ms > 20 * SERVICE_S * 1000
    assert result.late_p99_ms > 20 * SERVICE_S * 1000  # sent late, waiting for the one slot
    assert f"sent behind schedule: p99 {result.late_p99_ms:.1f} ms" in loadtest.format_table(result)


def test_the_generators_old_heap_is_not_collected_while_it_loads(server):
    """A full collection walks every object of the process, and over a large heap it paused the
    generator for 0.3 s (a test session's): no request went out meanwhile, so the pause counted
    as latency, and the requests held back then went out at once. While a load runs, only what
    it made is collected: the server, in this process, finds the heap made before the run
    frozen out of collection at every call, and nothing is frozen once the run is over."""
    url, seen = server
    heap = [[] for _ in range(100_000)]
    result = run(url, loadtest.prepare(loadtest.MULTIMED, "t", notes(40)))
    assert len(seen.calls) == 40 and result.overall.ok == 36
    assert len(seen.frozen) == 40 and min(seen.frozen) >= len(heap), seen.frozen
    assert not gc.get_freeze_count()  # unfrozen after the run
    del heap


def test_oip_model_infer_with_synthetic_wire_inputs(server):
    url, seen = server
    tasks = [("bone_age_classification", 1), ("medical_vqa", 1)]
    inputs = synthetic_inputs(tasks, 20)
    loads = [loadtest.prepare(loadtest.OIP, t, inputs[t]) for t, _ in tasks]
    result = run(url, *loads, api=loadtest.OIP)
    assert result.stopped_by == "inputs" and result.overall.requests == 20
    assert result.overall.errors_by_code == {"RESOURCE_EXHAUSTED": 2}
    assert {model for _, model, _ in seen.calls} == {t for t, _ in tasks}
    names = Counter(name.split(":")[0] for _, _, inputs in seen.calls for name in inputs)
    assert names["xray_dicom"] >= 10 and names["text_text"] == 10
    shapes = {name for _, _, inputs in seen.calls for name in inputs}
    assert {"xray_dicom:BYTES:[1, 1]", "text_text:BYTES:[1, 1]"} <= shapes
    payloads = [raw for _, _, inputs in seen.calls for raw in inputs.values()]
    assert len(set(payloads)) == len(payloads)  # no input sent twice, across tasks too


def test_oip_requests_decode_as_the_server_reads_them():
    config = ModelConfig()
    signatures = {
        m: encoder_signature(m, p.model_input(), config.embed_dim)
        for m, p in build_pipelines(config).items()
    }
    models = Models(signatures, max_batch_size=8)
    inputs = synthetic_inputs([(t, 1) for t in CATALOG.tasks], 11, every=True)
    for task, (sent,) in inputs.items():
        decoded = request_from_wire(models.get(task), loadtest.oip_request(task, sent), 8)
        (item,) = decoded.items
        assert {(i.modality, i.form) for i in item} == {(r.modality, r.form) for r in sent.values()}


def test_synthetic_inputs_carry_what_each_task_needs():
    tasks = [(t, 1) for t in CATALOG.tasks]
    inputs = synthetic_inputs(tasks, 3 * len(tasks))
    for task, requests in inputs.items():
        spec = CATALOG.task(task)
        for request in requests:
            spec.check_modalities(request)
            assert not set(request) - set(spec.all_of + spec.any_of)  # the required ones only
    disease = inputs["disease_classification"]
    assert [set(r) for r in disease] == [{"xray"}, {"ct"}, {"mri"}]  # any_of takes turns
    assert disease[1]["ct"].form == InputForm.DICOM_SERIES
    full = synthetic_inputs([("disease_classification", 1)], 1, every=True)
    assert set(full["disease_classification"][0]) == {"xray", "ct", "mri", "text"}


def test_cli_json_from_a_cohort_and_bad_arguments(server, tmp_path, capsys):
    url, seen = server
    cohort = tmp_path / "cohort"
    assert main(["synth", "--out", str(cohort), "--n", "4"]) == 0
    capsys.readouterr()
    args = ["loadtest", "--url", url, "--cohort", str(cohort), "--max-requests", "20"]
    tasks = ["--task", "bone_age_classification", "--task", "medical_vqa"]
    assert main([*args, *tasks, "--api", "oip", "--concurrency", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stopped_by"] == "inputs" and result["overall"]["requests"] == 4
    assert set(result["tasks"]) == {"bone_age_classification", "medical_vqa"}
    assert result["overall"]["p50_ms"] <= result["overall"]["max_ms"]
    assert len(seen.calls) == 4

    assert main([*args, *tasks, "--rate", "20", "--repeat-inputs", "--duration", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "mode open" in table and "medical_vqa" in table
    assert table.splitlines()[-2][:3] == "all" and "sent behind schedule" in table.splitlines()[-1]

    assert main([*args, "--task", "no_such_task", "--concurrency", "1"]) == 2
    assert main([*args, "--task", "medical_vqa:x", "--concurrency", "1"]) == 2
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--task", "medical_vqa"])  # neither --concurrency nor --rate
    assert exit_.value.code == 2


def test_the_load_generator_imports_neither_torch_nor_ray():
    code = (
        "import json, sys\n"
        "import multimed.client.loadtest.inputs\n"
        "print(json.dumps(['torch' in sys.modules, 'ray' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [False, False]
