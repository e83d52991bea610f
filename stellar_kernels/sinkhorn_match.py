"""Sinkhorn optimal-transport matching of token sets (paper eq. 7-9).

`sinkhorn_match` solves a batch of entropic OT problems with unit row and
column marginals in the log domain and rounds each plan to an index;
`match_tokens` does the same on the Euclidean cost between token sets without
materializing the repeated target or the cost matrix.

This module holds every implementation of the two operators:

* the PyTorch reference (`sinkhorn_match_reference`, `match_tokens_reference`);
* the Triton kernels: `_sinkhorn_tile_kernel` solves one or several whole
  Q x T problems (T <= 128) in registers per program, `_sinkhorn_loop_kernel`
  solves one larger problem per program by streaming tiles of the cost,
  `_match_tokens_kernel` builds the Euclidean cost of one view with `tl.dot`
  while streaming the token dimension, then runs the same Sinkhorn iterations
  and rounding, all in one launch;
* their registration as `torch.library` custom ops (`stellar_kernels::sinkhorn_match`,
  `stellar_kernels::match_tokens`) with fake implementations for torch.compile;
* the public entry points.

All Sinkhorn arithmetic is float32 in base 2: with c = C * log2(e) / eps the
duals obey u_i = -log2 sum_j 2^(v_j - c_ij), v_j = -log2 sum_i 2^(u_i - c_ij),
and plan = 2^(u_i + v_j - c_ij): the updates of DESIGN.md section 3 with the duals
scaled by log2(e) / eps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from ._backend import resolve_backend
from ._validation import (
    check_choice,
    check_iterations,
    check_not_nan,
    check_positive,
    check_rows_fit,
    check_same_device,
    check_tensor,
)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the Triton paths are unavailable; the PyTorch reference still works
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for `triton` so that the kernel definitions below stay importable."""

        @staticmethod
        def jit(fn=None, **options):
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()

ROUNDINGS = ("permutation", "argmax")
MATCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

TILE_LIMIT = 128
"""Largest T that one program of the register-tile kernels solves; larger T takes the loop path."""

DEFAULT_CUDA_BACKEND = "triton" if HAS_TRITON else "torch"
_LOG2E = 1.4426950408889634


class MatchResult(NamedTuple):
    index: torch.Tensor
    """(B, Q) int64: the target chosen for each query row."""
    plan: torch.Tensor
    """(B, Q, T) float32: the transport plan after n_iters."""


# ----------------------------------------------------------------------------- reference


