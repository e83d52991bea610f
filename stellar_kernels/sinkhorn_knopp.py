"""Sinkhorn-Knopp balanced assignment for online clustering (paper eq. 4-6).

Given scores s (N, P) (logits divided by the SK temperature), the result is
q = exp(s - max_col) with, n_iters times, each column divided by its sum (plus
eps, to the power `scale`) and then each row divided by its sum (plus eps).
Across ranks, column statistics are all-reduced, so every rank gets the rows of
the result that one call on all ranks' rows stacked would give.

Two implementations live here: `sinkhorn_knopp_reference` (eager PyTorch, one
float32 N x P buffer normalized in place) and the Triton kernels below, which
work in the dual form of DESIGN.md section 3.

Dual form. q_ij = exp((s_ij - m_j) + b_j + a_i) with m the column max, b (P)
and a (N) float32 duals starting at zero. The column step of an iteration is
b_j -= scale * log(colsum_j + eps), the row step a_i -= log(rowsum_i + eps),
with the sums taken over exp((s - m) + b + a) exactly as the eager code forms
them (eps is added to the sum, not in log space). The column max is kept apart
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
(O(N + P) float32); the partial buffers are carved out of q before q is
written (a separate O(P) buffer only when N is too small to hold them). The
NaN scan (validate=True) is a max reduction, which propagates NaN, instead of
an N x P boolean mask.

Across ranks (torch.distributed initialized, or `group` given, and not
`local`): after pass 1 the column max is all-reduced with MAX, each rank
rescales its column sums to the global max, and the sums are all-reduced with
SUM; after each later pass the column sums are all-reduced with SUM. The
all-reduces act on (P,) float32 vectors between kernel launches, so the same
code runs with NCCL (CUDA tensors) and gloo (CPU tensors, Triton interpreter).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ._backend import resolve_backend
from ._validation import check_iterations, check_not_nan, check_positive, check_tensor

try:  # the Triton backend is optional: without triton only backend="torch" works
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

HAS_TRITON = triton is not None


def _jit(fn):
    return triton.jit(fn) if HAS_TRITON else fn


def distributed_group(group: object | None, local: bool) -> object | None:
    """The process group to reduce column statistics over, or None for a local call."""
    if local or not dist.is_available() or not dist.is_initialized():
        return None
    if group is None:
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def all_reduce_(x: torch.Tensor, op: object, group: object | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


def sinkhorn_knopp_reference(
    scores: torch.Tensor, n_iters: int, scale: float, eps: float, group: object | None
) -> torch.Tensor:
    """Eager SK: one float32 N x P buffer (the output), normalized in place."""
    col_max = scores.amax(dim=0).float()
    all_reduce_(col_max, dist.ReduceOp.MAX, group)
    q = scores.float() - col_max  # the output buffer; every later step is in place
    q.exp_()
    for _ in range(n_iters):
        col_sum = all_reduce_(q.sum(dim=0), dist.ReduceOp.SUM, group)
        q.div_(col_sum.add_(eps).pow_(scale))
        q.div_(q.sum(dim=1, keepdim=True).add_(eps))
    return q


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@_jit
def _sk_colstats_kernel(
    s_ptr,
    pmax_ptr,
    psum_ptr,
    N,
    P,
    stride_n,
    stride_p,
    rows_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Pass 1: per (column block, row split) the column max and sum of exp(s - max).

    The running max is rescaled as in flash attention, so the max and the sums
    come from one read. Writes pmax[split, col] and psum[split, col].
    """
    pid_p = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = cols < P
    col_off = cols.to(tl.int64) * stride_p
    row0 = split * rows_per_split
    run_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_P], tl.float32)
    for i in range(0, rows_per_split, BLOCK_N):
        rows = row0 + i + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & cmask[None, :]
        s = tl.load(
            s_ptr + rows.to(tl.int64)[:, None] * stride_n + col_off[None, :],
            mask=mask,
            other=float("-inf"),
        ).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(s, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(s - shift[None, :]), axis=0)
        run_max = new_max
    out = split.to(tl.int64) * P + cols
    tl.store(pmax_ptr + out, run_max, mask=cmask)
    tl.store(psum_ptr + out, run_sum, mask=cmask)


@_jit
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
    cols = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = cols < P
    if FIRST:
        col_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            offs = rows.to(tl.int64)[:, None] * P + cols[None, :]
            mask = (rows < R)[:, None] & cmask[None, :]
            pm = tl.load(pmax_ptr + offs, mask=mask, other=float("-inf"))
            col_max = tl.maximum(col_max, tl.max(pm, axis=0))
        tl.store(m_ptr + cols, col_max, mask=cmask)
        shift = tl.where(col_max == float("-inf"), 0.0, col_max)
    acc = tl.zeros([BLOCK_P], tl.float32)
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


