"""match_tokens: the fused Triton kernel (cost + Sinkhorn + rounding in one launch) against
the paper's eager PyTorch matching, a loop of scipy's exact solver and the memory floor.

Sizes: B = 64 images x V = 8 views = 512 problems of K = 16 tokens of D = 768 (ViT-B).
Baselines, timed in the same process:
  torch_reference  cdist(pred, target.repeat_interleave(V, 0)), 5 log-domain iterations
                   (two logsumexp each), row-wise argmax: the paper's algorithm in eager PyTorch;
  scipy_loop       the same cost, copied to the CPU, then linear_sum_assignment per problem.
Floor: pred and target read once at the copy bandwidth measured in the same run.
"Ours" is the public call with its defaults (one-to-one rounding) and validate=False.
On a machine without a GPU "ours" is the default CPU backend (the PyTorch path), and
every figure says so in "ours_backend".
"""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import stellar_kernels as sk
from benchmarks.common import (
    compare,
    copy_bandwidth_gbs,
    graph_ms,
    maybe_graph_ms,
    median_ms,
    paper_sinkhorn_match,
    reported,
    vs_floor,
)
from benchmarks.common import default_backend as ours_backend
from stellar_kernels.reference import hungarian_scipy, sinkhorn_match_reference

EPS, N_ITERS = 0.1, 5
IMAGES, VIEWS, K, D = 64, 8, 16, 768
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    views = pred.shape[0] // target.shape[0]
    cost = torch.cdist(pred, target.repeat_interleave(views, 0))
    return paper_sinkhorn_match(cost, EPS, N_ITERS)