def sinkhorn_plan_reference(cost: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """Plan exp((u_i + v_j - C_ij) / eps) after n_iters log-domain updates, float32, (B, Q, T)."""
    c = cost.float() / eps
    u = c.new_zeros(c.shape[:-1])  # u / eps, (B, Q)
    v = c.new_zeros(c.shape[:-2] + c.shape[-1:])  # v / eps, (B, T)
    for _ in range(n_iters):
        u = -torch.logsumexp(v.unsqueeze(-2) - c, dim=-1)
        v = -torch.logsumexp(u.unsqueeze(-1) - c, dim=-2)
    return torch.exp(u.unsqueeze(-1) + v.unsqueeze(-2) - c)


def round_plan(plan: torch.Tensor, rounding: str) -> torch.Tensor:
    """Index (B, Q) from a plan (B, Q, T): row argmax, or a greedy one-to-one rounding.

    The greedy rounding takes the largest remaining entry, assigns it and strikes
    its row and column, Q times. When the row-wise argmax is already one-to-one,
    every row's maximum survives the strikes, so both roundings agree.
    """
    if rounding == "argmax":
        return plan.argmax(dim=-1)
    b, q, t = plan.shape
    work = plan.clone()
    index = torch.empty(b, q, dtype=torch.long, device=plan.device)
    batch = torch.arange(b, device=plan.device)
    for _ in range(q):
        flat = work.view(b, q * t).argmax(dim=1)
        rows, cols = flat // t, flat % t
        index[batch, rows] = cols
        work[batch, rows, :] = -1.0
        work[batch, :, cols] = -1.0
    return index


def sinkhorn_match_reference(
    cost: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> MatchResult:
    plan = sinkhorn_plan_reference(cost, eps, n_iters)
    return MatchResult(round_plan(plan, rounding), plan)


def euclidean_cost_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cdist(pred, target.repeat_interleave(V, 0)) in float32, using a broadcast view of target."""
    views = pred.shape[0] // target.shape[0]
    p = pred.float().view(target.shape[0], views, *pred.shape[1:])
    t = target.float().unsqueeze(1)
    return torch.cdist(p, t).view(pred.shape[0], pred.shape[1], target.shape[1])


def match_tokens_reference(
    pred: torch.Tensor, target: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> MatchResult:
    return sinkhorn_match_reference(euclidean_cost_reference(pred, target), eps, n_iters, rounding)


# ----------------------------------------------------------------------------- Triton kernels
#
# Every kernel works on float32 costs scaled by log2(e) / eps. Rows of a tile are
# queries (Q), columns are targets (T); entries outside the problem are masked
# out of every reduction (-inf in a log-sum-exp, below -1 in a rounding max).


@triton.jit
def _log2sumexp2(x, AXIS: tl.constexpr):
    """log2(sum(2^x)) along AXIS; -inf where every entry is -inf."""
    m = tl.max(x, axis=AXIS)
    finite = m != float("-inf")
    shift = tl.where(finite, m, 0.0)
    s = tl.sum(tl.exp2(x - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return tl.where(finite, shift + tl.log2(tl.where(finite, s, 1.0)), float("-inf"))


@triton.jit
def _sinkhorn_plan(c, valid, n_iters, P: tl.constexpr, BQ: tl.constexpr, BT: tl.constexpr):
    """Plan 2^(u + v - c) of P problems (P, BQ, BT) after n_iters dual updates; 0 outside `valid`."""
    u = tl.zeros((P, BQ), dtype=tl.float32)
    v = tl.zeros((P, BT), dtype=tl.float32)
    for _ in range(n_iters):
        u = -_log2sumexp2(tl.where(valid, v[:, None, :] - c, float("-inf")), 2)
        v = -_log2sumexp2(tl.where(valid, u[:, :, None] - c, float("-inf")), 1)
    return tl.where(valid, tl.exp2(u[:, :, None] + v[:, None, :] - c), 0.0)


@triton.jit
def _round_argmax(plan, valid, cols, BT: tl.constexpr):
    """Row-wise argmax (lowest column among equal maxima), (P, BQ) int32."""
    work = tl.where(valid, plan, -2.0)
    best = tl.max(work, axis=2)
    return tl.min(tl.where(work == best[:, :, None], cols, BT), axis=2)


@triton.jit
def _round_greedy(
    plan, valid, rows, cols, n_rows, P: tl.constexpr, BQ: tl.constexpr, BT: tl.constexpr
):
    """One-to-one rounding: n_rows times take the largest remaining entry (lowest flat index
    among equal ones, as `round_plan`), assign it and strike its row and column."""
    work = tl.where(valid, plan, -2.0)
    key = rows * BT + cols  # orders entries like the flat index row * T + col
    index = tl.zeros((P, BQ), dtype=tl.int32)
    row_ids = tl.arange(0, BQ)[None, :]
    for _ in range(n_rows):
        best = tl.max(tl.max(work, axis=2), axis=1)
        flat = tl.min(tl.min(tl.where(work == best[:, None, None], key, BQ * BT), axis=2), axis=1)
        r = flat // BT
        c = flat % BT
        index = tl.where(row_ids == r[:, None], c[:, None], index)
        work = tl.where((rows == r[:, None, None]) | (cols == c[:, None, None]), -1.0, work)
    return index


@triton.jit
def _store_plan_and_index(
    plan_ptr,
    index_ptr,
    plan,
    valid,
    problem,
    B,
    Q,
    T,
    permutation,
    P: tl.constexpr,
    BK: tl.constexpr,
):
    """Stores (P, BK, BK) plans of problems `problem` (P,) and their rounded indices."""
    b = problem[:, None, None].to(tl.int64)
    rows = tl.arange(0, BK)[None, :, None]
    cols = tl.arange(0, BK)[None, None, :]
    tl.store(plan_ptr + b * Q * T + rows * T + cols, plan, mask=valid)
    index = _round_argmax(plan, valid, cols, BK)
    if permutation:
        # When the row-wise argmax is one-to-one the greedy rounding returns it (see
        # `round_plan`; ties included), so the K greedy steps run only when a column repeats.
        hits = tl.sum(((index[:, :, None] == cols) & valid).to(tl.int32), axis=1)
        if tl.max(tl.max(hits, axis=1), axis=0) > 1:
            index = _round_greedy(plan, valid, rows, cols, Q, P, BK, BK)
    b2 = problem[:, None].to(tl.int64)
    rows2 = tl.arange(0, BK)[None, :]
    tl.store(index_ptr + b2 * Q + rows2, index.to(tl.int64), mask=(b2 < B) & (rows2 < Q))


@triton.jit(do_not_specialize=["permutation"])
def _sinkhorn_tile_kernel(
    cost_ptr,
    plan_ptr,
    index_ptr,
    B,
    Q,
    T,
    stride_b,
    stride_q,
    stride_t,
    scale,
    n_iters,
    permutation,
    P: tl.constexpr,
    BK: tl.constexpr,
):
    """P whole problems (Q <= T <= BK) per program, held in registers as one (P, BK, BK) tile."""
    problem = tl.program_id(0) * P + tl.arange(0, P)
    b = problem[:, None, None].to(tl.int64)
    rows = tl.arange(0, BK)[None, :, None]
    cols = tl.arange(0, BK)[None, None, :]
    valid = (b < B) & (rows < Q) & (cols < T)
    offs = b * stride_b + rows.to(tl.int64) * stride_q + cols.to(tl.int64) * stride_t
    c = tl.load(cost_ptr + offs, mask=valid, other=0.0).to(tl.float32) * scale
    plan = _sinkhorn_plan(c, valid, n_iters, P, BK, BK)
    _store_plan_and_index(plan_ptr, index_ptr, plan, valid, problem, B, Q, T, permutation, P, BK)


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
    WIDEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Row r of pred (view r % V of image r // V) against target row r // V: Euclidean cost
    ||p||^2 + ||t||^2 - 2 p.t built over D in BD chunks with tl.dot, then Sinkhorn and rounding."""
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
    t_ptrs = (
        target_ptr
        + image.to(tl.int64) * stride_tb
        + ks[:, None].to(tl.int64) * stride_tt
        + ds[None, :].to(tl.int64) * stride_td
    )
    dot = tl.zeros((BK, BK), dtype=tl.float32)
    p_norm = tl.zeros((BK,), dtype=tl.float32)
    t_norm = tl.zeros((BK,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d_ok = (d0 + ds)[None, :] < D
        p = tl.load(p_ptrs, mask=(ks[:, None] < Q) & d_ok, other=0.0)
        t = tl.load(t_ptrs, mask=(ks[:, None] < T) & d_ok, other=0.0)
        pf = p.to(tl.float32)
        tf = t.to(tl.float32)
        if WIDEN:  # the interpreter multiplies bfloat16 as raw integers; widen for it only
            p = pf
            t = tf
        # float32 tokens: "tf32x3" (three tensor-core products of a split operand) keeps about
        # float32 accuracy, where plain TF32 would move the costs by ~1e-3 relative; the
        # FMA path of "ieee" costs three times the tensor-core one at D = 768 (see NOTES.md).
        dot = tl.dot(p, tl.trans(t), dot, input_precision=PRECISION)
        p_norm += tl.sum(pf * pf, axis=1)
        t_norm += tl.sum(tf * tf, axis=1)
        p_ptrs += BD * stride_pd
        t_ptrs += BD * stride_td
    sq = tl.maximum(p_norm[:, None] + t_norm[None, :] - 2.0 * dot, 0.0)
    c = (tl.sqrt_rn(sq) * scale)[None, :, :]
    problem = r + tl.arange(0, 1)
    valid = (ks[None, :, None] < Q) & (ks[None, None, :] < T)
    plan = _sinkhorn_plan(c, valid, n_iters, 1, BK, BK)
    _store_plan_and_index(
        plan_ptr, index_ptr, plan, valid, problem, r + 1, Q, T, permutation, 1, BK
    )


@triton.jit
def _lse_update(m, s, x, AXIS: tl.constexpr):
    """Online log2-sum-exp2: folds the tile x into the running (max m, scaled sum s) along AXIS."""
    m_new = tl.maximum(m, tl.max(x, axis=AXIS))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp2(m - shift) + tl.sum(tl.exp2(x - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return m_new, s


@triton.jit
def _lse_finish(m, s):
    finite = m != float("-inf")
    return tl.where(finite, m + tl.log2(tl.where(finite, s, 1.0)), float("-inf"))


@triton.jit
def _cost_tile(cost_ptr, rows, cols, Q, T, stride_q, stride_t, scale):
    mask = (rows[:, None] < Q) & (cols[None, :] < T)
    offs = rows[:, None].to(tl.int64) * stride_q + cols[None, :].to(tl.int64) * stride_t
    return tl.load(cost_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale, mask


@triton.jit
def _row_best(
    plan_ptr, taken_ptr, rows, T, Q, BQ: tl.constexpr, BT: tl.constexpr, SKIP: tl.constexpr
):
    """Per row: largest plan entry (over columns not taken when SKIP) and the lowest column holding it."""
    best = tl.full((BQ,), float("-inf"), tl.float32)
    arg = tl.zeros((BQ,), dtype=tl.int32)
    for t0 in range(0, T, BT):
        cols = t0 + tl.arange(0, BT)
        mask = (rows[:, None] < Q) & (cols[None, :] < T)
        if SKIP:
            taken = tl.load(taken_ptr + cols, mask=cols < T, other=1)
            mask = mask & (taken == 0)[None, :]
        offs = rows[:, None].to(tl.int64) * T + cols[None, :]
        x = tl.load(plan_ptr + offs, mask=mask, other=float("-inf"))
        m = tl.max(x, axis=1)
        a = tl.min(tl.where(x == m[:, None], cols[None, :], T), axis=1)
        better = m > best
        arg = tl.where(better, a, arg)
        best = tl.where(better, m, best)
    return best, arg


@triton.jit(do_not_specialize=["permutation"])
def _sinkhorn_loop_kernel(
    cost_ptr,
    plan_ptr,
    index_ptr,
    u_ptr,
    v_ptr,
    best_ptr,
    arg_ptr,
    taken_ptr,
    Q,
    T,
    stride_b,
    stride_q,
    stride_t,
    scale,
    n_iters,
    permutation,
    BQ: tl.constexpr,
    BT: tl.constexpr,
):
    """One problem of any size per program: the duals live in global scratch (u, v), the cost is
    re-read tile by tile (from L2) for each half-iteration, with an online log-sum-exp."""
    b = tl.program_id(0).to(tl.int64)
    cost_ptr += b * stride_b
    plan_ptr += b * Q * T
    index_ptr += b * Q
    u_ptr += b * Q
    best_ptr += b * Q
    arg_ptr += b * Q
    v_ptr += b * T
    taken_ptr += b * T
    q_ids = tl.arange(0, BQ)
    t_ids = tl.arange(0, BT)
    for t0 in range(0, T, BT):
        cols = t0 + t_ids
        tl.store(v_ptr + cols, tl.zeros((BT,), dtype=tl.float32), mask=cols < T)
        tl.store(taken_ptr + cols, tl.zeros((BT,), dtype=tl.int32), mask=cols < T)
    tl.debug_barrier()
    for _ in range(n_iters):
        for q0 in range(0, Q, BQ):
            rows = q0 + q_ids
            m = tl.full((BQ,), float("-inf"), tl.float32)
            s = tl.zeros((BQ,), dtype=tl.float32)
            for t0 in range(0, T, BT):
                cols = t0 + t_ids
                c, mask = _cost_tile(cost_ptr, rows, cols, Q, T, stride_q, stride_t, scale)
                v = tl.load(v_ptr + cols, mask=cols < T, other=0.0)
                m, s = _lse_update(m, s, tl.where(mask, v[None, :] - c, float("-inf")), 1)
            tl.store(u_ptr + rows, -_lse_finish(m, s), mask=rows < Q)
        tl.debug_barrier()
        for t0 in range(0, T, BT):
            cols = t0 + t_ids
            m = tl.full((BT,), float("-inf"), tl.float32)
            s = tl.zeros((BT,), dtype=tl.float32)
            for q0 in range(0, Q, BQ):
                rows = q0 + q_ids
                c, mask = _cost_tile(cost_ptr, rows, cols, Q, T, stride_q, stride_t, scale)
                u = tl.load(u_ptr + rows, mask=rows < Q, other=0.0)
                m, s = _lse_update(m, s, tl.where(mask, u[:, None] - c, float("-inf")), 0)
            tl.store(v_ptr + cols, -_lse_finish(m, s), mask=cols < T)
        tl.debug_barrier()
    for q0 in range(0, Q, BQ):
        rows = q0 + q_ids
        u = tl.load(u_ptr + rows, mask=rows < Q, other=0.0)
        for t0 in range(0, T, BT):
            cols = t0 + t_ids
            c, mask = _cost_tile(cost_ptr, rows, cols, Q, T, stride_q, stride_t, scale)
            v = tl.load(v_ptr + cols, mask=cols < T, other=0.0)
            offs = rows[:, None].to(tl.int64) * T + cols[None, :]
            tl.store(plan_ptr + offs, tl.exp2(u[:, None] + v[None, :] - c), mask=mask)
    tl.debug_barrier()
    # Rounding reads the plan back. Each row's best remaining entry is cached in (best, arg).
    for q0 in range(0, Q, BQ):
        rows = q0 + q_ids
        best, arg = _row_best(plan_ptr, taken_ptr, rows, T, Q, BQ, BT, False)
        if permutation:
            tl.store(best_ptr + rows, best, mask=rows < Q)
            tl.store(arg_ptr + rows, arg, mask=rows < Q)
        else:
            tl.store(index_ptr + rows, arg.to(tl.int64), mask=rows < Q)
    if permutation:
        tl.debug_barrier()
        for _ in range(Q):
            # The largest remaining entry: the best row (lowest among equals) and its column.
            top = tl.max(tl.full((BQ,), float("-inf"), tl.float32), axis=0)
            top_row = tl.min(tl.zeros((BQ,), dtype=tl.int32), axis=0)
            for q0 in range(0, Q, BQ):
                rows = q0 + q_ids
                row_best = tl.load(best_ptr + rows, mask=rows < Q, other=float("-inf"))
                block_top = tl.max(row_best, axis=0)
                block_row = tl.min(tl.where(row_best == block_top, rows, Q), axis=0)
                better = block_top > top
                top_row = tl.where(better, block_row, top_row)
                top = tl.where(better, block_top, top)
            col = tl.load(arg_ptr + top_row)
            tl.debug_barrier()
            tl.store(index_ptr + top_row, col.to(tl.int64))
            tl.store(best_ptr + top_row, float("-inf"))
            tl.store(taken_ptr + col, 1)
            tl.debug_barrier()
            # Rows whose cached best was that column look again among the columns left.
            for q0 in range(0, Q, BQ):
                rows = q0 + q_ids
                row_best = tl.load(best_ptr + rows, mask=rows < Q, other=float("-inf"))
                row_arg = tl.load(arg_ptr + rows, mask=rows < Q, other=-1)
                stale = (row_arg == col) & (row_best != float("-inf"))
                if tl.max(stale.to(tl.int32), axis=0) > 0:
                    best, arg = _row_best(plan_ptr, taken_ptr, rows, T, Q, BQ, BT, True)
                    tl.store(best_ptr + rows, best, mask=stale)
                    tl.store(arg_ptr + rows, arg, mask=stale)
            tl.debug_barrier()


# ----------------------------------------------------------------------------- launchers

LOOP_BLOCK = 64
"""Tile edge of the loop path (T > TILE_LIMIT)."""
LOOP_WARPS = 4


def _tile(n: int) -> int:
    """Power-of-two tile edge >= n and >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, 1 << max(n - 1, 0).bit_length())


def sinkhorn_candidates(tile: int) -> list[tuple[int, int]]:
    """(problems per program, num_warps) that the tile kernel may run with; the first is the
    default when no timing is possible (CPU interpreter, CUDA-graph capture)."""
    return {
        16: [(2, 2), (1, 1), (4, 4), (4, 2), (8, 4)],
        32: [(1, 4), (1, 2), (2, 4)],
        64: [(1, 8)],
        128: [(1, 16)],
    }[tile]


def match_tokens_candidates(tile: int) -> list[int]:
    """num_warps that the fused token kernel may run with (first: the untimed default)."""
    return {16: [1, 2, 4, 8], 32: [4, 8], 64: [8], 128: [16]}[tile]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision of the token kernel: about float32 accuracy for float32 tokens."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def match_tokens_block_d(tile: int) -> int:
    """Chunk of the token dimension streamed per step: smaller for larger tiles (registers)."""
    return {16: 64, 32: 64, 64: 32, 128: 16}[tile]


_TUNED: dict[tuple, object] = {}
"""Autotuning cache: (operator, Q, T, D, dtype) -> the fastest candidate measured in this process."""


def _autotune(key: tuple, candidates: list, launch: Callable[[object], None], device) -> object:
    """The candidate to launch with: cached, else timed once on CUDA (one host sync), else the first.

    No timing happens on the CPU (the interpreter), during CUDA-graph capture or with
    STELLAR_KERNELS_AUTOTUNE=0; the first candidate is used then and nothing is cached.
    """
    found = _TUNED.get(key)
    if found is not None:
        return found
    if (
        len(candidates) == 1
        or device.type != "cuda"
        or os.environ.get("STELLAR_KERNELS_AUTOTUNE", "1") == "0"
        or torch.cuda.is_current_stream_capturing()
    ):
        return candidates[0]
    times = [_gpu_ms(lambda cfg=cfg: launch(cfg)) for cfg in candidates]
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    _TUNED[key] = best
    return best


def _gpu_ms(fn: Callable[[], None], reps: int = 20) -> float:
    """GPU time of one fn() call: `reps` calls replayed from a CUDA graph, so that the Python
    launch overhead (the same for every configuration) does not hide the kernel's own time."""
    fn()  # compiles
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        graph.replay()
        start.record()
        graph.replay()
        end.record()
    except RuntimeError:  # no graph capture here: time plain launches
        start.record()
        for _ in range(reps):
            fn()
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    if device.type == "cuda" and device.index is not None:
        if device.index != torch.cuda.current_device():
            return torch.cuda.device(device)
    return _NULL_CONTEXT


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_CONTEXT = _NullContext()


def _require_triton(op: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: backend='triton' needs the triton package; use backend='torch'")


def sinkhorn_match_triton(
    cost: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton sinkhorn_match of a (B, Q, T) cost, any strides: (index (B, Q), plan (B, Q, T))."""
    b, q, t = cost.shape
    plan = torch.empty((b, q, t), dtype=torch.float32, device=cost.device)
    index = torch.empty((b, q), dtype=torch.int64, device=cost.device)
    if b * q == 0:
        return index, plan
    scale = _LOG2E / eps
    permutation = int(rounding == "permutation")
    with _on_device(cost.device):
        if t <= TILE_LIMIT:
            tile = _tile(t)

            def launch(cfg: tuple[int, int]) -> None:
                per_program, warps = cfg
                _sinkhorn_tile_kernel[(triton.cdiv(b, per_program),)](
                    cost,
                    plan,
                    index,
                    b,
                    q,
                    t,
                    *cost.stride(),
                    scale,
                    n_iters,
                    permutation,
                    P=per_program,
                    BK=tile,
                    num_warps=warps,
                )

            key = ("sinkhorn_match", q, t, 0, cost.dtype)
            launch(_autotune(key, sinkhorn_candidates(tile), launch, cost.device))
        else:
            u = torch.empty((b, q), dtype=torch.float32, device=cost.device)
            best = torch.empty((b, q), dtype=torch.float32, device=cost.device)
            arg = torch.empty((b, q), dtype=torch.int32, device=cost.device)
            v = torch.empty((b, t), dtype=torch.float32, device=cost.device)
            taken = torch.empty((b, t), dtype=torch.int32, device=cost.device)
            _sinkhorn_loop_kernel[(b,)](
                cost,
                plan,
                index,
                u,
                v,
                best,
                arg,
                taken,
                q,
                t,
                *cost.stride(),
                scale,
                n_iters,
                permutation,
                BQ=LOOP_BLOCK,
                BT=LOOP_BLOCK,
                num_warps=LOOP_WARPS,
            )
    return index, plan


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
    if pred.dtype != target.dtype:  # tl.dot takes operands of one dtype
        common = torch.promote_types(pred.dtype, target.dtype)
        pred, target = pred.to(common), target.to(common)
    tile = _tile(t)
    block_d = match_tokens_block_d(tile)
    views = rows // images
    scale = _LOG2E / eps
    permutation = int(rounding == "permutation")
    widen = pred.dtype == torch.bfloat16 and pred.device.type != "cuda"

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
            BD=block_d,
            WIDEN=widen,
            PRECISION=dot_precision(pred.dtype),
            num_warps=warps,
        )

    with _on_device(pred.device):
        key = ("match_tokens", q, t, d, pred.dtype)
        launch(_autotune(key, match_tokens_candidates(tile), launch, pred.device))
    return index, plan


def gpu_compile_cases() -> list[tuple[str, object, dict, int]]:
    """Every kernel with every configuration its launchers can choose, as
    (label, kernel, arguments for `stellar_kernels.testing.compile_for_gpu`, num_warps).

    Every constexpr configuration is listed with float32 inputs. The input dtype changes
    only the loads and, in the token kernel, the tl.dot operands (tensor cores for half
    types): float16 tokens are listed with every token-kernel configuration too, bfloat16
    tokens and half-precision costs with the K = 16 default.
    """
    specs = []
    runtime = {"scale": 2.5, "n_iters": 5, "permutation": 1}
    strides = {"stride_b": 4099, "stride_q": 67, "stride_t": 3}
    out = {"plan_ptr": "*fp32", "index_ptr": "*i64"}
    for dtype in ("fp32", "fp16", "bf16"):
        for tile in (16, 32, 64, 128):
            configs = sinkhorn_candidates(tile)
            if dtype != "fp32":
                configs = configs[:1] if tile == 16 else []
            for per_program, warps in configs:
                args = {"cost_ptr": f"*{dtype}", **out, "B": 100, "Q": 13, "T": 15, **strides}
                args.update(runtime, P=per_program, BK=tile)
                label = f"tile {dtype} BK={tile} P={per_program} warps={warps}"
                specs.append((label, _sinkhorn_tile_kernel, args, warps))
            configs = match_tokens_candidates(tile)
            if dtype == "bf16":
                configs = configs[:1] if tile == 16 else []
            for warps in configs:
                args = {"pred_ptr": f"*{dtype}", "target_ptr": f"*{dtype}", **out}
                args.update(V=3, Q=13, T=15, D=770, stride_pb=12345, stride_pq=771, stride_pd=3)
                args.update(stride_tb=12347, stride_tt=773, stride_td=5, **runtime)
                args.update(BK=tile, BD=match_tokens_block_d(tile), WIDEN=False)
                args.update(PRECISION="tf32x3" if dtype == "fp32" else "ieee")
                label = f"tokens {dtype} BK={tile} warps={warps}"
                specs.append((label, _match_tokens_kernel, args, warps))
        if dtype != "fp32":
            continue
        args = {"cost_ptr": f"*{dtype}", **out, "u_ptr": "*fp32", "v_ptr": "*fp32"}
        args.update(best_ptr="*fp32", arg_ptr="*i32", taken_ptr="*i32", Q=130, T=150)
        args.update(strides, **runtime, BQ=LOOP_BLOCK, BT=LOOP_BLOCK)
        specs.append((f"loop {dtype}", _sinkhorn_loop_kernel, args, LOOP_WARPS))
    return specs


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("stellar_kernels::sinkhorn_match", mutates_args=())
def _sinkhorn_match_op(
    cost: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return sinkhorn_match_triton(cost, eps, n_iters, rounding)


@_sinkhorn_match_op.register_fake
def _sinkhorn_match_fake(cost, eps, n_iters, rounding):
    b, q, t = cost.shape
    return (
        cost.new_empty((b, q), dtype=torch.int64),
        cost.new_empty((b, q, t), dtype=torch.float32),
    )


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


def _check_hyper(eps: float, n_iters: int, rounding: str) -> tuple[float, int, str]:
    return (
        check_positive("eps", eps),
        check_iterations("n_iters", n_iters),
        check_choice("rounding", rounding, ROUNDINGS),
    )


def sinkhorn_match(
    cost: torch.Tensor,
    eps: float = 0.1,
    n_iters: int = 5,
    rounding: str = "permutation",
    *,
    backend: str | None = None,
    validate: bool = True,
) -> MatchResult:
    """Entropic OT matching of Q query rows to T targets (Q <= T), batched.

    Args:
        cost: (B, Q, T) or (Q, T) float16/bfloat16/float32 cost matrix.
        eps: entropic regularization (> 0).
        n_iters: number of (u, v) log-domain updates (>= 1).
        rounding: "permutation" (one-to-one, greedy on the plan) or "argmax"
            (row-wise argmax, may repeat a target).
        backend: None (Triton for CUDA tensors, else the PyTorch reference), "torch" or
            "triton" (on CPU tensors only under TRITON_INTERPRET=1).
        validate: scan `cost` for NaN (a host synchronization); False skips it, and then
            the Triton path never synchronizes with the host (apart from timing the
            kernel configurations once per shape and dtype, see `_autotune`).

    Returns:
        MatchResult(index (B, Q) int64, plan (B, Q, T) float32); 2-D input gives
        (Q,) and (Q, T). The Triton path records no autograd graph (matching is used
        without gradients); the PyTorch reference's plan is differentiable.
    """
    check_tensor("cost", cost, (2, 3), MATCH_DTYPES)
    check_rows_fit("cost", cost.shape)
    eps, n_iters, rounding = _check_hyper(eps, n_iters, rounding)
    if validate:
        check_not_nan("cost", cost)
    batched = cost if cost.dim() == 3 else cost.unsqueeze(0)
    impl = resolve_backend(
        "sinkhorn_match", backend, cost.device, ("torch", "triton"), DEFAULT_CUDA_BACKEND, "torch"
    )
    if impl == "triton":
        _require_triton("sinkhorn_match")
        if torch.compiler.is_compiling():
            index, plan = torch.ops.stellar_kernels.sinkhorn_match(batched, eps, n_iters, rounding)
        else:  # the same function without the custom-op dispatch (a few microseconds per call)
            index, plan = sinkhorn_match_triton(batched, eps, n_iters, rounding)
    else:
        index, plan = sinkhorn_match_reference(batched, eps, n_iters, rounding)
    if cost.dim() == 2:
        return MatchResult(index[0], plan[0])
    return MatchResult(index, plan)


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
        target: (B, T, D) tokens, Q <= T.
        eps, n_iters, rounding, backend, validate: as in `sinkhorn_match`.

    Returns:
        The same as ``sinkhorn_match(torch.cdist(pred, target.repeat_interleave(V, 0)))``:
        MatchResult(index (B*V, Q) int64, plan (B*V, Q, T) float32).
    """
    check_tensor("pred", pred, (3,), MATCH_DTYPES)
    check_tensor("target", target, (3,), MATCH_DTYPES)
    check_same_device(pred=pred, target=target)
    if target.shape[0] == 0 or pred.shape[0] % target.shape[0] != 0:
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
    eps, n_iters, rounding = _check_hyper(eps, n_iters, rounding)
    if validate:
        check_not_nan("pred", pred)
        check_not_nan("target", target)
    impl = resolve_backend(
        "match_tokens", backend, pred.device, ("torch", "triton"), DEFAULT_CUDA_BACKEND, "torch"
    )
    if impl == "triton":
        _require_triton("match_tokens")
        if torch.compiler.is_compiling():
            index, plan = torch.ops.stellar_kernels.match_tokens(
                pred, target, eps, n_iters, rounding
            )
        else:
            index, plan = match_tokens_triton(pred, target, eps, n_iters, rounding)
        return MatchResult(index, plan)
    return match_tokens_reference(pred, target, eps, n_iters, rounding)
