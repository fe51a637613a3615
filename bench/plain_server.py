"""Baseline for the serving benchmark: a plain per-request grpc.aio server running the same
models in one process (decode, encode each modality, fuse, head; no batching, no Ray)."""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from multimed.models.bundle import load_bundle
from multimed.models.catalog import CATALOG
from multimed.models.modalities.registry import build_pipeline
from multimed.models.tasks import TaskModels
from multimed.services.frontends.multimed_v1.convert import response_to_wire
from multimed.services.frontends.multimed_v1.inputs import input_from_wire
from multimed.services.types import PredictResult
from multimed.v1 import multimed_pb2_grpc as pb_grpc


class PlainService(pb_grpc.MultiMedServicer):
    def __init__(self, bundle_path: str, modalities: list[str]):
        bundle = load_bundle(bundle_path)
        self.version = bundle.version
        self.pipelines = {
            m: build_pipeline(m, bundle.config).setup("cpu", bundle.encoder_state(m))
            for m in modalities
        }
        self.tasks = TaskModels(bundle.config)
        self.tasks.load_state_dict(bundle.tasks_state())
        self.tasks.eval()

    async def Predict(self, request, context):
        started = time.perf_counter()
        inputs = [input_from_wire(i) for i in request.inputs]
        outputs = {r.modality: self.pipelines[r.modality].encode([r]) for r in inputs}
        prediction = self.tasks.predict(request.task, outputs)[0]
        spec = CATALOG.task(request.task)
        result = PredictResult(
            request.request_id,
            request.task,
            prediction,
            tuple(m for m in spec.accepted if m in outputs),
            tuple(m for m in spec.accepted if m not in outputs),
            self.version,
            0.0,
            0.0,
        )
        return response_to_wire(result, (time.perf_counter() - started) * 1000)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--modalities", nargs="+", default=["xray", "ct", "mri"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    server = grpc.aio.server()
    pb_grpc.add_MultiMedServicer_to_server(PlainService(args.bundle, args.modalities), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
