"""sinkhorn_match: the Triton kernel against the paper's eager PyTorch matching on a given cost.

Baseline `torch_reference`: the paper's algorithm in eager PyTorch on the cost,
5 log-domain iterations (two logsumexp each) and a row-wise argmax, as
`benchmarks.common.paper_sinkhorn_match` implements it. "Ours" is the
public call with its defaults (one-to-one "permutation" rounding, which does
more work than the baseline's argmax) and validate=False (no NaN scan, the
baseline has none). On a machine without a GPU "ours" is the default CPU
backend (the PyTorch path), and every figure says so in "ours_backend".

`sinkhorn_match_rounding_hungarian/<size>` prices the exact rounding: rounding="hungarian"
(the same plan, then `stellar_kernels.hungarian_match` on the cost's device: the CUDA kernel
on a GPU, the C++ solver on the CPU) against the default greedy rounding, on the same cost.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import stellar_kernels as sk
from benchmarks.common import compare, median_ms, paper_sinkhorn_match
from benchmarks.common import default_backend as ours_backend
from stellar_kernels.reference import sinkhorn_match_reference

EPS, N_ITERS = 0.1, 5


def torch_reference(cost: torch.Tensor) -> torch.Tensor:
    """The paper's matching: log-domain Sinkhorn iterations, then the row-wise argmax."""
    return paper_sinkhorn_match(cost, EPS, N_ITERS)


def ours(cost: torch.Tensor, rounding: str = "permutation") -> torch.Tensor:
    return sk.sinkhorn_match(cost, EPS, N_ITERS, rounding, validate=False).index


