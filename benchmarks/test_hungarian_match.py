"""hungarian_match: our batched exact solver against a loop of scipy's linear_sum_assignment."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import stellar_kernels as sk
from benchmarks.common import median_ms, vs_baseline
from stellar_kernels.hungarian import hungarian_scipy

CASES = [(512, 16), (64, 196)]


def _cost(batch: int, k: int, device) -> torch.Tensor:
    return torch.rand(batch, k, k, device=device)


@pytest.mark.benchmark(group="hungarian_match_B512_K16")
def test_hungarian_match_ours_B512_K16(run, device):
    cost = _cost(512, 16, device)
    run(sk.hungarian_match, cost)


@pytest.mark.benchmark(group="hungarian_match_B512_K16")
def test_hungarian_match_scipy_loop_B512_K16(run, device):
    cost = _cost(512, 16, device)
    run(hungarian_scipy, cost, rounds=5)


@pytest.mark.benchmark(group="hungarian_match_B64_K196")
def test_hungarian_match_ours_B64_K196(run, device):
    cost = _cost(64, 196, device)
    run(sk.hungarian_match, cost, rounds=3)


@pytest.mark.benchmark(group="hungarian_match_B64_K196")
def test_hungarian_match_scipy_loop_B64_K196(run, device):
    cost = _cost(64, 196, device)
    run(hungarian_scipy, cost, rounds=3)


def figures(device: torch.device, quick: bool = False) -> list[dict]:
    """Fixed-name figures: hungarian_cpu/* on the CPU, hungarian_cuda/* on a GPU."""
    out = []
    prefix = "hungarian_cuda" if device.type == "cuda" else "hungarian_cpu"
    for batch, k in CASES:
        if quick:
            batch = min(batch, 16)
        cost = _cost(batch, k, device)
        ours = median_ms(partial(sk.hungarian_match, cost), device)
        # The scipy baseline includes the device-to-host copy.
        base = median_ms(partial(hungarian_scipy, cost), device, warmup=1, rep=5)
        out.append(vs_baseline(f"{prefix}/B{batch}_K{k}", ours, "scipy_loop", base))
    # Sanity: the timed solver is exact on this input.
    cost = _cost(8, 16, device)
    same = sk.hungarian_match(cost).cpu()
    ref = hungarian_scipy(cost).cpu()
    assert torch.allclose(
        cost.cpu().gather(2, same[..., None]).sum(), cost.cpu().gather(2, ref[..., None]).sum()
    )
    return out
