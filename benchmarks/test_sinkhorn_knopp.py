"""sinkhorn_knopp: the fused Triton kernels against the eager PyTorch code and the memory floor.

Baseline `torch_reference`: the CAPI/STELLAR-style eager code (exp with a
column-max shift, then per iteration a column and a row normalization), as
`sinkhorn_knopp_reference` implements it with one in-place float32 buffer.
Floor: one read of the scores plus one write of q at the copy bandwidth
measured in the same run. On a machine without a GPU "ours" is the default
CPU backend (the PyTorch path), and every figure says so in "ours_backend".
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import stellar_kernels as sk
from benchmarks.common import compare, copy_bandwidth_gbs, reported, vs_floor
from benchmarks.common import default_backend as ours_backend
from stellar_kernels.reference import sinkhorn_knopp_reference

N_ITERS = 3
EPS = 1e-8  # the training recipe's term added to the sums (the public code's), on both sides
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PAPER_IMAGES = (4, 8, 16, 32, 64)  # the paper's batch sizes; 17 views of each image


def torch_reference(scores: torch.Tensor) -> torch.Tensor:
    return sinkhorn_knopp_reference(scores, N_ITERS, 1.0, EPS, None)[0]


def ours(scores: torch.Tensor) -> torch.Tensor:
    return sk.sinkhorn_knopp(scores, n_iters=N_ITERS, eps=EPS, validate=False)


def _scores(n: int, p: int, dtype: torch.dtype, device) -> torch.Tensor:
    # Cosine-similarity logits divided by the SK temperature 0.06, as in the paper.
    return ((torch.rand(n, p, device=device) * 2 - 1) / 0.06).to(dtype)


# --- pytest-benchmark: full sizes on a GPU, a small case on the CPU ---------------------------


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_knopp_N2048_P16384_fp32")
def test_sinkhorn_knopp_ours_N2048_P16384_fp32(run, device):
    run(ours, _scores(2048, 16384, torch.float32, device), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_knopp_N2048_P16384_fp32")
def test_sinkhorn_knopp_torch_reference_N2048_P16384_fp32(run, device):
    run(torch_reference, _scores(2048, 16384, torch.float32, device), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_knopp_N2048_P16384_bf16")
def test_sinkhorn_knopp_ours_N2048_P16384_bf16(run, device):
    run(ours, _scores(2048, 16384, torch.bfloat16, device), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_knopp_N2048_P16384_bf16")
def test_sinkhorn_knopp_torch_reference_N2048_P16384_bf16(run, device):
    run(torch_reference, _scores(2048, 16384, torch.bfloat16, device), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_knopp_N1024_P16384_fp32")
def test_sinkhorn_knopp_ours_N1024_P16384_fp32(run, device):
    run(ours, _scores(1024, 16384, torch.float32, device), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_knopp_N1024_P16384_fp32")
def test_sinkhorn_knopp_torch_reference_N1024_P16384_fp32(run, device):
    run(torch_reference, _scores(1024, 16384, torch.float32, device), rounds=20)


@pytest.mark.benchmark(group="sinkhorn_knopp_N256_P2048_fp32")
def test_sinkhorn_knopp_default_backend_N256_P2048_fp32(run, device):
    """The default backend for the device (the PyTorch path on the CPU)."""
    run(ours, _scores(256, 2048, torch.float32, device), rounds=5)


@pytest.mark.benchmark(group="sinkhorn_knopp_N256_P2048_fp32")
def test_sinkhorn_knopp_torch_reference_N256_P2048_fp32(run, device):
    run(torch_reference, _scores(256, 2048, torch.float32, device), rounds=5)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_knopp_N2048_P16384_fp32")
def test_sinkhorn_knopp_torch_compile_N2048_P16384_fp32(run, device):
    compiled = torch.compile(torch_reference)
    scores = _scores(2048, 16384, torch.float32, device)
    compiled(scores)  # compile outside the timing
    run(compiled, scores, rounds=20)


# The paper's batch sizes (B.5): the 16 sparse tokens and the CLS token of 4 ... 64 images.
@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_knopp_paper_batches_P16384_fp32")
@pytest.mark.parametrize("images", PAPER_IMAGES)
def test_sinkhorn_knopp_ours_paper_batch(run, device, images):
    run(ours, _scores(images * 17, 16384, torch.float32, device), rounds=10)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sinkhorn_knopp_paper_batches_P16384_fp32")
@pytest.mark.parametrize("images", PAPER_IMAGES)
def test_sinkhorn_knopp_torch_reference_paper_batch(run, device, images):
    run(torch_reference, _scores(images * 17, 16384, torch.float32, device), rounds=10)


# --- fixed-name figures for benchmarks/results.py ---------------------------------------------


def _setup(device: torch.device) -> tuple[dict, dict]:
    """compare()'s rounds on this device, and the fields every figure carries."""
    backend = ours_backend(device)
    rounds = {} if device.type == "cuda" else {"rounds": 2, "rep": 2}
    extra = {"ours_backend": backend, "n_iters": N_ITERS, "eps": EPS}
    if backend == "torch":
        extra["note"] = "no CUDA device: ours is the PyTorch path, the same code as the baseline"
    return rounds, extra