def _cost(batch: int, k: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Euclidean distances between layer-normed tokens of dimension D are about sqrt(2 D);
    # any positive cost of that size will do for timing.
    return (30 + 10 * torch.rand(batch, k, k, device=device)).to(dtype)


# --- pytest-benchmark ---------------------------------------------------------------------------


@pytest.mark.benchmark(group="sinkhorn_match_B512_K16")
def test_sinkhorn_match_ours_B512_K16(run, device):
    """The default backend for the device (Triton on a GPU, the PyTorch path on the CPU)."""
    run(ours, _cost(512, 16, device))


@pytest.mark.benchmark(group="sinkhorn_match_B512_K16")
def test_sinkhorn_match_ours_argmax_B512_K16(run, device):
    run(ours, _cost(512, 16, device), "argmax")


@pytest.mark.benchmark(group="sinkhorn_match_B512_K16")
def test_sinkhorn_match_ours_hungarian_B512_K16(run, device):
    """The exact one-to-one rounding: the same plan, then the batched Hungarian solver."""
    run(ours, _cost(512, 16, device), "hungarian")


@pytest.mark.benchmark(group="sinkhorn_match_B512_K16")
def test_sinkhorn_match_torch_reference_B512_K16(run, device):
    run(torch_reference, _cost(512, 16, device))


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_match_B512_K16_bf16")
def test_sinkhorn_match_ours_B512_K16_bf16(run, device):
    run(ours, _cost(512, 16, device, torch.bfloat16), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_match_B8192_K16")
def test_sinkhorn_match_ours_B8192_K16(run, device):
    run(ours, _cost(8192, 16, device), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_match_B8192_K16")
def test_sinkhorn_match_torch_reference_B8192_K16(run, device):
    run(torch_reference, _cost(8192, 16, device), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_match_B64_K196")
def test_sinkhorn_match_ours_B64_K196(run, device):
    """T > 128: the loop path (one problem per program, tiles streamed from L2)."""
    run(ours, _cost(64, 196, device), rounds=10)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_match_B64_K196")
def test_sinkhorn_match_torch_reference_B64_K196(run, device):
    run(torch_reference, _cost(64, 196, device), rounds=10)


# --- fixed-name figures for benchmarks/results.py -----------------------------------------------


def hungarian_figure(cost: torch.Tensor, device: torch.device, **timing) -> dict:
    """sinkhorn_match_rounding_hungarian/<size>: rounding="hungarian" against the greedy
    rounding ("permutation", the default) on the same cost, both with ours' backend; speedup =
    greedy ms / hungarian ms (below 1: what the exact rounding costs). No target."""
    batch, k, _ = cost.shape
    greedy = sk.sinkhorn_match(cost, EPS, N_ITERS, validate=False)
    exact = sk.sinkhorn_match(cost, EPS, N_ITERS, "hungarian", validate=False)
    # A guard that the timed rounding is the exact one: the same plan, and in no problem
    # less mass than the greedy rounding's.
    assert torch.equal(exact.plan, greedy.plan)
    exact_mass, greedy_mass = (
        greedy.plan.double().gather(2, index[..., None]).sum((1, 2))
        for index in (exact.index, greedy.index)
    )
    assert bool((exact_mass >= greedy_mass - 1e-9).all())
    if device.type == "cuda":
        solves = (
            "one batch of 2B exact problems: which problems have no assignment free of "
            "forbidden pairs cannot be read without a host synchronization"
        )
    else:
        solves = "B exact problems: a cost without forbidden pairs needs no second solve"
    return compare(
        f"sinkhorn_match_rounding_hungarian/B{batch}_K{k}",
        partial(ours, cost, "hungarian"),
        "permutation_rounding",
        partial(ours, cost),
        device,
        **timing,
        ours_backend=ours_backend(device),
        rounding="hungarian",
        solves=solves,
        problems_with_more_mass=int((exact_mass > greedy_mass + 1e-9).sum()),
        dtype="fp32",
        eps=EPS,
        n_iters=N_ITERS,
    )


def _timing(device: torch.device) -> dict:
    """compare()'s rounds: its defaults on a GPU, fewer on the CPU (the PyTorch path is slow)."""
    return {} if device.type == "cuda" else {"rounds": 3, "rep": 3}


def rounding_figures(device: torch.device, quick: bool = False) -> list[dict]:
    """sinkhorn_match_rounding_hungarian/B512_K16 (B16 under --quick, named by the size)."""
    return [hungarian_figure(_cost(16 if quick else 512, 16, device), device, **_timing(device))]


def figures(device: torch.device, quick: bool = False) -> list[dict]:
    """sinkhorn_match/B512_K16 against torch_reference (B16 under --quick, named by the size)."""
    backend = ours_backend(device)
    batch, k = (16 if quick else 512), 16
    cost = _cost(batch, k, device)
    # A guard that the timed code computes the reference's plan (the tests hold the tight
    # tolerances; float32 exp2 and exp differ by ~1e-4 relative on a few entries at this size).
    plan = sk.sinkhorn_match(cost, EPS, N_ITERS, validate=False).plan
    torch.testing.assert_close(
        plan, sinkhorn_match_reference(cost, EPS, N_ITERS, "argmax")[1], rtol=1e-3, atol=1e-5
    )
    timing = {} if device.type == "cuda" else {"warmup": 1, "rep": 10}
    argmax_ms = median_ms(partial(ours, cost, "argmax"), device, **timing)
    extra = {
        "ours_backend": backend,
        "rounding": "permutation",
        "ours_argmax_ms": round(argmax_ms, 6),
        "dtype": "fp32",
        "eps": EPS,
        "n_iters": N_ITERS,
    }
    if backend == "torch":
        extra["note"] = (
            "no CUDA device: ours is the PyTorch path (Triton runs only in the interpreter on the "
            "CPU); its one-to-one rounding costs K extra passes that the argmax baseline skips"
        )
    return [
        compare(
            f"sinkhorn_match/B{batch}_K{k}",
            partial(ours, cost),
            "torch_reference",
            partial(torch_reference, cost),
            device,
            **_timing(device),
            **extra,
        )
    ]


# --- further baselines: POT's log-domain Sinkhorn and torch.compile of the paper's code -------


def pot_loop(cost: torch.Tensor) -> torch.Tensor:
    """POT's ot.bregman.sinkhorn_log per problem (unit marginals, 5 iterations), then argmax."""
    import ot

    host = cost.detach().to("cpu", torch.float64).numpy()
    ones = torch.ones(cost.shape[1], dtype=torch.float64).numpy()
    index = torch.empty(cost.shape[:2], dtype=torch.int64)
    for b, problem in enumerate(host):
        plan = ot.bregman.sinkhorn_log(ones, ones, problem, EPS, numItermax=N_ITERS, stopThr=0.0)
        index[b] = torch.from_numpy(plan.argmax(axis=1))
    return index.to(cost.device)


@pytest.mark.benchmark(group="sinkhorn_match_B512_K16")
def test_sinkhorn_match_pot_loop_B512_K16(run, device):
    pytest.importorskip("ot", reason="POT is not installed: no POT baseline")
    run(pot_loop, _cost(512, 16, device), rounds=3)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_match_B512_K16")
def test_sinkhorn_match_torch_compile_B512_K16(run, device):
    compiled = torch.compile(torch_reference)
    cost = _cost(512, 16, device)
    compiled(cost)  # compile outside the timing
    run(compiled, cost, rounds=20)
