"""The CUDA path, as far as a CPU allows: device selection, the bfloat16 forward (autocast runs
on CPU too) and float32 outputs; the encoder's GPU utilisation reading, absent on CPU, and a
device whose NVML cannot be read is reported once and then left alone (the metric stays absent
rather than failing batches). The CUDA-only tests run where a GPU is."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from multimed.models.catalog import InputForm
from multimed.models.inputs import RawInput
from multimed.models.modalities.ct import CTPipeline
from multimed.models.modalities.xray import XrayPipeline
from multimed.services.config import BatchConfig
from multimed.services.encoder import GpuUtilization, pick_device

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _images(pipeline, n: int = 4) -> list[RawInput]:
    rng = np.random.default_rng(0)
    shape = (16, 64, 64) if isinstance(pipeline, CTPipeline) else (1, 64, 64)
    return [
        RawInput(pipeline.modality, InputForm.TENSOR, rng.random(shape, np.float32))
        for _ in range(n)
    ]


def test_auto_picks_cuda_only_where_there_is_one():
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == "cpu" and pick_device("cuda") == "cuda"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [XrayPipeline, CTPipeline])
def test_bf16_forward_is_close_to_fp32_and_comes_back_float32(cls, device):
    torch.manual_seed(0)
    state = cls().setup().encoder.state_dict()
    full = cls().setup(device, state)
    half = cls().setup(device, state)
    half.precision = BatchConfig(precision="bf16").precision
    raws = _images(full)
    want, got = full.encode(raws).pooled, half.encode(raws).pooled
    assert got.dtype == torch.float32 and got.device.type == device
    assert not torch.equal(got, want)  # autocast did run in bfloat16
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)


def test_cpu_reports_no_gpu_utilisation():
    assert GpuUtilization(torch.device("cpu")).sample() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unreadable_gpu_is_reported_once_then_left_alone(caplog):
    gpu = GpuUtilization(torch.device("cuda"))
    with caplog.at_level(logging.WARNING, "multimed.encoder"):
        assert gpu.sample() is None
        gpu.at = float("-inf")  # past the sampling interval: it would ask again if it could
        assert gpu.sample() is None
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_utilisation_is_a_ratio():
    value = GpuUtilization(torch.device("cuda")).sample()
    assert value is not None and 0.0 <= value <= 1.0
    assert pick_device("auto") == "cuda"