def _compare(n: int, p: int, dt: str, device: torch.device, **fields) -> dict:
    """sinkhorn_knopp/N<n>_P<p>_<dt> against torch_reference, after checking ours against it."""
    scores = _scores(n, p, DTYPES[dt], device)
    q = ours(scores)
    torch.testing.assert_close(q, torch_reference(scores), rtol=1e-4, atol=1e-7)
    del q
    return compare(
        f"sinkhorn_knopp/N{n}_P{p}_{dt}",
        partial(ours, scores),
        "torch_reference",
        partial(torch_reference, scores),
        device,
        **fields,
    )


def figures(device: torch.device, quick: bool = False) -> list[dict]:
    """sinkhorn_knopp/N2048_P16384_fp32, sinkhorn_knopp_floor/N2048_P16384_fp32 and, on a GPU,
    sinkhorn_knopp_vs_compile/N2048_P16384_fp32 (N256 under --quick, named by the size
    measured): what the targets need."""
    rounds, extra = _setup(device)
    backend = extra["ours_backend"]
    n, p = (2048 // 8 if quick else 2048), 16384
    main = _compare(n, p, "fp32", device, **rounds, **extra)
    bandwidth = copy_bandwidth_gbs(device)
    floor_bytes = n * p * 4 + n * p * 4  # read the fp32 scores once, write q once
    out = [
        main,
        vs_floor(
            f"sinkhorn_knopp_floor/N{n}_P{p}_fp32",
            main["ours_ms"],
            floor_bytes,
            bandwidth,
            copy_bandwidth_gbs=round(bandwidth, 1),
            **({"hbm_passes": N_ITERS + 2} if backend == "triton" else {}),
            **extra,
        ),
    ]
    if device.type != "cuda":
        out.append(
            reported(
                f"sinkhorn_knopp_vs_compile/N{n}_P{p}_fp32",
                not_measured="CPU run: torch.compile on the CPU would time inductor's CPU code",
                **extra,
            )
        )
        return out
    scores = _scores(n, p, torch.float32, device)
    compiled = torch.compile(torch_reference)
    torch.testing.assert_close(compiled(scores), torch_reference(scores))
    out.append(
        compare(
            f"sinkhorn_knopp_vs_compile/N{n}_P{p}_fp32",
            partial(ours, scores),
            "torch_compile",
            partial(compiled, scores),
            device,
            **extra,
        )
    )
    return out


def extra_figures(device: torch.device, quick: bool = False) -> list[dict]:
    """sinkhorn_knopp/N2048_P16384_bf16, sinkhorn_knopp/N1024_P16384_fp32 and, on a GPU,
    sinkhorn_knopp_paper_batch/N<17 x images>_P16384_fp32 for 4-64 images (N / 8 under
    --quick, named by the size measured)."""
    rounds, extra = _setup(device)
    scale = 8 if quick else 1
    out = [
        _compare(2048 // scale, 16384, "bf16", device, **rounds, **extra),
        _compare(1024 // scale, 16384, "fp32", device, **rounds, **extra),
    ]
    if device.type != "cuda":
        return out
    for images in PAPER_IMAGES:
        scores = _scores(images * 17, 16384, torch.float32, device)
        out.append(
            compare(
                f"sinkhorn_knopp_paper_batch/N{images * 17}_P16384_fp32",
                partial(ours, scores),
                "torch_reference",
                partial(torch_reference, scores),
                device,
                images=images,
                **extra,
            )
        )
    return out
