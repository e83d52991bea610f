"""Test configuration: the Triton interpreter on machines without a GPU, and the gpu/slow markers."""

import os

import torch

# Must happen before anything imports triton: without a GPU, Triton kernels run
# through the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng_seed(request) -> int:
    """A seed drawn per test run (printed on failure) so that inputs differ between runs."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    torch.manual_seed(seed)
    return seed
