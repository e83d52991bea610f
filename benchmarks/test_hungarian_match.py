"""hungarian_match: our batched exact solver against a loop of scipy's linear_sum_assignment.

On a GPU the scipy baseline includes the device-to-host copy of the costs (and
the copy of the result back), as a training loop that calls scipy pays it.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import stellar_kernels as sk
from benchmarks.common import median_ms, reported, vs_baseline
from stellar_kernels.reference import hungarian_scipy

CASES = [(512, 16), (64, 196)]
# The paper's timing table (appendix B.5, A100): exact Hungarian matching of the
# 8 views of each image, K = 16 tokens, at these batch sizes.
SCALING_BATCHES = (4, 8, 16, 32, 64)
SCALING_VIEWS = 8
SCALING_K = 16
PAPER_A100_MS = {8: 17.0, 16: 40.0, 32: 90.0, 64: 180.0}


def _cost(batch: int, k: int, device) -> torch.Tensor:
    return torch.rand(batch, k, k, device=device)


def _torch_linear_assignment():
    """The batch_linear_assignment function of torch-linear-assignment, or None and why not."""
    try:
        from torch_linear_assignment import batch_linear_assignment
    except ImportError as err:
        return None, f"torch-linear-assignment is not installed ({err})"
    return batch_linear_assignment, ""


@pytest.mark.benchmark(group="hungarian_match_B512_K16")
def test_hungarian_match_ours_B512_K16(run, device):
    cost = _cost(512, 16, device)
    run(sk.hungarian_match, cost)


@pytest.mark.benchmark(group="hungarian_match_B512_K16")
def test_hungarian_match_scipy_loop_B512_K16(run, device):
    cost = _cost(512, 16, device)
    run(hungarian_scipy, cost, rounds=5)


@pytest.mark.gpu
@pytest.mark.benchmark(group="hungarian_match_B512_K16")
def test_hungarian_match_torch_linear_assignment_B512_K16(run, device):
    solve, why = _torch_linear_assignment()
    if solve is None:
        pytest.skip(why)
    cost = _cost(512, 16, device)
    run(solve, cost)


@pytest.mark.benchmark(group="hungarian_match_B64_K196")
def test_hungarian_match_ours_B64_K196(run, device):
    cost = _cost(64, 196, device)
    run(sk.hungarian_match, cost, rounds=3)


@pytest.mark.benchmark(group="hungarian_match_B64_K196")
def test_hungarian_match_scipy_loop_B64_K196(run, device):
    cost = _cost(64, 196, device)
    run(hungarian_scipy, cost, rounds=3)


@pytest.mark.gpu
@pytest.mark.benchmark(group="hungarian_match_cuda_scaling")
@pytest.mark.parametrize("batch", SCALING_BATCHES)
def test_hungarian_match_cuda_scaling(run, device, batch):
    cost = _cost(batch * SCALING_VIEWS, SCALING_K, device)
    run(sk.hungarian_match, cost)


def _scaling_figure(device: torch.device, quick: bool) -> dict:
    """hungarian_cuda_scaling: our time per batch beside scipy's (same run) and the paper's."""
    ours, scipy_loop = {}, {}
    for batch in SCALING_BATCHES:
        cost = _cost(batch * SCALING_VIEWS, SCALING_K, device)
        ours[batch] = round(median_ms(partial(sk.hungarian_match, cost), device), 6)
        if not quick:
            scipy_loop[batch] = round(
                median_ms(partial(hungarian_scipy, cost), device, warmup=1, rep=5), 6
            )
    return reported(
        "hungarian_cuda_scaling",
        ours_ms=ours[SCALING_BATCHES[-1]],
        views=SCALING_VIEWS,
        k=SCALING_K,
        ours_ms_by_batch=ours,
        scipy_loop_ms_by_batch=scipy_loop,
        paper_a100_ms_by_batch=PAPER_A100_MS,
    )


def figures(device: torch.device, quick: bool = False) -> list[dict]:
    """Fixed-name figures: hungarian_cpu/* on the CPU; hungarian_cuda/* and
    hungarian_cuda_scaling on a GPU."""
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
        if device.type == "cuda" and k == 16:
            solve, why = _torch_linear_assignment()
            if solve is None:
                print(f"hungarian_cuda_tla/B{batch}_K{k}: skipped: {why}")
            else:
                theirs = median_ms(partial(solve, cost), device)
                out.append(
                    vs_baseline(
                        f"hungarian_cuda_tla/B{batch}_K{k}", ours, "torch_linear_assignment", theirs
                    )
                )
    if device.type == "cuda":
        out.append(_scaling_figure(device, quick))
    # Sanity: the timed solver is exact on this input.
    cost = _cost(8, 16, device)
    same = sk.hungarian_match(cost).cpu()
    ref = hungarian_scipy(cost).cpu()
    assert torch.allclose(
        cost.cpu().gather(2, same[..., None]).sum(), cost.cpu().gather(2, ref[..., None]).sum()
    )
    return out
