"""Sinkhorn optimal-transport matching of a batch of cost matrices (`sinkhorn_match`).

Entropic OT with unit row and column marginals in the log domain (docs/design.md,
"Sinkhorn matching"), then a rounding of each plan to an index. This module holds the
Triton kernels, their launcher, the `torch.library` custom op and the public entry
point; the PyTorch reference is `stellar_kernels.reference.sinkhorn_match_reference`,
and the fused token matching (`match_tokens`) reuses the device functions below.

* `_sinkhorn_tile_kernel` solves one or several whole Q x T problems (T <= 128) in
  registers per program;
* `_sinkhorn_loop_kernel` solves one larger problem per program by streaming tiles of
  the cost, its duals in global scratch.

All Sinkhorn arithmetic is float32 in base 2: with c = C * log2(e) / eps the duals obey
u_i = -log2 sum_j 2^(v_j - c_ij), v_j = -log2 sum_i 2^(u_i - c_ij), and
plan = 2^(u_i + v_j - c_ij): the updates of docs/design.md with the duals scaled by
log2(e) / eps. A +inf cost (a forbidden pair) is masked out of every log-sum-exp and is
zero in the plan; the roundings rank forbidden pairs and NaN entries below every allowed
pair (see `stellar_kernels.reference.rounding_scores`), so an index is always in [0, T).
The exact rounding "hungarian" runs after the kernel, on the plan it stored
(`round_hungarian`, shared with `match_tokens`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._backend import resolve_backend
from ._triton import autotune, bound_launch, on_device, tl, triton, tune_key
from ._validation import (
    check_choice,
    check_costs,
    check_iterations,
    check_positive,
    check_rows_fit,
    check_tensor,
    checking,
)
from .hungarian import hungarian_match
from .reference import sinkhorn_match_reference

ROUNDINGS = ("permutation", "argmax", "hungarian")
MATCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

TILE_LIMIT = 128
"""Largest T that one program of the register-tile kernels solves; larger T takes the loop path."""

LOG2E = 1.4426950408889634


class MatchResult(NamedTuple):
    index: torch.Tensor
    """(B, Q) int64: the target chosen for each query row."""
    plan: torch.Tensor
    """(B, Q, T) float32: the transport plan after n_iters."""


# ----------------------------------------------------------------------------- device functions
#
# Every kernel works on float32 costs scaled by log2(e) / eps. Rows of a tile are
# queries (Q), columns are targets (T). `valid` marks the entries inside the problem,
# `allowed` the valid entries that are not forbidden (+inf). The roundings rank
# `_rounding_scores`: the plan where allowed, -0.5 on forbidden and NaN entries, -1 once
# struck, -2 outside the problem.


@triton.jit
def _log2sumexp2(x, AXIS: tl.constexpr):
    """log2(sum(2^x)) along AXIS; -inf where every entry is -inf."""
    m = tl.max(x, axis=AXIS)
    finite = m != float("-inf")
    shift = tl.where(finite, m, 0.0)
    s = tl.sum(tl.exp2(x - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return tl.where(finite, shift + tl.log2(tl.where(finite, s, 1.0)), float("-inf"))


@triton.jit
def tile_sinkhorn_plan(c, allowed, n_iters, P: tl.constexpr, BQ: tl.constexpr, BT: tl.constexpr):
    """Plan 2^(u + v - c) of P problems (P, BQ, BT) after n_iters dual updates; 0 outside `allowed`.

    A row or column with no allowed entry gets an infinite dual, which only ever meets
    masked entries.
    """
    u = tl.zeros((P, BQ), dtype=tl.float32)
    v = tl.zeros((P, BT), dtype=tl.float32)
    for _ in range(n_iters):
        u = -_log2sumexp2(tl.where(allowed, v[:, None, :] - c, float("-inf")), 2)
        v = -_log2sumexp2(tl.where(allowed, u[:, :, None] - c, float("-inf")), 1)
    return tl.where(allowed, tl.exp2(u[:, :, None] + v[:, None, :] - c), 0.0)


@triton.jit
def _rounding_scores(plan, valid, allowed):
    keep = allowed & (plan == plan)
    return tl.where(valid, tl.where(keep, plan, -0.5), -2.0)


@triton.jit
def _round_argmax(work, cols, BT: tl.constexpr):
    """Row-wise argmax of the rounding scores (lowest column among equal maxima), (P, BQ) int32."""
    best = tl.max(work, axis=2)
    return tl.min(tl.where(work == best[:, :, None], cols, BT), axis=2)


@triton.jit
def _round_greedy(work, rows, cols, n_rows, P: tl.constexpr, BQ: tl.constexpr, BT: tl.constexpr):
    """One-to-one rounding: n_rows times take the largest remaining score (lowest flat index
    among equal ones, as `round_plan`), assign it and strike its row and column."""
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
def store_plan_and_index(
    plan_ptr,
    index_ptr,
    plan,
    valid,
    allowed,
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
    work = _rounding_scores(plan, valid, allowed)
    index = _round_argmax(work, cols, BK)
    if permutation:
        # When the row-wise argmax is one-to-one the greedy rounding returns it (see
        # `round_plan`; ties included), so the K greedy steps run only when a column repeats.
        hits = tl.sum(((index[:, :, None] == cols) & valid).to(tl.int32), axis=1)
        if tl.max(tl.max(hits, axis=1), axis=0) > 1:
            index = _round_greedy(work, rows, cols, Q, P, BK, BK)
    b2 = problem[:, None].to(tl.int64)
    rows2 = tl.arange(0, BK)[None, :]
    tl.store(index_ptr + b2 * Q + rows2, index.to(tl.int64), mask=(b2 < B) & (rows2 < Q))


# ----------------------------------------------------------------------------- kernels


@bound_launch
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
    allowed = valid & (c != float("inf"))
    plan = tile_sinkhorn_plan(c, allowed, n_iters, P, BK, BK)
    store_plan_and_index(
        plan_ptr, index_ptr, plan, valid, allowed, problem, B, Q, T, permutation, P, BK
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
    """A tile of the scaled cost and its allowed entries (inside the problem, not +inf)."""
    mask = (rows[:, None] < Q) & (cols[None, :] < T)
    offs = rows[:, None].to(tl.int64) * stride_q + cols[None, :].to(tl.int64) * stride_t
    c = tl.load(cost_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
    return c, mask & (c != float("inf"))


@triton.jit
def _row_best(
    plan_ptr,
    cost_ptr,
    taken_ptr,
    rows,
    Q,
    T,
    stride_q,
    stride_t,
    BQ: tl.constexpr,
    BT: tl.constexpr,
    SKIP: tl.constexpr,
):
    """Per row: the largest rounding score (over columns not taken when SKIP) and the lowest
    column holding it. The cost is read again to tell forbidden pairs from plan underflow."""
    best = tl.full((BQ,), float("-inf"), tl.float32)
    arg = tl.zeros((BQ,), dtype=tl.int32)
    for t0 in range(0, T, BT):
        cols = t0 + tl.arange(0, BT)
        mask = (rows[:, None] < Q) & (cols[None, :] < T)
        if SKIP:
            taken = tl.load(taken_ptr + cols, mask=cols < T, other=1)
            mask = mask & (taken == 0)[None, :]
        offs = rows[:, None].to(tl.int64) * T + cols[None, :]
        x = tl.load(plan_ptr + offs, mask=mask, other=0.0)
        _, allowed = _cost_tile(cost_ptr, rows, cols, Q, T, stride_q, stride_t, 1.0)
        x = tl.where(mask, tl.where(allowed & (x == x), x, -0.5), float("-inf"))
        m = tl.max(x, axis=1)
        a = tl.min(tl.where(x == m[:, None], cols[None, :], T), axis=1)
        better = m > best
        arg = tl.where(better, a, arg)
        best = tl.where(better, m, best)
    return best, arg


@bound_launch
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
                c, allowed = _cost_tile(cost_ptr, rows, cols, Q, T, stride_q, stride_t, scale)
                v = tl.load(v_ptr + cols, mask=cols < T, other=0.0)
                m, s = _lse_update(m, s, tl.where(allowed, v[None, :] - c, float("-inf")), 1)
            tl.store(u_ptr + rows, -_lse_finish(m, s), mask=rows < Q)
        tl.debug_barrier()
        for t0 in range(0, T, BT):
            cols = t0 + t_ids
            m = tl.full((BT,), float("-inf"), tl.float32)
            s = tl.zeros((BT,), dtype=tl.float32)
            for q0 in range(0, Q, BQ):
                rows = q0 + q_ids
                c, allowed = _cost_tile(cost_ptr, rows, cols, Q, T, stride_q, stride_t, scale)
                u = tl.load(u_ptr + rows, mask=rows < Q, other=0.0)
                m, s = _lse_update(m, s, tl.where(allowed, u[:, None] - c, float("-inf")), 0)
            tl.store(v_ptr + cols, -_lse_finish(m, s), mask=cols < T)
        tl.debug_barrier()
    for q0 in range(0, Q, BQ):
        rows = q0 + q_ids
        u = tl.load(u_ptr + rows, mask=rows < Q, other=0.0)
        for t0 in range(0, T, BT):
            cols = t0 + t_ids
            c, allowed = _cost_tile(cost_ptr, rows, cols, Q, T, stride_q, stride_t, scale)
            v = tl.load(v_ptr + cols, mask=cols < T, other=0.0)
            offs = rows[:, None].to(tl.int64) * T + cols[None, :]
            plan = tl.where(allowed, tl.exp2(u[:, None] + v[None, :] - c), 0.0)
            tl.store(plan_ptr + offs, plan, mask=(rows[:, None] < Q) & (cols[None, :] < T))
    tl.debug_barrier()
    # Rounding reads the plan back. Each row's best remaining entry is cached in (best, arg).
    for q0 in range(0, Q, BQ):
        rows = q0 + q_ids
        best, arg = _row_best(
            plan_ptr, cost_ptr, taken_ptr, rows, Q, T, stride_q, stride_t, BQ, BT, False
        )
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
                    best, arg = _row_best(
                        plan_ptr, cost_ptr, taken_ptr, rows, Q, T, stride_q, stride_t, BQ, BT, True
                    )
                    tl.store(best_ptr + rows, best, mask=stale)
                    tl.store(arg_ptr + rows, arg, mask=stale)
            tl.debug_barrier()


# ----------------------------------------------------------------------------- launcher

LOOP_BLOCK = 64
"""Tile edge of the loop path (T > TILE_LIMIT)."""
LOOP_WARPS = 4


ONE_OUTPUT_ALLOCATION = True
"""Whether `match_outputs` takes index and plan from one allocation by default (read at
each call: benchmarks/test_host_overhead.py times both ways in one process)."""

OUTPUT_ALIGNMENT = 256
"""Bytes to which `match_outputs` rounds the start of the plan inside the shared buffer: where
a separate allocation would start (the caching allocator's blocks are 512-byte aligned), so
Triton's 16-byte specialization and any vectorized reader see an aligned plan."""


def match_outputs(
    b: int, q: int, t: int, device: torch.device, one_allocation: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized outputs of a matching: index (b, q) int64 and plan (b, q, t) float32.

    With one_allocation (default: ONE_OUTPUT_ALLOCATION) both are contiguous views of one
    int64 buffer, the index first (int64 needs the stricter alignment) and the plan from the
    next multiple of OUTPUT_ALIGNMENT bytes: one trip through the allocator per call instead
    of two (host time, docs/benchmarks.md). They share that storage, so neither may be
    resized in place, and a caller that keeps only the index keeps the plan's bytes alive
    (b q t floats: 0.5 MB at 512 problems of 16 x 16). A `torch.library` custom op must not
    return outputs that alias each other (torch checks it), so its implementations pass
    one_allocation=False: two allocations.
    """
    if one_allocation is None:
        one_allocation = ONE_OUTPUT_ALLOCATION
    if not one_allocation:
        index = torch.empty((b, q), dtype=torch.int64, device=device)
        return index, torch.empty((b, q, t), dtype=torch.float32, device=device)
    words = OUTPUT_ALIGNMENT // 8
    start = -(-(b * q) // words) * words  # int64 words before the plan
    buffer = torch.empty(start + (b * q * t + 1) // 2, dtype=torch.int64, device=device)
    index = buffer.as_strided((b, q), (q, 1))
    plan = buffer.view(torch.float32).as_strided((b, q, t), (q * t, t, 1), 2 * start)
    return index, plan


def tile_edge(n: int) -> int:
    """Power-of-two tile edge >= n and >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(n))


def sinkhorn_candidates(tile: int) -> list[tuple[int, int]]:
    """(problems per program, num_warps) that the tile kernel may run with; the first is the
    default when no timing is possible (CPU interpreter, CUDA-graph capture)."""
    return {
        16: [(2, 2), (1, 1), (4, 4), (4, 2), (8, 4)],
        32: [(1, 4), (1, 2), (2, 4)],
        64: [(1, 8)],
        128: [(1, 16)],
    }[tile]


def sinkhorn_match_triton(
    cost: torch.Tensor,
    eps: float,
    n_iters: int,
    rounding: str,
    one_allocation: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton sinkhorn_match of a (B, Q, T) cost, any strides: (index (B, Q), plan (B, Q, T)),
    allocated by `match_outputs` (`one_allocation`)."""
    b, q, t = cost.shape
    index, plan = match_outputs(b, q, t, cost.device, one_allocation)
    if b * q == 0:
        return index, plan
    scale = LOG2E / eps
    permutation = int(rounding == "permutation")
    with on_device(cost.device):
        if t <= TILE_LIMIT:
            tile = tile_edge(t)

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

            key = tune_key("sinkhorn_match", cost.device, cost.dtype, b, q, t)
            launch(autotune(key, sinkhorn_candidates(tile), launch, cost.device))
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


@torch.library.custom_op("stellar_kernels::sinkhorn_match", mutates_args=())
def _sinkhorn_match_op(
    cost: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> tuple[torch.Tensor, torch.Tensor]:
    # Two allocations: a custom op's outputs must not alias each other (see match_outputs).
    return sinkhorn_match_triton(cost, eps, n_iters, rounding, one_allocation=False)


@_sinkhorn_match_op.register_fake
def _sinkhorn_match_fake(cost, eps, n_iters, rounding):
    b, q, t = cost.shape
    return (
        cost.new_empty((b, q), dtype=torch.int64),
        cost.new_empty((b, q, t), dtype=torch.float32),
    )


# ----------------------------------------------------------------------------- exact rounding


def kernel_rounding(rounding: str) -> str:
    """The rounding the Sinkhorn kernels and the reference run: "hungarian" rounds their plan
    afterwards, so they compute it exactly as for the other roundings (the cheap "argmax")."""
    return "argmax" if rounding == "hungarian" else rounding


def round_hungarian(plan: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Index (B, Q) of the one-to-one assignment (Q <= T) of largest total plan mass.

    Among the assignments that avoid every pair `allowed` (B, Q, T) rules out (default:
    none ruled out); where a problem has none, among all of them, a forbidden pair adding
    its plan value (zero). Solved by `hungarian_match` on the plan's device. NaN and
    infinite plan entries (invalid input with validate=False) count as zero mass, so every
    problem is solvable and every index is in [0, T).
    """
    mass = torch.where(plan.isfinite(), plan, 0.0)
    if allowed is None:
        return hungarian_match(mass, maximize=True, validate=False)
    strict = mass.masked_fill(~allowed, -math.inf)
    if plan.device.type == "cpu" and not torch.compiler.is_compiling():
        # Reading which problems are infeasible costs nothing here: the second solve runs
        # only for them.
        index = hungarian_match(strict, maximize=True, validate=False)
        infeasible = (index < 0).any(dim=1)
        if bool(infeasible.any()):
            problems = infeasible.nonzero().squeeze(1)
            index[problems] = hungarian_match(mass[problems], maximize=True, validate=False)
        return index
    # On a GPU, and while torch.compile traces, that read would be a host synchronization
    # (a graph break): both problems of every input are solved, in one batch of 2B.
    b = plan.shape[0]
    both = hungarian_match(torch.cat([strict, mass]), maximize=True, validate=False)
    index, fallback = both[:b], both[b:]
    return torch.where((index < 0).any(dim=1, keepdim=True), fallback, index)


# ----------------------------------------------------------------------------- public API


def check_hyper(eps: float, n_iters: int, rounding: str) -> tuple[float, int, str]:
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
        cost: (B, Q, T) or (Q, T) float16/bfloat16/float32 cost matrix; +inf marks a
            forbidden pair (zero mass in the plan).
        eps: entropic regularization (> 0).
        n_iters: number of (u, v) log-domain updates (>= 1).
        rounding: "permutation" (one-to-one, greedy on the plan: Q times the largest
            entry left; a forbidden pair is taken only by a row none of whose allowed
            columns is left), "argmax" (row-wise argmax, may repeat a target; a forbidden
            pair only for a row that has no other) or "hungarian" (one-to-one, exact: the
            assignment of largest total plan mass among those that avoid every forbidden
            pair; where a problem has none, among all of them, a forbidden pair counting
            its zero mass). The greedy rounding returns the same where the row-wise argmax
            is one-to-one; elsewhere it can fall short of the largest mass, or take a
            forbidden pair that an exact assignment avoids: on cost [[0.8, 0.3, 0.5],
            [0.2, 0.5, inf], [0.3, inf, 0.8]] (eps=0.1, n_iters=5, backend="torch") it
            returns [1, 2, 0], giving row 1 its forbidden column (mass 1.02), where
            "hungarian" returns an assignment free of forbidden pairs (mass 1.50). Its
            price, after the same kernel: one batched exact solve
            (`stellar_kernels.hungarian_match` on the cost's device, no host round trip
            on CUDA), two where a problem has no assignment free of forbidden pairs; on
            CUDA and while torch.compile traces, where that cannot be known without a host
            read, both always run, as one solve of 2B problems.
        backend: None (Triton on CUDA tensors, else the PyTorch reference; the reference
            also where triton is not installed), "torch" or "triton" (a CUDA tensor, or a
            CPU tensor under TRITON_INTERPRET=1; else ValueError).
        validate: raise ValueError if `cost` holds NaN or -inf, a row with no allowed
            column, or a finite cost beyond +-1e37 * eps (the float32 duals would overflow;
            one host read). The check is skipped while torch.compile traces and
            while a CUDA graph captures; validate=False skips it everywhere, and then the
            Triton path never synchronizes with the host (apart from timing its launch
            configurations once per shape, see `stellar_kernels._triton.autotune`).

    Returns:
        MatchResult(index (B, Q) int64 in [0, T), plan (B, Q, T) float32, finite for a
        valid cost); 2-D input gives (Q,) and (Q, T). Both are targets: they never
        require grad, on any backend.
    """
    check_tensor("cost", cost, (2, 3), MATCH_DTYPES)
    check_rows_fit("cost", cost.shape)
    eps, n_iters, rounding = check_hyper(eps, n_iters, rounding)
    impl = resolve_backend(
        "sinkhorn_match", backend, cost.device, ("torch", "triton"), "triton", "torch"
    )
    if checking(validate, cost):
        check_costs("cost", cost, eps)
    batched = (cost if cost.dim() == 3 else cost.unsqueeze(0)).detach()
    computed = kernel_rounding(rounding)
    if impl == "triton":
        if torch.compiler.is_compiling():
            index, plan = torch.ops.stellar_kernels.sinkhorn_match(batched, eps, n_iters, computed)
        else:  # the same function without the custom-op dispatch (a few microseconds per call)
            index, plan = sinkhorn_match_triton(batched, eps, n_iters, computed)
    else:
        index, plan = sinkhorn_match_reference(batched, eps, n_iters, computed)
    if rounding == "hungarian":
        index = round_hungarian(plan, batched != math.inf)
    if cost.dim() == 2:
        return MatchResult(index[0], plan[0])
    return MatchResult(index, plan)
