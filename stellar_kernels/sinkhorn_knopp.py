"""Sinkhorn-Knopp balanced assignment for online clustering (paper eq. 4-6).

Given scores s (N, P) (logits divided by the SK temperature), the result is
q = exp(s - max_col) with, n_iters times, each column divided by its sum (plus
eps, to the power `scale`) and then each row divided by its sum (plus eps).
With eps = 0 (the default) this is SwAV's Sinkhorn-Knopp, the one DINOv2, iBOT and
solo-learn run: the column max cancels and every row sums to 1. eps > 0 is the
public STELLAR code's form (and CAPI's), which leaves a row whose scores sit far
below every column's best with a sum near zero. Across ranks, column statistics
are all-reduced, so every rank gets the rows of the result that one call on all
ranks' rows stacked would give. float64 scores are computed in float64, other
dtypes in float32. n_iters = 0 gives N exp(s) / sum(exp(s)) (SwAV's form before
its first iteration), computed by the reference on every backend.

This module holds the Triton kernels, their launcher, the `torch.library` custom op
and the public entry point; the PyTorch reference is
`stellar_kernels.reference.sinkhorn_knopp_reference`. The kernels work in the dual
form of docs/design.md ("Sinkhorn-Knopp clustering").

Dual form. q_ij = exp((s_ij - m_j) + b_j + a_i) with m the column max, b (P)
and a (N) duals starting at zero. The column step of an iteration is
b_j -= scale * log(colsum_j + eps), the row step a_i -= log(rowsum_i + eps),
with the sums taken over exp((s - m) + b + a) exactly as the eager code forms
them (eps is added to the sum, not in log space). With eps = 0 the row sums are
taken over exp((s - m) + b + a - rowmax), so that a row whose entries would all
underflow is still normalized, and the last pass divides by that sum itself. The
column sums need no such shift: the column step leaves every column with unit mass,
and the row step keeps at least 1/P of it (scale 1). The column max is kept apart
from b so that s - m is formed as in the eager code, however large the scores.
The scores are read, never written; q is written once, at the end.

HBM passes (for n_iters = 3: 4 reads and 1 write = 5 passes of N x P):

  pass 1        `_sk_colstats_kernel`: column max and column sums of exp(s - m)
                in one read, with an online (rescaled) max per row split.
  passes 2..n+1 `_sk_rows_resident_kernel`: each program holds whole rows on
                chip; one read of a row block gives its row sums (the new a)
                and, from the same registers, its share of the next
                iteration's column sums. The last of these passes writes
                q = exp(s - m + b + a) instead.

That is n_iters + 1 reads and one write, against about twenty passes for the
eager code (max, subtract, exp, and per iteration two reductions and two
in-place divisions). Partial column statistics go to a small (R, P) buffer
(R = number of persistent programs, about one per SM) that
`_sk_reduce_kernel` folds into m and b between passes. Rows wider than
MAX_RESIDENT_P columns use `_sk_rows_chunked_kernel`, which sweeps each row
block twice (row sums, then column sums or q); its second sweep is served from
L2 only when the rows in flight fit there.

Memory: besides q, the call allocates m, b, a and one (P,) column-sum vector
(O(N + P), in q's dtype), and when validating one (N,) int32 vector of rows seen;
the partial buffers are carved out of q before q is
written (a separate O(P) buffer only when N is too small to hold them).

Bad scores. Pass 1 also raises a flag (one atomic max per program) when it reads
NaN, +inf or a score beyond half the range of q's dtype (where s - m would overflow) and, when validating, marks every row in which it saw a finite score
(one atomic max per row and column block); the two flags (NaN or +inf, a row with
none) sit after the column max, in the same vector, so the first all-reduce tells
every rank. A column with no finite score has an all-reduced max of -inf.
validate=True reads the three once, at the end, and raises the same ValueError on
every rank, after the same collectives. -inf scores are not bad: they get zero mass.

Across ranks (torch.distributed initialized, or `group` given, and not
`local`): after pass 1 the column max (and the flags) is all-reduced with MAX,
each rank rescales its column sums to the global max, and the sums are
all-reduced with SUM; after each later pass the column sums are all-reduced with
SUM. The all-reduces act on (P,) vectors between kernel launches, so the
same code runs with NCCL (CUDA tensors) and gloo (CPU tensors, Triton
interpreter). A rank with no rows launches nothing but joins every collective
with neutral values (max -inf, sums 0) and returns a (0, P) result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._backend import resolve_backend
from ._triton import autotune, bound_launch, on_device, sm_count, tl, triton, tune_key
from ._validation import (
    check_iterations,
    check_non_negative,
    check_positive,
    check_tensor,
    checking,
    raise_if_bad_scores,
)
from .reference import (
    sinkhorn_knopp_reference,
    sinkhorn_knopp_zero_iterations,
    sk_accumulator,
    sk_flags,
    sk_score_limit,
)


def distributed_group(group: object | None, local: bool) -> object | None:
    """The process group to reduce column statistics over, or None for a local call."""
    if local or not dist.is_available() or not dist.is_initialized():
        return None
    if group is None:
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@bound_launch
@triton.jit
def _sk_colstats_kernel(
    s_ptr,
    pmax_ptr,
    psum_ptr,
    flag_ptr,
    seen_ptr,
    N,
    P,
    stride_n,
    stride_p,
    rows_per_split,
    LIMIT: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Pass 1: per (column block, row split) the column max and sum of exp(s - max).

    The running max is rescaled as in flash attention, so the max and the sums
    come from one read. Writes pmax[split, col] and psum[split, col], and raises
    flag[0] to 1 if the block holds NaN, +inf or a score beyond +-LIMIT. CHECK_ROWS: raises seen[row] to 1
    for every row with a finite score in the block (a row that none raises has none).
    Everything is computed in the dtype of pmax (float32, or float64).
    """
    acc_ty = pmax_ptr.dtype.element_ty
    pid_p = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = cols < P
    col_off = cols.to(tl.int64) * stride_p
    row0 = split * rows_per_split
    run_max = tl.full([BLOCK_P], float("-inf"), acc_ty)
    run_sum = tl.zeros([BLOCK_P], acc_ty)
    bad = tl.zeros([BLOCK_P], acc_ty)
    for i in range(0, rows_per_split, BLOCK_N):
        rows = row0 + i + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & cmask[None, :]
        s = tl.load(
            s_ptr + rows.to(tl.int64)[:, None] * stride_n + col_off[None, :],
            mask=mask,
            other=float("-inf"),
        ).to(acc_ty)
        # NaN, +inf, and finite scores beyond LIMIT (a constexpr: float64's limit needs a
        # float64 constant, which a runtime float argument would not be).
        nonfinite = mask & ((s != s) | ((tl.abs(s) > LIMIT) & (s > float("-inf"))))
        bad = tl.maximum(bad, tl.max(nonfinite.to(acc_ty), axis=0))
        if CHECK_ROWS:
            finite = (s > float("-inf")).to(tl.int32)  # false where masked, -inf or NaN
            tl.atomic_max(seen_ptr + rows, tl.max(finite, axis=1), mask=rows < N)
        new_max = tl.maximum(run_max, tl.max(s, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(s - shift[None, :]), axis=0)
        run_max = new_max
    out = split.to(tl.int64) * P + cols
    tl.store(pmax_ptr + out, run_max, mask=cmask)
    tl.store(psum_ptr + out, run_sum, mask=cmask)
    tl.atomic_max(flag_ptr, tl.max(bad, axis=0))


@bound_launch
@triton.jit
def _sk_reduce_kernel(
    pmax_ptr,
    psum_ptr,
    m_ptr,
    b_ptr,
    colsum_ptr,
    R,
    P,
    scale,
    eps,
    FIRST: tl.constexpr,
    FINISH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Folds R rows of partial column statistics.

    FIRST: the partials are (max, sum of exp(s - max)) pairs; writes the column
    max m and the sums rescaled to it. Otherwise sums the partial column sums.
    FINISH: applies the column step b -= scale * log(colsum + eps) (b = 0
    before the first); else writes colsum for an all-reduce.
    """
    acc_ty = psum_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = cols < P
    if FIRST:
        col_max = tl.full([BLOCK_P], float("-inf"), acc_ty)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            offs = rows.to(tl.int64)[:, None] * P + cols[None, :]
            mask = (rows < R)[:, None] & cmask[None, :]
            pm = tl.load(pmax_ptr + offs, mask=mask, other=float("-inf"))
            col_max = tl.maximum(col_max, tl.max(pm, axis=0))
        tl.store(m_ptr + cols, col_max, mask=cmask)
        shift = tl.where(col_max == float("-inf"), 0.0, col_max)
    acc = tl.zeros([BLOCK_P], acc_ty)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        offs = rows.to(tl.int64)[:, None] * P + cols[None, :]
        mask = (rows < R)[:, None] & cmask[None, :]
        part = tl.load(psum_ptr + offs, mask=mask, other=0.0)
        if FIRST:
            pm = tl.load(pmax_ptr + offs, mask=mask, other=float("-inf"))
            part = part * tl.exp(pm - shift[None, :])
        acc += tl.sum(part, axis=0)
    if FINISH:
        step = scale * tl.log(acc + eps)
        if FIRST:
            tl.store(b_ptr + cols, -step, mask=cmask)
        else:
            b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
            tl.store(b_ptr + cols, b - step, mask=cmask)
    else:
        tl.store(colsum_ptr + cols, acc, mask=cmask)


@bound_launch
@triton.jit
def _sk_rows_resident_kernel(
    s_ptr,
    m_ptr,
    b_ptr,
    a_ptr,
    part_ptr,
    q_ptr,
    N,
    P,
    stride_n,
    stride_p,
    eps,
    LAST: tl.constexpr,
    EXACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Row step (+ next column sums, or the output) with whole rows on chip (BLOCK_P >= P).

    Persistent: program g takes row blocks g, g + G, ... One read of a row block
    gives e = exp(s - m + b + a), the row sums r, the new a = a - log(r + eps)
    and, from the same registers, e / (r + eps): summed over the rows into this
    program's partial column sums, or (LAST) stored as q.

    EXACT (eps = 0): the exponent is shifted by the row's max first, so a row whose
    entries would all underflow is still normalized (r >= 1, from the max).

    PREFETCH: the load of the program's next row block is issued before the current one
    is reduced, so that a read is in flight while the row sums are formed (two blocks in
    registers; the launcher times both forms and keeps the faster).
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    # Column vectors are kept 2-D ([1, BLOCK_P]) so that they share the tile's layout.
    cols = tl.arange(0, BLOCK_P)[None, :]
    cmask = cols < P
    col_off = cols.to(tl.int64) * stride_p
    acc_ty = a_ptr.dtype.element_ty
    col_acc = tl.zeros([1, BLOCK_P], acc_ty)
    block_rows = tl.arange(0, BLOCK_N)[:, None]
    if PREFETCH:
        ahead = pid * BLOCK_N + block_rows
        s_ahead = tl.load(
            s_ptr + ahead.to(tl.int64) * stride_n + col_off,
            mask=(ahead < N) & cmask,
            other=float("-inf"),
            eviction_policy="evict_first",
        )
    for blk in range(pid, n_blocks, n_prog):
        rows = blk * BLOCK_N + block_rows
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        mask = rmask & cmask
        if PREFETCH:
            s = s_ahead.to(acc_ty)
            ahead = rows + n_prog * BLOCK_N  # past N on the last block: nothing is read
            s_ahead = tl.load(
                s_ptr + ahead.to(tl.int64) * stride_n + col_off,
                mask=(ahead < N) & cmask,
                other=float("-inf"),
                eviction_policy="evict_first",
            )
        else:
            s = tl.load(
                s_ptr + rows64 * stride_n + col_off,
                mask=mask,
                other=float("-inf"),
                eviction_policy="evict_first",
            ).to(acc_ty)
        m = tl.load(m_ptr + cols, mask=cmask, other=0.0)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
        a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
        # s - m and a can both be huge for a row far below the columns' best; added first,
        # they cancel exactly, and b, of order log P, is not lost against them.
        t = ((s - m) + a) + b
        if EXACT:
            row_max = tl.max(t, axis=1, keep_dims=True)
            shift = tl.where(row_max == float("-inf"), 0.0, row_max)  # rows past N
            e = tl.exp(t - shift)
            row_sum = tl.sum(e, axis=1, keep_dims=True)
            row_sum = tl.where(row_max == float("-inf"), 1.0, row_sum)
            tl.store(a_ptr + rows, a - (shift + tl.log(row_sum)), mask=rmask)
        else:
            e = tl.exp(t)
            row_sum = tl.sum(e, axis=1, keep_dims=True) + eps
            tl.store(a_ptr + rows, a - tl.log(row_sum), mask=rmask)
        e = e * (1.0 / row_sum)
        if LAST:
            tl.store(q_ptr + rows64 * P + cols, e, mask=mask)
        else:
            col_acc += tl.sum(e, axis=0, keep_dims=True)
    if not LAST:
        tl.store(part_ptr + pid.to(tl.int64) * P + cols, col_acc, mask=cmask)


@bound_launch
@triton.jit
def _sk_rows_chunked_kernel(
    s_ptr,
    m_ptr,
    b_ptr,
    a_ptr,
    part_ptr,
    q_ptr,
    N,
    P,
    stride_n,
    stride_p,
    eps,
    LAST: tl.constexpr,
    EXACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """The resident kernel's job for rows wider than one tile: two sweeps over a row block.

    Sweep 1 sums e = exp(s - m + b + a) over the row (EXACT: shifted by a running row
    max, rescaled as in flash attention); sweep 2 re-reads the block (from L2 when it is
    still there) and writes the block's partial column sums of e / (r + eps), or (LAST) q.
    """
    acc_ty = a_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    row_sum = tl.zeros([BLOCK_N], acc_ty)
    row_max = tl.full([BLOCK_N], float("-inf"), acc_ty)
    for p0 in range(0, P, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        cmask = cols < P
        mask = rmask[:, None] & cmask[None, :]
        s = tl.load(
            s_ptr + rows64[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_p,
            mask=mask,
            other=float("-inf"),
        ).to(acc_ty)
        m = tl.load(m_ptr + cols, mask=cmask, other=0.0)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
        t = ((s - m[None, :]) + a[:, None]) + b[None, :]
        if EXACT:
            new_max = tl.maximum(row_max, tl.max(t, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(t - shift[:, None]), axis=1)
            row_max = new_max
        else:
            row_sum += tl.sum(tl.exp(t), axis=1)
    if EXACT:
        # The second sweep divides by the sum itself, not by exp of the rounded log-sum-exp
        # in a, which at a large row offset is off by an ulp of that offset.
        empty = row_max == float("-inf")  # rows past N
        shift = tl.where(empty, 0.0, row_max)
        row_sum = tl.where(empty, 1.0, row_sum)
        a_new = a - (shift + tl.log(row_sum))
        inv = 1.0 / row_sum
    else:
        row_sum += eps
        a_new = a - tl.log(row_sum)
        inv = 1.0 / row_sum
    tl.store(a_ptr + rows, a_new, mask=rmask)
    for p0 in range(0, P, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        cmask = cols < P
        mask = rmask[:, None] & cmask[None, :]
        s = tl.load(
            s_ptr + rows64[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_p,
            mask=mask,
            other=float("-inf"),
            eviction_policy="evict_first",
        ).to(acc_ty)
        m = tl.load(m_ptr + cols, mask=cmask, other=0.0)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
        t = ((s - m[None, :]) + a[:, None]) + b[None, :]
        if EXACT:
            e = tl.exp(t - shift[:, None]) * inv[:, None]
        else:
            e = tl.exp(t) * inv[:, None]
        if LAST:
            tl.store(q_ptr + rows64[:, None] * P + cols[None, :], e, mask=mask)
        else:
            tl.store(part_ptr + pid.to(tl.int64) * P + cols, tl.sum(e, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# Widest row (in columns, a power of two) held on chip by the resident kernel; wider rows are chunked.
MAX_RESIDENT_P = 16384
# Elements of one resident tile (BLOCK_N x BLOCK_P) for narrow rows.
RESIDENT_TILE = 4096
COLSTATS_BLOCK_N, COLSTATS_BLOCK_P, COLSTATS_WARPS = 32, 256, 8
REDUCE_BLOCK_R, REDUCE_BLOCK_P, REDUCE_WARPS = 32, 128, 4
CHUNKED_BLOCK_N, CHUNKED_BLOCK_P, CHUNKED_WARPS = 4, 2048, 8


def resident_config(P: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_P, num_warps) of the resident kernel for rows of P <= MAX_RESIDENT_P columns."""
    block_p = max(16, triton.next_power_of_2(P))
    block_n = max(1, RESIDENT_TILE // block_p)
    num_warps = max(4, block_p // 1024)  # about 32 elements of a tile per thread
    return block_n, block_p, num_warps


def resident_candidates(num_warps: int) -> list[tuple[int, int]]:
    """(PREFETCH, num_warps) that the resident kernel may run with; the first is the untimed
    default. Both forms are also tried with twice the warps (half the registers per thread
    for a row block: a 16384-wide row spills at 16 warps with some compilers)."""
    more = [(0, 2 * num_warps), (1, 2 * num_warps)] if num_warps < 32 else []
    return [(0, num_warps), (1, num_warps), *more]


def resident_programs(N: int, block_n: int, num_warps: int, n_sm: int) -> int:
    """Persistent programs of the resident kernel: about 16 warps per multiprocessor."""
    return min(triton.cdiv(N, block_n), n_sm * max(1, 16 // num_warps))


def sinkhorn_knopp_triton(
    scores: torch.Tensor,
    n_iters: int,
    scale: float,
    eps: float,
    group: object | None,
    flag: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the passes described in the module docstring; all-reduces between them if `group`.

    Returns (q, flags): flags (3,) as in `reference.SK_FLAGS`, the same on every rank,
    computed only with `flag` (else 0). n_iters = 0 is one elementwise pass, left to the
    reference's code.
    """
    if n_iters == 0:
        return sinkhorn_knopp_zero_iterations(scores, group, flag)
    N, P = scores.shape
    device = scores.device
    acc = sk_accumulator(scores.dtype)
    q = torch.empty((N, P), dtype=acc, device=device)
    # Column max m, then the score flags (NaN or +inf; a row with no finite score): the
    # flags travel with m in the first all-reduce.
    stats = torch.zeros(P + 2, dtype=acc, device=device)
    m = stats[:P]
    if P == 0 or (N == 0 and group is None):  # P is the same on every rank
        return q, stats.new_zeros(3)
    b = torch.empty(P, dtype=acc, device=device)
    a = torch.zeros(N, dtype=acc, device=device)
    colsum = torch.empty(P, dtype=acc, device=device) if group is not None else b
    n_sm = sm_count(device)
    stride_n, stride_p = scores.stride()
    scratch = q.view(-1)  # holds partial statistics until the last pass writes q
    exact = eps == 0

    def reduce(pmax, psum, rows, first, finish):
        grid = (triton.cdiv(P, REDUCE_BLOCK_P),)
        _sk_reduce_kernel[grid](
            pmax, psum, m, b, colsum, rows, P, scale, eps,
            FIRST=first, FINISH=finish, BLOCK_R=REDUCE_BLOCK_R, BLOCK_P=REDUCE_BLOCK_P,
            num_warps=REDUCE_WARPS,
        )  # fmt: skip

    with on_device(device):
        # Pass 1: column max and column sums of exp(s - max), and the score flags.
        if N:
            col_blocks = triton.cdiv(P, COLSTATS_BLOCK_P)
            row_tiles = triton.cdiv(N, COLSTATS_BLOCK_N)
            splits = max(1, min(row_tiles, triton.cdiv(4 * n_sm, col_blocks)))
            rows_per_split = triton.cdiv(row_tiles, splits) * COLSTATS_BLOCK_N
            splits = triton.cdiv(N, rows_per_split)
            if 2 * splits <= N:
                pmax, psum = scratch[: splits * P], scratch[splits * P : 2 * splits * P]
            else:
                pmax = torch.empty(splits * P, dtype=acc, device=device)
                psum = torch.empty(splits * P, dtype=acc, device=device)
            seen = torch.zeros(N if flag else 1, dtype=torch.int32, device=device)
            _sk_colstats_kernel[(col_blocks, splits)](
                scores, pmax, psum, stats[P:], seen, N, P, stride_n, stride_p, rows_per_split,
                LIMIT=sk_score_limit(scores.dtype), CHECK_ROWS=flag, BLOCK_N=COLSTATS_BLOCK_N, BLOCK_P=COLSTATS_BLOCK_P,
                num_warps=COLSTATS_WARPS,
            )  # fmt: skip
            if flag:
                stats[P + 1] = (seen == 0).any()
            reduce(pmax, psum, splits, first=True, finish=group is None)
        else:  # no rows here: neutral statistics for the collectives
            m.fill_(float("-inf"))
            colsum.zero_()
        if group is not None:
            local_max = m.clone()
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
            if N:
                colsum.mul_(torch.exp(local_max - m))  # rescale to the global max
            dist.all_reduce(colsum, op=dist.ReduceOp.SUM, group=group)
            torch.mul(colsum.add_(eps).log_(), -scale, out=b)
        flags = sk_flags(m, stats[P:]) if flag else stats.new_zeros(3)

        # Passes 2..n_iters+1: row step, then the next column sums or (last) q.
        options = {"EXACT": exact}
        if max(16, triton.next_power_of_2(P)) <= MAX_RESIDENT_P:
            block_n, block_p, num_warps = resident_config(P)
            options.update(BLOCK_N=block_n, BLOCK_P=block_p)
            if N:
                # Timed on row duals of its own (a pass updates them); the partial sums it
                # writes land in q's memory, which the last pass overwrites.
                probe = torch.zeros_like(a)

                def timed(cfg: tuple[int, int]) -> None:
                    prefetch, warps = cfg
                    n = resident_programs(N, block_n, warps, n_sm)
                    _sk_rows_resident_kernel[(n,)](
                        scores, m, b, probe, scratch[: n * P], q, N, P, stride_n, stride_p,
                        eps, LAST=False, PREFETCH=prefetch, num_warps=warps, **options,
                    )  # fmt: skip

                op = "sinkhorn_knopp_rows_exact" if exact else "sinkhorn_knopp_rows"
                key = tune_key(op, device, scores.dtype, N, P)
                prefetch, num_warps = autotune(key, resident_candidates(num_warps), timed, device)
                options["PREFETCH"] = prefetch
            kernel = _sk_rows_resident_kernel
            n_prog = resident_programs(N, block_n, num_warps, n_sm)
        else:
            block_n, block_p, num_warps = CHUNKED_BLOCK_N, CHUNKED_BLOCK_P, CHUNKED_WARPS
            options.update(BLOCK_N=block_n, BLOCK_P=block_p)
            kernel = _sk_rows_chunked_kernel
            n_prog = triton.cdiv(N, block_n)
        part = scratch[: n_prog * P]  # n_prog <= N
        for it in range(n_iters):
            last = it == n_iters - 1
            if N:
                kernel[(n_prog,)](
                    scores, m, b, a, part, q, N, P, stride_n, stride_p, eps,
                    LAST=last, num_warps=num_warps, **options,
                )  # fmt: skip
            if last:
                break
            if group is None:
                reduce(part, part, n_prog, first=False, finish=True)
                continue
            if N:
                reduce(part, part, n_prog, first=False, finish=False)
            else:
                colsum.zero_()
            dist.all_reduce(colsum, op=dist.ReduceOp.SUM, group=group)
            b.sub_(colsum.add_(eps).log_().mul_(scale))
    return q, flags


# The local Triton path as a custom op, so that torch.compile traces through it.
@torch.library.custom_op("stellar_kernels::sinkhorn_knopp", mutates_args=())
def sinkhorn_knopp_op(scores: torch.Tensor, n_iters: int, scale: float, eps: float) -> torch.Tensor:
    return sinkhorn_knopp_triton(scores, n_iters, scale, eps, None)[0]


@sinkhorn_knopp_op.register_fake
def _sinkhorn_knopp_fake(scores, n_iters, scale, eps):
    return scores.new_empty(scores.shape, dtype=sk_accumulator(scores.dtype))


def sinkhorn_knopp(
    scores: torch.Tensor,
    n_iters: int = 3,
    scale: float = 1.0,
    eps: float = 0.0,
    group: object | None = None,
    local: bool = False,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Balanced soft assignment of N rows to P prototypes (SwAV's Sinkhorn-Knopp).

    With the defaults this is the Sinkhorn-Knopp of SwAV, DINOv2/iBOT and solo-learn
    called as ``sinkhorn_knopp(logits / temperature, n_iters)``: every row of the result
    sums to 1, whatever the scores (computed in the log domain where the plain form
    would underflow). See docs/dropin.md for each client's one-line swap.

    Args:
        scores: (N, P) logits already divided by the SK temperature; any float dtype.
            N may differ between ranks, zero included; P may not. -inf scores get zero
            mass (log-probabilities with exact zeros work).
        n_iters: column-then-row normalization rounds (>= 0). 0 returns
            N exp(s) / sum(exp(s)), the sum over every entry of all ranks' rows and N
            their count, as SwAV's form does; rows are then not normalized.
        scale: exponent of the column normalization (> 0; 1.0 is plain SK).
        eps: added to every column and row sum (>= 0). 0 (default) normalizes exactly;
            the public STELLAR code and CAPI add 1e-8, which leaves a row whose scores
            sit far (about 18 or more) below every prototype's best with a sum near 0.
        group: process group for the column all-reduces; None means the default
            group when torch.distributed is initialized.
        local: never communicate (for a call made on some ranks only).
        backend: None (Triton on CUDA tensors, else the PyTorch reference; the reference
            also where triton is not installed), "torch" or "triton" (a CUDA tensor, or a
            CPU tensor under TRITON_INTERPRET=1; else ValueError). Both compute float64
            scores in float64. n_iters=0 runs the reference's one elementwise pass on
            every backend.
        validate: raise ValueError if the scores hold NaN or +inf, or a row or a column
            with no finite score; across ranks every rank raises, whichever rank's scores
            hold it (one host read, after the same collectives everywhere). Skipped while
            torch.compile traces and while a CUDA graph captures, and everywhere with
            validate=False.

    Returns:
        q (N, P): float64 for float64 scores, else float32; `scores` is not modified.
        q is a target: it never requires grad, on any backend.
    """
    check_tensor("scores", scores, (2,))
    n_iters = check_iterations("n_iters", n_iters, minimum=0)
    scale = check_positive("scale", scale)
    eps = check_non_negative("eps", eps)
    impl = resolve_backend(
        "sinkhorn_knopp", backend, scores.device, ("torch", "triton"), "triton", "torch"
    )
    pg = distributed_group(group, local)
    check = checking(validate, scores)
    scores = scores.detach()
    if impl == "triton":
        if pg is None and torch.compiler.is_compiling():
            return sinkhorn_knopp_op(scores, n_iters, scale, eps)
        q, flags = sinkhorn_knopp_triton(scores, n_iters, scale, eps, pg, check)
    else:
        q, flags = sinkhorn_knopp_reference(scores, n_iters, scale, eps, pg, check)
    if check:
        raise_if_bad_scores(flags, tuple(scores.shape), pg is not None)
    return q