def scipy_loop(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    views = pred.shape[0] // target.shape[0]
    return hungarian_scipy(torch.cdist(pred, target.repeat_interleave(views, 0)))


def ours(pred: torch.Tensor, target: torch.Tensor, rounding: str = "permutation") -> torch.Tensor:
    return sk.match_tokens(pred, target, EPS, N_ITERS, rounding, validate=False).index


def _tokens(images: int, views: int, k: int, d: int, device, dtype=torch.float32):
    pred = torch.randn(images * views, k, d, device=device).to(dtype)
    target = torch.randn(images, k, d, device=device).to(dtype)
    return pred, target


def stellar_like_tokens(
    images: int, views: int, k: int, d: int, noise: float, seed: int = 0, device="cpu"
):
    """Token sets made like STELLAR's: layer-normed tokens that share their image's content
    (image vector + 0.3 x token vector), and views = a random permutation of the target tokens
    plus Gaussian noise of std `noise`, layer-normed again. Returns (pred, target, true index)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(images, 1, d, generator=g)
    target = F.layer_norm(shared + 0.3 * torch.randn(images, k, d, generator=g), (d,))
    perm = torch.stack([torch.randperm(k, generator=g) for _ in range(images * views)])
    pred = target.repeat_interleave(views, 0).gather(1, perm[..., None].expand(-1, -1, d))
    pred = F.layer_norm(pred + noise * torch.randn(pred.shape, generator=g), (d,))
    return pred.to(device), target.to(device), perm.to(device)


# --- pytest-benchmark ---------------------------------------------------------------------------


@pytest.mark.benchmark(group="match_tokens_B512_K16_D768")
def test_match_tokens_ours_B512_K16_D768(run, device):
    """The default backend for the device (Triton on a GPU, the PyTorch path on the CPU)."""
    run(ours, *_tokens(IMAGES, VIEWS, K, D, device))


@pytest.mark.benchmark(group="match_tokens_B512_K16_D768")
def test_match_tokens_torch_reference_B512_K16_D768(run, device):
    run(torch_reference, *_tokens(IMAGES, VIEWS, K, D, device))


@pytest.mark.benchmark(group="match_tokens_B512_K16_D768")
def test_match_tokens_scipy_loop_B512_K16_D768(run, device):
    run(scipy_loop, *_tokens(IMAGES, VIEWS, K, D, device), rounds=5)


@pytest.mark.gpu
@pytest.mark.benchmark(group="match_tokens_B512_K16_D768_half")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_match_tokens_ours_B512_K16_D768_half(run, device, dtype):
    run(ours, *_tokens(IMAGES, VIEWS, K, D, device, DTYPES[dtype]), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group="match_tokens_B1024_K16_D1280")
def test_match_tokens_ours_B1024_K16_D1280(run, device):
    """ViT-H tokens, 128 images x 8 views."""
    run(ours, *_tokens(128, VIEWS, K, 1280, device), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group="match_tokens_B1024_K16_D1280")
def test_match_tokens_torch_reference_B1024_K16_D1280(run, device):
    run(torch_reference, *_tokens(128, VIEWS, K, 1280, device), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group="match_tokens_B512_K16_D768")
def test_match_tokens_torch_compile_B512_K16_D768(run, device):
    compiled = torch.compile(torch_reference)
    tokens = _tokens(IMAGES, VIEWS, K, D, device)
    compiled(*tokens)  # compile outside the timing
    run(compiled, *tokens, rounds=20)


# The paper's batch sizes (B.5): 4 ... 64 images x 8 views, against the eager reference.
@pytest.mark.benchmark(group="match_tokens_paper_batches_K16_D768")
@pytest.mark.parametrize("images", [4, 8, 16, 32, 64])
def test_match_tokens_ours_paper_batch(run, device, images):
    run(ours, *_tokens(images, VIEWS, K, D, device), rounds=5)


@pytest.mark.benchmark(group="match_tokens_paper_batches_K16_D768")
@pytest.mark.parametrize("images", [4, 8, 16, 32, 64])
def test_match_tokens_torch_reference_paper_batch(run, device, images):
    run(torch_reference, *_tokens(images, VIEWS, K, D, device), rounds=5)


# --- fixed-name figures for benchmarks/results.py -----------------------------------------------


def figures(device: torch.device, quick: bool = False) -> list[dict]:
    """match_tokens/B512_K16_D768 (vs torch_reference), match_tokens_vs_scipy/B512_K16_D768,
    match_tokens_floor/B512_K16_D768 and, on a GPU, match_tokens_floor_graph/B512_K16_D768
    with the CUDA-graph time of every launch candidate (8 images under --quick, named by the
    size measured)."""
    backend = ours_backend(device)
    images = 8 if quick else IMAGES
    size = f"B{images * VIEWS}_K{K}_D{D}"
    pred, target = _tokens(images, VIEWS, K, D, device)
    # Same plan as cdist + the reference Sinkhorn (float32 cost, so within 2e-3).
    plan = sk.match_tokens(pred, target, EPS, N_ITERS, validate=False).plan
    cost = torch.cdist(pred, target.repeat_interleave(VIEWS, 0))
    torch.testing.assert_close(
        plan, sinkhorn_match_reference(cost, EPS, N_ITERS, "argmax")[1], rtol=2e-3, atol=1e-5
    )
    timing = {} if device.type == "cuda" else {"warmup": 1, "rep": 10}
    rounds = {} if device.type == "cuda" else {"rounds": 3, "rep": 3}
    argmax_ms = median_ms(partial(ours, pred, target, "argmax"), device, **timing)
    extra = {
        "ours_backend": backend,
        "rounding": "permutation",
        "dtype": "fp32",
        "images": images,
        "views": VIEWS,
        "eps": EPS,
        "n_iters": N_ITERS,
    }
    if backend == "torch":
        extra["note"] = (
            "no CUDA device: ours is the PyTorch path (Triton runs only in the interpreter on "
            "the CPU), i.e. cdist + the same iterations + a one-to-one rounding"
        )
    ours_fn = partial(ours, pred, target)
    out = [
        compare(
            f"match_tokens/{size}",
            ours_fn,
            "torch_reference",
            partial(torch_reference, pred, target),
            device,
            ours_argmax_ms=round(argmax_ms, 6),
            **rounds,
            **extra,
        ),
        compare(
            f"match_tokens_vs_scipy/{size}",
            ours_fn,
            "scipy_loop",
            partial(scipy_loop, pred, target),
            device,
            rounds=3,
            rep=2,
            **extra,
        ),
    ]
    ours_ms = out[0]["ours_ms"]
    bandwidth = copy_bandwidth_gbs(device)
    floor_bytes = pred.numel() * pred.element_size() + target.numel() * target.element_size()
    floor_extra = {"copy_bandwidth_gbs": round(bandwidth, 1), "bytes_read": floor_bytes}
    floor_extra["floor_counts"] = "pred + target read once (outputs, 2% of it, not counted)"
    out.append(
        vs_floor(
            f"match_tokens_floor/{size}", ours_ms, floor_bytes, bandwidth, **floor_extra, **extra
        )
    )
    graph = maybe_graph_ms(ours_fn, device)
    if graph is not None:
        out.append(
            vs_floor(
                f"match_tokens_floor_graph/{size}",
                graph,
                floor_bytes,
                bandwidth,
                timing="cuda_graph",
                **candidate_graph_ms(pred, target, ours_fn),
                **floor_extra,
                **extra,
            )
        )
    return out


def candidate_graph_ms(pred: torch.Tensor, target: torch.Tensor, fn) -> dict:
    """The tuner's choice for this call and the CUDA-graph time of `fn` with each launch
    candidate ("row/<warps>": one program per view; "image<VB>/<warps>": VB views of an
    image per program, its target read once for them): which form the GPU favours."""
    mt = importlib.import_module("stellar_kernels.match_tokens")
    tuned = importlib.import_module("stellar_kernels._triton").TUNED
    key = mt.match_tokens_tune_key(pred, target)
    views = pred.shape[0] // target.shape[0]
    chosen = tuned.get(key)

    def label(config: tuple[int, int]) -> str:
        per_program, warps = config
        return f"row/{warps}" if per_program == mt.PER_ROW else f"image{per_program}/{warps}"

    by_candidate = {}
    try:
        for config in mt.match_tokens_candidates(mt.tile_edge(target.shape[1]), views):
            tuned[key] = config
            by_candidate[label(config)] = round(graph_ms(fn), 6)
    finally:
        if chosen is None:
            tuned.pop(key, None)
        else:
            tuned[key] = chosen
    return {
        "tuned": label(chosen) if chosen is not None else None,
        "cuda_graph_ms_by_candidate": by_candidate,
    }


def extra_figures(device: torch.device, quick: bool = False) -> list[dict]:
    """match_quality/B512_K16_D768 (8 images under --quick, named by the size measured)."""
    images = 8 if quick else IMAGES
    size = f"B{images * VIEWS}_K{K}_D{D}"
    return [match_quality(device, images, size, ours_backend(device))]


def match_quality(device: torch.device, images: int, size: str, backend: str) -> dict:
    """Fraction of problems whose one-to-one rounding equals scipy's exact optimum, by noise level."""
    by_noise = {}
    for noise in (1.0, 2.0, 3.0, 4.0):
        pred, target, truth = stellar_like_tokens(images, VIEWS, K, D, noise, device=device)
        index, plan = sk.match_tokens(pred, target, EPS, N_ITERS, validate=False)
        cost = torch.cdist(pred, target.repeat_interleave(VIEWS, 0))
        best = hungarian_scipy(cost)
        total = cost.gather(2, index[..., None]).sum()
        optimum = cost.gather(2, best[..., None]).sum()
        by_noise[str(noise)] = {
            "permutation_equals_optimum": round((index == best).all(1).float().mean().item(), 4),
            "argmax_equals_optimum": round(
                (plan.argmax(-1) == best).all(1).float().mean().item(), 4
            ),
            "argmax_one_to_one": round(
                (plan.argmax(-1).sort(-1).values == torch.arange(K, device=device))
                .all(1)
                .float()
                .mean()
                .item(),
                4,
            ),
            "optimum_equals_truth": round((best == truth).all(1).float().mean().item(), 4),
            "total_cost_over_optimum": round((total / optimum).item(), 6),
        }
    main = by_noise["3.0"]
    return reported(
        f"match_quality/{size}",
        fraction=main["permutation_equals_optimum"],
        noise=3.0,
        by_noise=by_noise,
        tokens="layer_norm(image + 0.3 token); view = layer_norm(permuted tokens + noise)",
        ours_backend=backend,
        eps=EPS,
        n_iters=N_ITERS,
    )
