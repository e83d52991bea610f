"""pytest-benchmark configuration: CUDA-synchronized timing and GPU-only cases skipped with a reason."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks.common import bench_device, sync  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="GPU-only benchmark: no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    return bench_device()


@pytest.fixture
def run(benchmark, device):
    """benchmark(fn) that waits for the GPU inside each timed call."""

    def timed(fn, *args, rounds: int = 10, **kwargs):
        def call():
            out = fn(*args, **kwargs)
            sync(device)
            return out

        return benchmark.pedantic(call, rounds=rounds, warmup_rounds=2, iterations=1)

    return timed
