"""The encoder's GPU utilisation reading: absent on CPU, and a device whose NVML cannot be read
is reported once and then left alone (the metric stays absent rather than failing batches)."""

from __future__ import annotations

import logging

import pytest
import torch

from multimed.services.encoder import GpuUtilization, pick_device


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
