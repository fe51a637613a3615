"""A seeded fuzz of both APIs, 2,500 requests each: malformed messages, wrong shapes and types,
bombs, non-finite values, junk names and ids. Every answer must be a status that names the
problem (never UNKNOWN or INTERNAL), none may hang, no OK may carry a non-finite score, and a
valid request still answers afterwards."""

from __future__ import annotations

import asyncio
import json
import math
import random
import struct

import grpc
import numpy as np
from bombs import deflate_bomb
from load import GENES, SCRNA_TASK, XRAY_TASK, inputs
from tritonclient.grpc import service_pb2 as oip

from multimed.client.sdk import predict_request
from multimed.models.catalog import CATALOG
from multimed.models.codecs.dicom import write_dicom
from multimed.v1 import multimed_pb2 as pb

PER_API = 2500  # each kind of wrongness 156 times (multimed.v1) and 250 (OIP)
TIMEOUT_S = 20
ALLOWED = {
    "OK",
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "UNIMPLEMENTED",
}


def _junk(rng: random.Random, n: int | None = None) -> bytes:
    return rng.randbytes(rng.randint(0, 64) if n is None else n)


def _name(rng: random.Random) -> str:
    return rng.choice(
        ["", "x" * rng.randint(1, 5000), "Müller-Ⅷ-患者", "\t\n", rng.choice(list(CATALOG.tasks))]
    )


def _dicom_variants(rng: random.Random) -> list[bytes]:
    image = np.linspace(0, 100, 64 * 64, dtype=np.float32).reshape(64, 64)
    good = write_dicom(image, "CR")
    nan_window = good.replace(b"50.0", b"NaN ")  # window centre (full-range window: 50)
    return [good, nan_window, good[: rng.randint(0, len(good))], good[:200] + _junk(rng, 300)]


