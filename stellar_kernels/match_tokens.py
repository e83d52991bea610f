"""Fused token matching (`match_tokens`): Euclidean cost + Sinkhorn + rounding in one launch.

The tokens of V views per image are matched to that image's target tokens, with the
result of ``sinkhorn_match(cdist(pred, target.repeat_interleave(V, 0)))`` but without
materializing the repeated target or the cost matrix. This module holds the Triton
kernel, its launcher, the `torch.library` custom op and the public entry point; the
PyTorch reference is `stellar_kernels.reference.match_tokens_reference`.

`_match_tokens_kernel`: program r takes view r (image r // V), streams the token
dimension D in chunks, builds ||p||^2 + ||t||^2 - 2 p.t with `tl.dot`, then runs the
Sinkhorn iterations and the rounding of `stellar_kernels.sinkhorn_match` in registers.
With the constexpr VB >= 2 a program takes VB views of one image instead (a batched
`tl.dot`), so that each target chunk is read once for those views instead of once per
view; the launcher times both forms on a GPU (`match_tokens_candidates`).

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
    match_outputs,
    round_hungarian,
    sinkhorn_match_triton,
    store_plan_and_index,
    tile_edge,
    tile_sinkhorn_plan,
)


@triton.jit
def _match_one_row(
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


@triton.jit
def _match_image_views(
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
    VB: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """Views g' * VB ... g' * VB + VB - 1 (those below V) of one image against its target row
    (program g: image g // groups, group g' = g % groups of cdiv(V, VB)), as VB problems of
    `_match_one_row`: each target chunk and its origin are loaded once for the VB views, whose
    dots are one batched `tl.dot` against the chunk broadcast over the views.

    Each entry goes through the operations `_match_one_row` applies to it (the same
    differences, products and sums), so the two agree bitwise on chunks of the same BD where
    the batched dot keeps each product's reduction order (the interpreter does;
    tests/test_sinkhorn_match_triton.py checks it).
    """
    g = tl.program_id(0)
    groups = tl.cdiv(V, VB)
    image = g // groups
    views = (g % groups) * VB + tl.arange(0, VB)
    view_ok = views < V
    # A view beyond V has no row of its own (its number would be the next image's first
    # row): its problem number is the end of this image's rows, which the index store masks;
    # `valid` masks its plan.
    end = (image + 1) * V
    problem = tl.where(view_ok, image * V + views, end)
    ks = tl.arange(0, BK)
    ds = tl.arange(0, BD)
    p_ptrs = (
        pred_ptr
        + problem[:, None, None].to(tl.int64) * stride_pb
        + ks[None, :, None].to(tl.int64) * stride_pq
        + ds[None, None, :].to(tl.int64) * stride_pd
    )
    t_row = target_ptr + image.to(tl.int64) * stride_tb
    t_ptrs = t_row + ks[:, None].to(tl.int64) * stride_tt + ds[None, :].to(tl.int64) * stride_td
    o_ptrs = t_row + ds[None, :].to(tl.int64) * stride_td  # target token 0, the origin
    p_rows = view_ok[:, None, None] & (ks[None, :, None] < Q)
    dot = tl.zeros((VB, BK, BK), dtype=tl.float32)
    p_norm = tl.zeros((VB, BK), dtype=tl.float32)
    t_norm = tl.zeros((BK,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d_ok = (d0 + ds)[None, :] < D
        origin = tl.load(o_ptrs, mask=d_ok, other=0.0).to(tl.float32)
        t = tl.load(t_ptrs, mask=(ks[:, None] < T) & d_ok, other=0.0).to(tl.float32) - origin
        p = tl.load(p_ptrs, mask=p_rows & d_ok[None, :, :], other=0.0).to(tl.float32)
        p = p - origin[None, :, :]
        t_all = tl.broadcast_to(tl.trans(t)[None, :, :], (VB, BD, BK))
        dot = tl.dot(p, t_all, dot, input_precision="tf32x3")
        p_norm += tl.sum(p * p, axis=2)
        t_norm += tl.sum(t * t, axis=1)
        p_ptrs += BD * stride_pd
        t_ptrs += BD * stride_td
        o_ptrs += BD * stride_td
    sq = tl.maximum(p_norm[:, :, None] + t_norm[None, None, :] - 2.0 * dot, 0.0)
    c = tl.sqrt_rn(sq) * scale
    valid = p_rows & (ks[None, None, :] < T)
    allowed = valid & (c != float("inf"))
    plan = tile_sinkhorn_plan(c, allowed, n_iters, VB, BK, BK)
    store_plan_and_index(
        plan_ptr, index_ptr, plan, valid, allowed, problem, end, Q, T, permutation, VB, BK
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
    VB: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """VB == PER_ROW (0): one pred row per program (`_match_one_row`, grid B * V). VB >= 2:
    VB views of one image per program (`_match_image_views`, grid B * cdiv(V, VB)). One
    kernel with a constexpr, so each binary holds one form only."""
    if VB == 0:
        _match_one_row(
            pred_ptr, target_ptr, plan_ptr, index_ptr, V, Q, T, D,
            stride_pb, stride_pq, stride_pd, stride_tb, stride_tt, stride_td,
            scale, n_iters, permutation, BK, BD,
        )  # fmt: skip
    else:
        _match_image_views(
            pred_ptr, target_ptr, plan_ptr, index_ptr, V, Q, T, D,
            stride_pb, stride_pq, stride_pd, stride_tb, stride_tt, stride_td,
            scale, n_iters, permutation, VB, BK, BD,
        )  # fmt: skip


# ----------------------------------------------------------------------------- launcher


PER_ROW = 0
"""Views per program (the constexpr VB) that selects the per-row form of `_match_tokens_kernel`."""

IMAGE_CONFIGS = {16: [(2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (16, 8)], 32: [(2, 4), (4, 8)]}
"""(views per program VB, num_warps) of the per-image form by tile: those that ptxas compiles
for sm_80 and sm_90 without spilling (158-255 registers with the chunk of
`match_tokens_block_d`); 16 warps would cap a thread at 128 registers and spill. Larger
tiles keep the per-row form only: their register tiles are full with one problem."""


def match_tokens_candidates(tile: int, views: int) -> list[tuple[int, int]]:
    """(views per program, num_warps) that the fused token kernels may run with; the first,
    the per-row kernel with its fewest warps, is the untimed default.

    Views per program PER_ROW: one program per pred row. VB >= 2: VB views of one image per
    program (its target read once for them); only where an image has more than one view,
    and VB at most V rounded up to a power of two (beyond that a program would hold only
    masked views)."""
    per_row = {16: [1, 2, 4, 8], 32: [4, 8], 64: [8], 128: [16]}[tile]
    candidates = [(PER_ROW, warps) for warps in per_row]
    if views > 1:
        most = triton.next_power_of_2(views)
        candidates += [(vb, w) for vb, w in IMAGE_CONFIGS.get(tile, []) if vb <= most]
    return candidates


def match_tokens_block_d(tile: int, views_per_program: int = PER_ROW, warps: int = 1) -> int:
    """Chunk of the token dimension streamed per step: smaller for larger tiles (registers).
    The per-image form's chunk of its VB views' pred tokens is at most 8 floats per thread
    (more spilled in the batched tf32x3 dot on sm_90), and at least 16 (tl.dot's inner
    dimension); so its chunks, and with them the order of its sums over D, differ from the
    per-row form's (64 at tiles 16 and 32)."""
    if views_per_program == PER_ROW:
        return {16: 64, 32: 64, 64: 32, 128: 16}[tile]
    return max(16, min(64, 256 * warps // (views_per_program * tile)))


def match_tokens_tune_key(pred: torch.Tensor, target: torch.Tensor) -> tuple:
    """The tuning key of a match_tokens call (`tune_key`). V is in it: it decides which
    per-image candidates exist."""
    rows, q, d = pred.shape
    images, t, _ = target.shape
    views = rows // images
    return tune_key("match_tokens", pred.device, pred.dtype, rows, q, t, d, views, target.dtype)


def match_tokens_triton(
    pred: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    n_iters: int,
    rounding: str,
    one_allocation: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton match_tokens: (index (B*V, Q), plan (B*V, Q, T)); any strides, no repeated
    target. The outputs come from `match_outputs` (`one_allocation`)."""
    rows, q, d = pred.shape
    images, t, _ = target.shape
    if t > TILE_LIMIT:
        # Beyond one register tile: the cost goes through memory, then the loop path.
        cost = euclidean_cost_reference(pred, target)
        return sinkhorn_match_triton(cost, eps, n_iters, rounding, one_allocation)
    index, plan = match_outputs(rows, q, t, pred.device, one_allocation)
    if rows * q == 0:
        return index, plan
    tile = tile_edge(t)
    views = rows // images
    scale = LOG2E / eps
    permutation = int(rounding == "permutation")

    def launch(cfg: tuple[int, int]) -> None:
        per_program, warps = cfg
        grid = rows if per_program == PER_ROW else images * triton.cdiv(views, per_program)
        _match_tokens_kernel[(grid,)](
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
            VB=per_program,
            BK=tile,
            BD=match_tokens_block_d(tile, per_program, warps),
            num_warps=warps,
        )

    with on_device(pred.device):
        key = match_tokens_tune_key(pred, target)
        launch(autotune(key, match_tokens_candidates(tile, views), launch, pred.device))
    return index, plan


@torch.library.custom_op("stellar_kernels::match_tokens", mutates_args=())
def _match_tokens_op(
    pred: torch.Tensor, target: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> tuple[torch.Tensor, torch.Tensor]:
    # Two allocations: a custom op's outputs must not alias each other (see match_outputs).
    return match_tokens_triton(pred, target, eps, n_iters, rounding, one_allocation=False)


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
