"""Fused token matching (`match_tokens`): Euclidean cost + Sinkhorn + rounding in one launch.

The tokens of V views per image are matched to that image's target tokens, with the
result of ``sinkhorn_match(cdist(pred, target.repeat_interleave(V, 0)))`` but without
materializing the repeated target or the cost matrix. This module holds the Triton
kernel, its launcher, the `torch.library` custom op and the public entry point; the
PyTorch reference is `stellar_kernels.reference.match_tokens_reference`.

`_match_tokens_kernel`: program r takes view r (image r // V), streams the token
dimension D in chunks, builds ||p||^2 + ||t||^2 - 2 p.t with `tl.dot`, then runs the
Sinkhorn iterations and the rounding of `stellar_kernels.sinkhorn_match` in registers.

Accuracy. Token 0 of the image's target is subtracted from both sides first (distances
do not change): tokens that share a large common component, as ViT tokens share their
mean, would otherwise cancel catastrophically in ||p||^2 + ||t||^2 - 2 p.t. The
differences are formed in float32 whatever the input dtype (a difference of two half
values is exact there) and their dots use "tf32x3" (three tensor-core products of a
split operand, about float32 accuracy). Plain TF32, or rounding the differences back to
a half type, would move the costs by more than the gaps the matching must resolve.
"""

from __future__ import annotations

import math

import torch

from ._backend import resolve_backend
from ._triton import autotune, bound_launch, on_device, tl, triton, tune_key
from ._validation import COST_RANGE, check_finite, check_same_device, check_tensor, checking
from .reference import euclidean_cost_reference, match_tokens_reference
from .sinkhorn_match import (
    LOG2E,
    MATCH_DTYPES,
    TILE_LIMIT,
    MatchResult,
    check_hyper,
    kernel_rounding,
    round_hungarian,
    sinkhorn_match_triton,
    store_plan_and_index,
    tile_edge,
    tile_sinkhorn_plan,
)