def multimed_bodies(rng: random.Random, n: int) -> list[bytes]:
    """Serialized PredictRequest bodies (and raw junk) of every kind of wrongness."""
    dicoms = _dicom_variants(rng)
    bomb = deflate_bomb()  # built once: deflating 80 MiB takes a while
    base = predict_request(XRAY_TASK, inputs(XRAY_TASK, 1, seed=3)[0])
    out = []
    for i in range(n):
        kind = i % 16
        r = pb.PredictRequest(task=rng.choice(list(CATALOG.tasks)), request_id=_name(rng))
        m = r.inputs.add(modality=rng.choice([*CATALOG.modalities, "", "xray ", "ü" * 99]))
        if kind == 0:
            out.append(_junk(rng, rng.randint(0, 4096)))
            continue
        if kind == 1:  # a valid body, flipped bytes
            body = bytearray(base.SerializeToString())
            for _ in range(rng.randint(1, 8)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            out.append(bytes(body))
            continue
        if kind == 2:
            r.task = _name(rng)
        elif kind == 3:
            m.dicom = rng.choice(dicoms)
        elif kind == 4:
            m.image = _junk(rng, rng.randint(0, 2000))
        elif kind == 5:
            m.edf = b"0       " + _junk(rng, rng.randint(0, 600))
        elif kind == 6:
            m.sequence = rng.choice(["", "ACGT" * rng.randint(1, 500) + "Z", "\0" * 100, "🧬" * 50])
        elif kind == 7:
            m.gene_counts.counts.update(
                {rng.choice(GENES): rng.choice([math.nan, math.inf, -1.0, 1e308]) for _ in range(5)}
            )
        elif kind == 8:
            dims = [rng.choice([0, 1, 3, 64, 2**31, -1]) for _ in range(rng.randint(0, 9))]
            m.tensor.shape.extend(d for d in dims if d >= 0)
            m.tensor.dtype = rng.randint(0, 8)
            m.tensor.data = _junk(rng, rng.randint(0, 4096))
        elif kind == 9:  # a well-shaped X-ray tensor of non-finite or huge values
            m.modality = "xray"
            r.task = XRAY_TASK
            value = rng.choice([np.nan, np.inf, 1e37, -1e38])
            m.tensor.CopyFrom(
                pb.Tensor(
                    dtype=pb.DATA_TYPE_FLOAT32,
                    shape=[1, 64, 64],
                    data=np.full((1, 64, 64), value, np.float32).tobytes(),
                )
            )
        elif kind == 10:
            m.dicom_series.files.extend(_junk(rng, 8) for _ in range(rng.randint(0, 3000)))
        elif kind == 11:  # a deflated DICOM bomb: small on the wire, huge inflated
            m.dicom = bomb
        elif kind == 12:
            r.inputs.add(modality=m.modality, text="twice")
        elif kind == 13:
            m.text = "é" * rng.randint(0, 200000)
        elif kind == 14:
            del r.inputs[:]
        else:
            m.gene_counts.counts.update({f"G{j}": 1.0 for j in range(rng.randint(0, 300000))})
        out.append(r.SerializeToString())
    return out


def oip_bodies(rng: random.Random, n: int) -> list[bytes]:
    out = []
    models = [*CATALOG.tasks, *(f"encoder_{m}" for m in CATALOG.modalities)]
    for i in range(n):
        kind = i % 10
        r = oip.ModelInferRequest(model_name=rng.choice(models), id=_name(rng))
        form = rng.choice(["dicom", "image", "edf", "text", "sequence", "gene_counts", "tensor"])
        t = r.inputs.add(name=f"{rng.choice(list(CATALOG.modalities))}_{form}")
        t.datatype = "BYTES"
        t.shape.extend([1])
        if kind == 0:
            out.append(_junk(rng, rng.randint(0, 4096)))
            continue
        if kind == 1:
            r.model_name = _name(rng)
            r.model_version = _name(rng)
        elif kind == 2:
            t.shape[:] = [rng.choice([-5, 0, 2**40, 10**6]), rng.randint(0, 9)]
        elif kind == 3:
            t.datatype = rng.choice(["FP32", "INT64", "FP16", "", "BYTES\0"])
            r.raw_input_contents.append(_junk(rng))
        elif kind == 4:  # millions of empty BYTES elements
            r.raw_input_contents.append(struct.pack("<I", 0) * rng.randint(1, 2_000_000))
        elif kind == 5:  # deep JSON or a list for gene counts
            t.name = "scrna_gene_counts"
            r.model_name = SCRNA_TASK
            body = rng.choice(["[" * 100000, json.dumps([1, 2, 3]), '{"CD3E": NaN}', "{}", "null"])
            r.raw_input_contents.append(struct.pack("<I", len(body)) + body.encode())
        elif kind == 6:
            r.raw_input_contents.append(struct.pack("<I", 10**9) + b"short")
        elif kind == 7:
            r.outputs.add(name=_name(rng))
            t.contents.bytes_contents.extend([b"x"] * rng.randint(0, 3))
        elif kind == 8:
            t.name = "xray_tensor"
            t.datatype = "FP32"
            t.shape[:] = [1, 1, 64, 64]
            r.model_name = XRAY_TASK
            r.raw_input_contents.append(np.full(64 * 64, np.nan, np.float32).tobytes())
        else:
            r.inputs.add(name=t.name, datatype="BYTES", shape=[2])
            r.raw_input_contents.extend([_junk(rng), _junk(rng)])
        out.append(r.SerializeToString())
    return out


async def _fuzz(url: str, token: str, method: str, bodies: list[bytes]) -> dict[str, int]:
    counts: dict[str, int] = {}
    async with grpc.aio.insecure_channel(
        url, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        call = channel.unary_unary(method)  # raw bytes both ways: junk is sent as it is
        slots = asyncio.Semaphore(16)

        async def one(body: bytes):
            async with slots:
                try:
                    answer = await call(
                        body, timeout=TIMEOUT_S, metadata=(("authorization", f"Bearer {token}"),)
                    )
                    code = "OK"
                    if method.endswith("/Predict"):
                        scores = [s.score for s in pb.PredictResponse.FromString(answer).scores]
                        if not np.isfinite(scores).all():
                            code = "OK_NON_FINITE"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                counts[code] = counts.get(code, 0) + 1

        await asyncio.gather(*(one(b) for b in bodies))
    return counts


def test_fuzz_both_apis(server):
    rng = random.Random(2026)
    for method, bodies in (
        ("/multimed.v1.MultiMed/Predict", multimed_bodies(rng, PER_API)),
        ("/inference.GRPCInferenceService/ModelInfer", oip_bodies(rng, PER_API)),
    ):
        counts = asyncio.run(_fuzz(server.url, server.token, method, bodies))
        print(method, dict(sorted(counts.items())))
        assert sum(counts.values()) == PER_API
        assert set(counts) <= ALLOWED, counts
    with server.client() as client:  # and the server still answers
        answer = client.predict(XRAY_TASK, {"xray": server.patients[0] / "xray.dcm"})
        assert answer.predicted