@_jit
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
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Row step (+ next column sums, or the output) with whole rows on chip (BLOCK_P >= P).

    Persistent: program g takes row blocks g, g + G, ... One read of a row block
    gives e = exp(s - m + b + a), the row sums r, the new a = a - log(r + eps)
    and, from the same registers, e / (r + eps): summed over the rows into this
    program's partial column sums, or (LAST) stored as q.
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    # Column vectors are kept 2-D ([1, BLOCK_P]) so that they share the tile's layout.
    cols = tl.arange(0, BLOCK_P)[None, :]
    cmask = cols < P
    col_off = cols.to(tl.int64) * stride_p
    col_acc = tl.zeros([1, BLOCK_P], tl.float32)
    for blk in range(pid, n_blocks, n_prog):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        mask = rmask & cmask
        s = tl.load(
            s_ptr + rows64 * stride_n + col_off,
            mask=mask,
            other=float("-inf"),
            eviction_policy="evict_first",
        ).to(tl.float32)
        m = tl.load(m_ptr + cols, mask=cmask, other=0.0)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
        a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
        e = tl.exp((s - m) + (b + a))
        row_sum = tl.sum(e, axis=1, keep_dims=True) + eps
        tl.store(a_ptr + rows, a - tl.log(row_sum), mask=rmask)
        e = e * (1.0 / row_sum)
        if LAST:
            tl.store(q_ptr + rows64 * P + cols, e, mask=mask)
        else:
            col_acc += tl.sum(e, axis=0, keep_dims=True)
    if not LAST:
        tl.store(part_ptr + pid.to(tl.int64) * P + cols, col_acc, mask=cmask)