@bound_launch
@triton.jit(do_not_specialize=["permutation"])
def _match_tokens_kernel(
    pred_ptr,
    target_ptr,
    plan_ptr,
    index_ptr,
    V,
    Q,
    T,
    D,
    stride_pb,
    stride_pq,
    stride_pd,
    stride_tb,
    stride_tt,
    stride_td,
    scale,
    n_iters,
    permutation,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """Row r of pred (view r % V of image r // V) against target row r // V: the Euclidean
    cost of the differences to target token 0, over D in BD chunks, then Sinkhorn and rounding."""
    r = tl.program_id(0)
    image = r // V
    ks = tl.arange(0, BK)
    ds = tl.arange(0, BD)
    p_ptrs = (
        pred_ptr
        + r.to(tl.int64) * stride_pb
        + ks[:, None].to(tl.int64) * stride_pq
        + ds[None, :].to(tl.int64) * stride_pd
    )
    t_row = target_ptr + image.to(tl.int64) * stride_tb
    t_ptrs = t_row + ks[:, None].to(tl.int64) * stride_tt + ds[None, :].to(tl.int64) * stride_td
    o_ptrs = t_row + ds[None, :].to(tl.int64) * stride_td  # target token 0, the origin
    dot = tl.zeros((BK, BK), dtype=tl.float32)
    p_norm = tl.zeros((BK,), dtype=tl.float32)
    t_norm = tl.zeros((BK,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d_ok = (d0 + ds)[None, :] < D
        origin = tl.load(o_ptrs, mask=d_ok, other=0.0).to(tl.float32)
        p = tl.load(p_ptrs, mask=(ks[:, None] < Q) & d_ok, other=0.0).to(tl.float32) - origin
        t = tl.load(t_ptrs, mask=(ks[:, None] < T) & d_ok, other=0.0).to(tl.float32) - origin
        dot = tl.dot(p, tl.trans(t), dot, input_precision="tf32x3")
        p_norm += tl.sum(p * p, axis=1)
        t_norm += tl.sum(t * t, axis=1)
        p_ptrs += BD * stride_pd
        t_ptrs += BD * stride_td
        o_ptrs += BD * stride_td
    sq = tl.maximum(p_norm[:, None] + t_norm[None, :] - 2.0 * dot, 0.0)
    c = (tl.sqrt_rn(sq) * scale)[None, :, :]
    problem = r + tl.arange(0, 1)
    valid = (ks[None, :, None] < Q) & (ks[None, None, :] < T)
    allowed = valid & (c != float("inf"))
    plan = tile_sinkhorn_plan(c, allowed, n_iters, 1, BK, BK)
    store_plan_and_index(
        plan_ptr, index_ptr, plan, valid, allowed, problem, r + 1, Q, T, permutation, 1, BK
    )


# ----------------------------------------------------------------------------- launcher


def match_tokens_candidates(tile: int) -> list[int]:
    """num_warps that the fused token kernel may run with (first: the untimed default)."""
    return {16: [1, 2, 4, 8], 32: [4, 8], 64: [8], 128: [16]}[tile]


def match_tokens_block_d(tile: int) -> int:
    """Chunk of the token dimension streamed per step: smaller for larger tiles (registers)."""
    return {16: 64, 32: 64, 64: 32, 128: 16}[tile]


def match_tokens_triton(
    pred: torch.Tensor, target: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton match_tokens: (index (B*V, Q), plan (B*V, Q, T)); any strides, no repeated target."""
    rows, q, d = pred.shape
    images, t, _ = target.shape
    if t > TILE_LIMIT:
        # Beyond one register tile: the cost goes through memory, then the loop path.
        return sinkhorn_match_triton(euclidean_cost_reference(pred, target), eps, n_iters, rounding)
    plan = torch.empty((rows, q, t), dtype=torch.float32, device=pred.device)
    index = torch.empty((rows, q), dtype=torch.int64, device=pred.device)
    if rows * q == 0:
        return index, plan
    tile = tile_edge(t)
    views = rows // images
    scale = LOG2E / eps
    permutation = int(rounding == "permutation")

    def launch(warps: int) -> None:
        _match_tokens_kernel[(rows,)](
            pred,
            target,
            plan,
            index,
            views,
            q,
            t,
            d,
            *pred.stride(),
            *target.stride(),
            scale,
            n_iters,
            permutation,
            BK=tile,
            BD=match_tokens_block_d(tile),
            num_warps=warps,
        )

    with on_device(pred.device):
        key = tune_key("match_tokens", pred.device, pred.dtype, rows, q, t, d, target.dtype)
        launch(autotune(key, match_tokens_candidates(tile), launch, pred.device))
    return index, plan


@torch.library.custom_op("stellar_kernels::match_tokens", mutates_args=())
def _match_tokens_op(
    pred: torch.Tensor, target: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return match_tokens_triton(pred, target, eps, n_iters, rounding)


@_match_tokens_op.register_fake
def _match_tokens_fake(pred, target, eps, n_iters, rounding):
    rows, q, _ = pred.shape
    t = target.shape[1]
    return (
        pred.new_empty((rows, q), dtype=torch.int64),
        pred.new_empty((rows, q, t), dtype=torch.float32),
    )


# ----------------------------------------------------------------------------- public API


def token_limit(dim: int, eps: float) -> float:
    """Largest |token entry| match_tokens takes: two tokens M apart per entry are 2 M sqrt(D)
    apart, and both that distance squared (at most float32's max / 4 here) and the distance
    / eps (at most COST_RANGE, as sinkhorn_match takes) must stay within float32."""
    root = math.sqrt(max(dim, 1))
    return min(math.sqrt(torch.finfo(torch.float32).max) / 4, COST_RANGE * eps / 2) / root


def match_tokens(
    pred: torch.Tensor,
    target: torch.Tensor,
    eps: float = 0.1,
    n_iters: int = 5,
    rounding: str = "permutation",
    *,
    backend: str | None = None,
    validate: bool = True,
) -> MatchResult:
    """Matches the tokens of V views per image to the tokens of that image's target.

    Args:
        pred: (B*V, Q, D) tokens; row b*V + v is view v of image b.
        target: (B, T, D) tokens, Q <= T; float16/bfloat16/float32, either dtype.
        eps, n_iters, rounding, backend: as in `sinkhorn_match`. No pair is forbidden
            here, so "hungarian" is the one-to-one assignment of largest total plan mass,
            at the price of one batched exact solve (`stellar_kernels.hungarian_match` on
            the tokens' device, no host round trip on CUDA) after the fused kernel. The
            greedy "permutation" returns the same where the row-wise argmax is one-to-one
            (the usual case for views close to their target) and can fall short of that
            mass where it repeats a target.
        validate: raise ValueError if `pred` or `target` holds NaN or an infinity, or
            entries so large that squared distances, or distances / eps, would leave
            float32 (|x| sqrt(D) beyond 4.6e18, or beyond 5e36 * eps; one host read).
            Skipped while torch.compile traces and while a CUDA graph captures, and
            everywhere with validate=False. Tokens that pass give finite costs, so no
            pair is ever forbidden.

    Returns:
        The same as ``sinkhorn_match(torch.cdist(pred, target.repeat_interleave(V, 0)))``:
        MatchResult(index (B*V, Q) int64 in [0, T), plan (B*V, Q, T) float32). Both are
        targets: they never require grad, on any backend.
    """
    check_tensor("pred", pred, (3,), MATCH_DTYPES)
    check_tensor("target", target, (3,), MATCH_DTYPES)
    check_same_device(pred=pred, target=target)
    images = target.shape[0]
    if (pred.shape[0] % images != 0) if images else pred.shape[0] != 0:
        raise ValueError(
            f"pred's batch must be a multiple (V views) of target's: pred {tuple(pred.shape)}, "
            f"target {tuple(target.shape)}"
        )
    if pred.shape[2] != target.shape[2]:
        raise ValueError(
            f"pred and target must have the same token dimension D: pred {tuple(pred.shape)}, "
            f"target {tuple(target.shape)}"
        )
    if pred.shape[1] > target.shape[1]:
        raise ValueError(
            f"pred must have no more tokens than target (Q <= T): pred {tuple(pred.shape)}, "
            f"target {tuple(target.shape)}"
        )
    eps, n_iters, rounding = check_hyper(eps, n_iters, rounding)
    impl = resolve_backend(
        "match_tokens", backend, pred.device, ("torch", "triton"), "triton", "torch"
    )
    if checking(validate, pred):
        limit = token_limit(pred.shape[2], eps)
        why = "their squared distances, or distances / eps, would leave float32"
        check_finite(why, pred=(pred, limit), target=(target, limit))
    if images == 0:  # an empty batch: nothing to match
        return MatchResult(
            pred.new_empty((0, pred.shape[1]), dtype=torch.int64),
            pred.new_empty((0, pred.shape[1], target.shape[1]), dtype=torch.float32),
        )
    pred, target = pred.detach(), target.detach()
    computed = kernel_rounding(rounding)
    if impl == "triton":
        if torch.compiler.is_compiling():
            index, plan = torch.ops.stellar_kernels.match_tokens(
                pred, target, eps, n_iters, computed
            )
        else:
            index, plan = match_tokens_triton(pred, target, eps, n_iters, computed)
    else:
        index, plan = match_tokens_reference(pred, target, eps, n_iters, computed)
    if rounding == "hungarian":
        index = round_hungarian(plan)
    return MatchResult(index, plan)
