import pytest
import torch

torch.set_num_threads(2)


def _forbidden(*args, **kwargs):
    raise RuntimeError("unit tests must not start Ray; put this test under tests/integration")


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", _forbidden)