@_jit
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
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """The resident kernel's job for rows wider than one tile: two sweeps over a row block.

    Sweep 1 sums e = exp(s - m + b + a) over the row; sweep 2 re-reads the
    block (from L2 when it is still there) and writes the block's partial
    column sums of e / (r + eps), or (LAST) q.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    row_sum = tl.zeros([BLOCK_N], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        cmask = cols < P
        mask = rmask[:, None] & cmask[None, :]
        s = tl.load(
            s_ptr + rows64[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_p,
            mask=mask,
            other=float("-inf"),
        ).to(tl.float32)
        m = tl.load(m_ptr + cols, mask=cmask, other=0.0)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
        row_sum += tl.sum(tl.exp((s - m[None, :]) + (b[None, :] + a[:, None])), axis=1)
    row_sum += eps
    tl.store(a_ptr + rows, a - tl.log(row_sum), mask=rmask)
    inv = 1.0 / row_sum
    for p0 in range(0, P, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        cmask = cols < P
        mask = rmask[:, None] & cmask[None, :]
        s = tl.load(
            s_ptr + rows64[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_p,
            mask=mask,
            other=float("-inf"),
            eviction_policy="evict_first",
        ).to(tl.float32)
        m = tl.load(m_ptr + cols, mask=cmask, other=0.0)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
        e = tl.exp((s - m[None, :]) + (b[None, :] + a[:, None])) * inv[:, None]
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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def resident_config(P: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_P, num_warps) of the resident kernel for rows of P <= MAX_RESIDENT_P columns."""
    block_p = max(16, _next_pow2(P))
    block_n = max(1, RESIDENT_TILE // block_p)
    num_warps = max(4, block_p // 1024)  # about 32 elements of a tile per thread
    return block_n, block_p, num_warps


def resident_block_ps() -> list[int]:
    """Every BLOCK_P the launcher can give the resident kernel (for compile checks)."""
    return [1 << k for k in range(4, MAX_RESIDENT_P.bit_length())]


@functools.cache
def _compile_row_args(s, block_n, block_p, last):
    f32 = torch.empty(1)
    return dict(
        s_ptr=s, m_ptr=f32, b_ptr=f32, a_ptr=f32, part_ptr=f32, q_ptr=f32,
        N=1000, P=1000, stride_n=1000, stride_p=1, eps=1e-8,
        LAST=last, BLOCK_N=block_n, BLOCK_P=block_p,
    )  # fmt: skip


def gpu_compile_cases() -> list[tuple[str, object, dict, int]]:
    """(label, kernel, args, num_warps) for every constexpr configuration the launchers can pick."""
    cases = []
    f32 = torch.empty(1)
    halves = [torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float16)]
    for s in [f32, *halves]:
        cases.append((
            f"colstats/{s.dtype}",
            _sk_colstats_kernel,
            dict(
                s_ptr=s, pmax_ptr=f32, psum_ptr=f32, N=1000, P=1000, stride_n=1000,
                stride_p=1, rows_per_split=64,
                BLOCK_N=COLSTATS_BLOCK_N, BLOCK_P=COLSTATS_BLOCK_P,
            ),
            COLSTATS_WARPS,
        ))  # fmt: skip
    for first in (False, True):
        for finish in (False, True):
            cases.append((
                f"reduce/first={first}/finish={finish}",
                _sk_reduce_kernel,
                dict(
                    pmax_ptr=f32, psum_ptr=f32, m_ptr=f32, b_ptr=f32, colsum_ptr=f32,
                    R=100, P=1000, scale=1.0, eps=1e-8, FIRST=first, FINISH=finish,
                    BLOCK_R=REDUCE_BLOCK_R, BLOCK_P=REDUCE_BLOCK_P,
                ),
                REDUCE_WARPS,
            ))  # fmt: skip
    for last in (False, True):
        for block_p in resident_block_ps():
            block_n, block_p, num_warps = resident_config(block_p)
            cases.append(
                (
                    f"rows_resident/P{block_p}/last={last}",
                    _sk_rows_resident_kernel,
                    _compile_row_args(f32, block_n, block_p, last),
                    num_warps,
                )
            )
        widest = resident_config(MAX_RESIDENT_P)
        for s in halves:
            cases.append(
                (
                    f"rows_resident/{s.dtype}/last={last}",
                    _sk_rows_resident_kernel,
                    _compile_row_args(s, *widest[:2], last),
                    widest[2],
                )
            )
        for s in [f32, *halves]:
            cases.append(
                (
                    f"rows_chunked/{s.dtype}/last={last}",
                    _sk_rows_chunked_kernel,
                    _compile_row_args(s, CHUNKED_BLOCK_N, CHUNKED_BLOCK_P, last),
                    CHUNKED_WARPS,
                )
            )
    return cases


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter runs programs one after another: few, long programs


def _triton_sinkhorn_knopp(
    scores: torch.Tensor,
    n_iters: int,
    scale: float,
    eps: float,
    group: object | None,
    max_resident_p: int = MAX_RESIDENT_P,
    chunk_p: int = CHUNKED_BLOCK_P,
) -> torch.Tensor:
    """Launches the passes described in the module docstring; all-reduces between them if `group`.

    `max_resident_p` and `chunk_p` exist for tests (forcing the chunked kernel on small rows).
    """
    if not HAS_TRITON:
        raise RuntimeError("sinkhorn_knopp: backend='triton' needs the triton package")
    N, P = scores.shape
    device = scores.device
    f32 = torch.float32
    q = torch.empty((N, P), dtype=f32, device=device)
    if q.numel() == 0:
        return q
    scratch = q.view(-1)  # holds partial statistics until the last pass writes q
    m = torch.empty(P, dtype=f32, device=device)
    b = torch.empty(P, dtype=f32, device=device)
    a = torch.zeros(N, dtype=f32, device=device)
    colsum = torch.empty(P, dtype=f32, device=device) if group is not None else b
    n_sm = _sm_count(device)
    stride_n, stride_p = scores.stride()

    def reduce(pmax, psum, rows, first, finish):
        grid = (_cdiv(P, REDUCE_BLOCK_P),)
        _sk_reduce_kernel[grid](
            pmax, psum, m, b, colsum, rows, P, scale, eps,
            FIRST=first, FINISH=finish, BLOCK_R=REDUCE_BLOCK_R, BLOCK_P=REDUCE_BLOCK_P,
            num_warps=REDUCE_WARPS,
        )  # fmt: skip

    # Pass 1: column max and column sums of exp(s - max).
    col_blocks = _cdiv(P, COLSTATS_BLOCK_P)
    row_tiles = _cdiv(N, COLSTATS_BLOCK_N)
    splits = max(1, min(row_tiles, _cdiv(4 * n_sm, col_blocks)))
    rows_per_split = _cdiv(row_tiles, splits) * COLSTATS_BLOCK_N
    splits = _cdiv(N, rows_per_split)
    if 2 * splits <= N:
        pmax, psum = scratch[: splits * P], scratch[splits * P : 2 * splits * P]
    else:
        pmax = torch.empty(splits * P, dtype=f32, device=device)
        psum = torch.empty(splits * P, dtype=f32, device=device)
    _sk_colstats_kernel[(col_blocks, splits)](
        scores, pmax, psum, N, P, stride_n, stride_p, rows_per_split,
        BLOCK_N=COLSTATS_BLOCK_N, BLOCK_P=COLSTATS_BLOCK_P, num_warps=COLSTATS_WARPS,
    )  # fmt: skip
    if group is None:
        reduce(pmax, psum, splits, first=True, finish=True)
    else:
        reduce(pmax, psum, splits, first=True, finish=False)  # local max, sums rescaled to it
        local_max = m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        colsum.mul_(torch.exp(local_max - m))  # rescale to the global max
        dist.all_reduce(colsum, op=dist.ReduceOp.SUM, group=group)
        torch.mul(colsum.add_(eps).log_(), -scale, out=b)

    # Passes 2..n_iters+1: row step, then the next column sums or (last) q.
    if max(16, _next_pow2(P)) <= max_resident_p:
        block_n, block_p, num_warps = resident_config(P)
        kernel = _sk_rows_resident_kernel
        n_prog = min(_cdiv(N, block_n), n_sm * max(1, 16 // num_warps))
    else:
        block_n, block_p, num_warps = CHUNKED_BLOCK_N, chunk_p, CHUNKED_WARPS
        kernel = _sk_rows_chunked_kernel
        n_prog = _cdiv(N, block_n)
    part = scratch[: n_prog * P]  # n_prog <= N
    for it in range(n_iters):
        last = it == n_iters - 1
        kernel[(n_prog,)](
            scores, m, b, a, part, q, N, P, stride_n, stride_p, eps,
            LAST=last, BLOCK_N=block_n, BLOCK_P=block_p, num_warps=num_warps,
        )  # fmt: skip
        if last:
            break
        if group is None:
            reduce(part, part, n_prog, first=False, finish=True)
        else:
            reduce(part, part, n_prog, first=False, finish=False)
            dist.all_reduce(colsum, op=dist.ReduceOp.SUM, group=group)
            b.sub_(colsum.add_(eps).log_().mul_(scale))
    return q


# The local Triton path as a custom op, so that torch.compile traces through it.
@torch.library.custom_op("stellar_kernels::sinkhorn_knopp", mutates_args=())
def sinkhorn_knopp_op(scores: torch.Tensor, n_iters: int, scale: float, eps: float) -> torch.Tensor:
    return _triton_sinkhorn_knopp(scores, n_iters, scale, eps, None)


@sinkhorn_knopp_op.register_fake
def _sinkhorn_knopp_fake(scores, n_iters, scale, eps):
    return scores.new_empty(scores.shape, dtype=torch.float32)


def sinkhorn_knopp(
    scores: torch.Tensor,
    n_iters: int = 3,
    scale: float = 1.0,
    eps: float = 1e-8,
    group: object | None = None,
    local: bool = False,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Balanced soft assignment of N rows to P prototypes.

    Args:
        scores: (N, P) logits already divided by the SK temperature; any float dtype.
        n_iters: column-then-row normalization rounds (>= 1).
        scale: exponent of the column normalization (> 0; 1.0 is plain SK).
        eps: added to every column and row sum (> 0).
        group: process group for the column all-reduces; None means the default
            group when torch.distributed is initialized.
        local: never communicate (for a call made on some ranks only).
        backend: None (fastest available: Triton on CUDA, PyTorch on the CPU),
            "torch" or "triton".
        validate: scan `scores` for NaN (a host synchronization); False skips it.

    Returns:
        q (N, P) float32; `scores` is not modified. The result is a target: no gradient
        flows through it (the Triton custom op has no autograd formula).
    """
    check_tensor("scores", scores, (2,))
    n_iters = check_iterations("n_iters", n_iters)
    scale = check_positive("scale", scale)
    eps = check_positive("eps", eps)
    if validate:
        check_not_nan("scores", scores)
    impl = resolve_backend(
        "sinkhorn_knopp",
        backend,
        scores.device,
        ("torch", "triton"),
        "triton" if HAS_TRITON else "torch",
        "torch",
    )
    pg = distributed_group(group, local)
    if impl == "triton":
        if pg is None:
            return sinkhorn_knopp_op(scores, n_iters, scale, eps)
        return _triton_sinkhorn_knopp(scores, n_iters, scale, eps, pg)
    return sinkhorn_knopp_reference(scores, n_iters, scale, eps, pg)
