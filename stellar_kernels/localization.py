"""Localization matrix (paper eq. 14) and low-rank features (eq. 1): `localization`, `factorize`.

spatial[b, n, k] = softmax_k(cos(dense[b, n], sparse[b, k]) / temperature)
lowrank[b] = spatial[b] @ values[b]

This module holds the Triton kernels, their launchers, the autograd wiring and the public
entry points; the PyTorch reference is `stellar_kernels.reference.factorize_reference`.

* one forward kernel per (image, block of patches) streams `dense` and `sparse` over d,
  normalizes, applies the softmax over K in registers and streams `values` over D;
* one backward kernel per (image, run of patch blocks) writes the dense gradient and
  per-program partial sums for the sparse and values gradients, and a small kernel adds
  the partials in a fixed order (no atomics: results are bitwise reproducible);
* eager calls go through `_FactorizeFunction` (a torch.autograd.Function); under
  torch.compile the same launches run as `torch.library` custom ops with fake
  implementations and a registered backward, so `fullgraph=True` traces through.

The Triton path covers float16, bfloat16 and float32 inputs of one dtype with K <= 64
(float32 accumulation; float32 dots run on tensor cores as "tf32x3": three TF32 products
of split operands, about float32 accuracy, where plain TF32 would keep 10 mantissa bits). The backward kernels
have no derivative of their own: a backward with create_graph=True (the start of a second
derivative) differentiates the PyTorch reference instead, so higher derivatives are exact
on both paths.
"""

import math

import torch

from ._backend import resolve_backend, triton_interpreting
from ._triton import bound_launch, on_device, sm_count, tl, triton
from ._validation import check_finite, check_positive, check_same_device, check_tensor, checking
from .reference import factorize_reference, localization_reference

LOC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_K = 64

# ----------------------------------------------------------------------------- Triton kernels
#
# Dots: MODE 0 is float32 ("tf32x3" tensor-core dots, about float32 accuracy); MODE 1
# bfloat16, MODE 2 float16 (tensor-core dots with float32 accumulation, whose products of
# two loaded operands are exact). A dot of a float32 value computed in the kernel (a gradient) with a loaded
# operand splits the float32 value into a bfloat16 high and low part (16 significant
# bits, float32 range, so a huge gradient of a near-zero row neither overflows nor turns
# into inf * 0 = NaN); for float16 the loaded operand is split the same way (exactly).


@triton.jit
def _mma(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b for half operands; the interpreter (whose bfloat16 dot is wrong) gets the
    same exact products in float32."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _dot(a, b, acc, MODE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b for two operands of the input dtype."""
    if MODE == 0:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return _mma(a, b, acc, INTERPRET)


@triton.jit
def _dot_f32(x, y, acc, MODE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + x @ y for a float32 x and a y of the input dtype, accurate to ~float32."""
    if MODE == 0:
        return tl.dot(x, y, acc, input_precision="tf32x3")
    else:
        x_hi = x.to(tl.bfloat16)
        x_lo = (x - x_hi.to(tl.float32)).to(tl.bfloat16)
        if MODE == 1:
            acc = _mma(x_hi, y, acc, INTERPRET)
            return _mma(x_lo, y, acc, INTERPRET)
        else:
            y32 = y.to(tl.float32)
            y_hi = y32.to(tl.bfloat16)
            y_lo = (y32 - y_hi.to(tl.float32)).to(tl.bfloat16)
            acc = _mma(x_hi, y_hi, acc, INTERPRET)
            acc = _mma(x_lo, y_hi, acc, INTERPRET)
            return _mma(x_hi, y_lo, acc, INTERPRET)


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x rounded to dtype to nearest even (the interpreter truncates float32 -> bfloat16)."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _softmax_rows(cos, kmask, temperature):
    z = tl.where(kmask[None, :], cos / temperature, float("-inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@bound_launch
@triton.jit
def _factorize_fwd_kernel(
    dense_ptr,
    sparse_ptr,
    values_ptr,
    spatial_ptr,
    lowrank_ptr,
    cos_ptr,
    rnorm_ptr,
    snorm_ptr,
    N,
    K,
    d,
    D,
    n_blocks,
    s_db,
    s_dn,
    s_dd,
    s_sb,
    s_sk,
    s_sd,
    s_vb,
    s_vk,
    s_vd,
    temperature,
    MODE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: image b, patches [blk * BLOCK_N, (blk + 1) * BLOCK_N).

    Writes spatial (B, N, K) and lowrank (B, N, D) in the input dtype, and for the
    backward the float32 cosines (B, N, K) and the unclamped row norms of dense
    (B, N) and sparse (B, K).
    """
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    blk = pid % n_blocks
    rows = (blk * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    kmask = ks < K
    dense_rows = dense_ptr + b * s_db + rows[:, None] * s_dn
    sparse_rows = sparse_ptr + b * s_sb + ks[:, None] * s_sk

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dn2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sn2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for j0 in range(0, d, BLOCK_D):
        cj = j0 + cols
        cmask = cj < d
        a = tl.load(dense_rows + cj[None, :] * s_dd, rmask[:, None] & cmask[None, :], other=0.0)
        s = tl.load(sparse_rows + cj[None, :] * s_sd, kmask[:, None] & cmask[None, :], other=0.0)
        a32 = a.to(tl.float32)
        s32 = s.to(tl.float32)
        dn2 += tl.sum(a32 * a32, axis=1)
        sn2 += tl.sum(s32 * s32, axis=1)
        acc = _dot(a, tl.trans(s), acc, MODE, INTERPRET)
    r_raw = tl.sqrt(dn2)
    q_raw = tl.sqrt(sn2)
    cos = acc / (tl.maximum(r_raw, 1e-7)[:, None] * tl.maximum(q_raw, 1e-7)[None, :])
    p = _softmax_rows(cos, kmask, temperature)

    nk = (b * N + rows)[:, None] * K + ks[None, :]
    nkmask = rmask[:, None] & kmask[None, :]
    spatial = _round(p, spatial_ptr.dtype.element_ty, INTERPRET)
    tl.store(spatial_ptr + nk, spatial, mask=nkmask)
    tl.store(cos_ptr + nk, cos, mask=nkmask)
    tl.store(rnorm_ptr + b * N + rows, r_raw, mask=rmask)
    # Conditions on a scalar are `if`s, not mask terms: Triton 3.9's interpreter rejects a
    # scalar comparison broadcast into a mask (its int1 splat is not boolean).
    if blk == 0:
        tl.store(snorm_ptr + b * K + ks, q_raw, mask=kmask)

    # lowrank = spatial @ values with spatial rounded to the input dtype, as the reference
    # (D = 0 without values).
    values_rows = values_ptr + b * s_vb + ks[:, None] * s_vk
    out_rows = lowrank_ptr + (b * N + rows)[:, None] * D
    for j0 in range(0, D, BLOCK_D):
        cj = j0 + cols
        cmask = cj < D
        v = tl.load(values_rows + cj[None, :] * s_vd, kmask[:, None] & cmask[None, :], other=0.0)
        out = _dot(spatial, v, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), MODE, INTERPRET)
        tl.store(
            out_rows + cj[None, :],
            _round(out, lowrank_ptr.dtype.element_ty, INTERPRET),
            mask=rmask[:, None] & cmask[None, :],
        )


@bound_launch
@triton.jit
def _factorize_bwd_kernel(
    dense_ptr,
    sparse_ptr,
    values_ptr,
    cos_ptr,
    rnorm_ptr,
    snorm_ptr,
    gspatial_ptr,
    glowrank_ptr,
    ddense_ptr,
    dsparse_part_ptr,
    dvalues_part_ptr,
    h_part_ptr,
    N,
    K,
    d,
    D,
    split,
    blocks_per_program,
    s_db,
    s_dn,
    s_dd,
    s_sb,
    s_sk,
    s_sd,
    s_vb,
    s_vk,
    s_vd,
    s_gsb,
    s_gsn,
    s_gsk,
    s_glb,
    s_gln,
    s_gld,
    temperature,
    has_gspatial,
    MODE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: image b, patch blocks [sp * bpp, (sp + 1) * bpp) with bpp = blocks_per_program.

    With c the cosines, p = softmax(c / T), dp = g_lowrank @ values^T + g_spatial,
    dc = p * (dp - sum_k p dp) / T, r and q the clamped norms of dense and sparse:
      ddense_n  = (sum_k dc_nk s_k / q_k) / r_n - [|a_n| >= eps] a_n (sum_k dc_nk c_nk) / r_n^2
      partials over this program's patches, added later in a fixed order:
      dsparse_part_k = sum_n dc_nk a_n / r_n,  h_part_k = sum_n dc_nk c_nk,
      dvalues_part_k = sum_n spatial_nk g_lowrank_n (spatial rounded to the input dtype).
    """
    pid = tl.program_id(0)
    b = (pid // split).to(tl.int64)
    sp = pid % split
    part = b * split + sp
    ks = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_D)
    kmask = ks < K
    q_raw = tl.load(snorm_ptr + b * K + ks, mask=kmask, other=1.0)
    q = tl.maximum(q_raw, 1e-7)
    sparse_rows = sparse_ptr + b * s_sb + ks[:, None] * s_sk
    values_rows = values_ptr + b * s_vb + ks[:, None] * s_vk
    dv_rows = dvalues_part_ptr + (part * K + ks)[:, None] * D
    ds_rows = dsparse_part_ptr + (part * K + ks)[:, None] * d
    h = tl.zeros((BLOCK_K,), dtype=tl.float32)

    for it in range(0, blocks_per_program):
        rows = ((sp * blocks_per_program + it) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rmask = rows < N
        nkmask = rmask[:, None] & kmask[None, :]
        nk = (b * N + rows)[:, None] * K + ks[None, :]
        c = tl.load(cos_ptr + nk, mask=nkmask, other=0.0)
        p = _softmax_rows(c, kmask, temperature)

        # D = 0 without a lowrank gradient; has_gspatial = 0 without a spatial gradient.
        # (Scalar conditions are `if`s, not mask terms, as in the forward.)
        dp = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if has_gspatial != 0:
            gs_ptrs = gspatial_ptr + b * s_gsb + rows[:, None] * s_gsn + ks[None, :] * s_gsk
            dp = tl.load(gs_ptrs, mask=nkmask, other=0.0).to(tl.float32)
        spatial_t = tl.trans(_round(p, dense_ptr.dtype.element_ty, INTERPRET))
        gl_rows = glowrank_ptr + b * s_glb + rows[:, None] * s_gln
        for j0 in range(0, D, BLOCK_D):
            cj = j0 + cols
            cmask = cj < D
            gl = tl.load(gl_rows + cj[None, :] * s_gld, rmask[:, None] & cmask[None, :], other=0.0)
            v = tl.load(
                values_rows + cj[None, :] * s_vd, kmask[:, None] & cmask[None, :], other=0.0
            )
            dp = _dot(gl, tl.trans(v), dp, MODE, INTERPRET)
            kcmask = kmask[:, None] & cmask[None, :]
            dv = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
            if it > 0:  # the first block starts the partial sums
                dv = tl.load(dv_rows + cj[None, :], mask=kcmask, other=0.0)
            dv = _dot(spatial_t, gl, dv, MODE, INTERPRET)
            tl.store(dv_rows + cj[None, :], dv, mask=kcmask)

        dc = p * (dp - tl.sum(p * dp, axis=1)[:, None]) / temperature
        dcc = dc * c
        g = tl.sum(dcc, axis=1)
        h += tl.sum(dcc, axis=0)
        r_raw = tl.load(rnorm_ptr + b * N + rows, mask=rmask, other=1.0)
        r = tl.maximum(r_raw, 1e-7)
        radial = tl.where(r_raw >= 1e-7, g / (r * r), 0.0)
        u = dc / q[None, :]
        w_t = tl.trans(dc / r[:, None])

        dense_rows = dense_ptr + b * s_db + rows[:, None] * s_dn
        ddense_rows = ddense_ptr + (b * N + rows)[:, None] * d
        for j0 in range(0, d, BLOCK_D):
            cj = j0 + cols
            cmask = cj < d
            ncmask = rmask[:, None] & cmask[None, :]
            a = tl.load(dense_rows + cj[None, :] * s_dd, ncmask, other=0.0)
            s = tl.load(
                sparse_rows + cj[None, :] * s_sd, kmask[:, None] & cmask[None, :], other=0.0
            )
            da = _dot_f32(u, s, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), MODE, INTERPRET)
            da = da / r[:, None] - a.to(tl.float32) * radial[:, None]
            tl.store(
                ddense_rows + cj[None, :],
                _round(da, ddense_ptr.dtype.element_ty, INTERPRET),
                mask=ncmask,
            )
            kcmask = kmask[:, None] & cmask[None, :]
            ds = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
            if it > 0:
                ds = tl.load(ds_rows + cj[None, :], mask=kcmask, other=0.0)
            ds = _dot_f32(w_t, a, ds, MODE, INTERPRET)
            tl.store(ds_rows + cj[None, :], ds, mask=kcmask)
    tl.store(h_part_ptr + part * K + ks, h, mask=kmask)


@bound_launch
@triton.jit
def _factorize_bwd_reduce_kernel(
    sparse_ptr,
    snorm_ptr,
    dsparse_part_ptr,
    dvalues_part_ptr,
    h_part_ptr,
    dsparse_ptr,
    dvalues_ptr,
    K,
    d,
    D,
    split,
    s_sb,
    s_sk,
    s_sd,
    INTERPRET: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One program: token (b, k), features [f * BLOCK_F, (f + 1) * BLOCK_F).

    Adds the backward's partials in program order and applies the normalization
    Jacobian of sparse: dsparse_k = dshat_k / q_k - [|s_k| >= eps] s_k (sum_n dc_nk c_nk) / q_k^2.
    """
    bk = tl.program_id(0).to(tl.int64)
    b = bk // K
    k = bk % K
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    q_raw = tl.load(snorm_ptr + bk)
    q = tl.maximum(q_raw, 1e-7)
    hsum = 0.0
    ds = tl.zeros((BLOCK_F,), dtype=tl.float32)
    dv = tl.zeros((BLOCK_F,), dtype=tl.float32)
    fd = f < d
    fdd = f < D
    for sp in range(0, split):
        slot = (b * split + sp) * K + k
        hsum += tl.load(h_part_ptr + slot)
        ds += tl.load(dsparse_part_ptr + slot * d + f, mask=fd, other=0.0)
        dv += tl.load(dvalues_part_ptr + slot * D + f, mask=fdd, other=0.0)
    s = tl.load(sparse_ptr + b * s_sb + k * s_sk + f * s_sd, mask=fd, other=0.0).to(tl.float32)
    radial = tl.where(q_raw >= 1e-7, hsum / (q * q), 0.0)
    ds = ds / q - s * radial
    tl.store(dsparse_ptr + bk * d + f, _round(ds, dsparse_ptr.dtype.element_ty, INTERPRET), mask=fd)
    tl.store(
        dvalues_ptr + bk * D + f, _round(dv, dvalues_ptr.dtype.element_ty, INTERPRET), mask=fdd
    )


# ----------------------------------------------------------------------------- launchers

# Tile sizes and warps, chosen without spills (ptxas -v) for every dtype and BLOCK_K on
# sm_90: the forward holds few tiles; the backward holds about ten (BLOCK_N, BLOCK_K)
# float32 tiles besides its chunks, hence narrower chunks and 8 warps.
FWD_BLOCK_N = 64
FWD_BLOCK_D = 64
BWD_BLOCK_N = 64
BWD_BLOCK_D = 32
BWD_NUM_WARPS = 8
REDUCE_BLOCK_F = 256
# The backward aims at this many programs per streaming multiprocessor (two resident
# at 8 warps); fewer programs per image mean fewer partial sums to write and add.
BWD_PROGRAMS_PER_SM = 2

_MODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _fwd_num_warps(block_k: int) -> int:
    return 4 if block_k <= 16 else 8


def _bwd_split(batch: int, n_blocks: int, device: torch.device) -> tuple[int, int]:
    """(programs per image, patch blocks per program) for the backward."""
    split = max(1, min(triton.cdiv(BWD_PROGRAMS_PER_SM * sm_count(device), batch), n_blocks))
    per_program = triton.cdiv(n_blocks, split)
    return triton.cdiv(n_blocks, per_program), per_program


def _fwd_launch(
    dense: torch.Tensor, sparse: torch.Tensor, values: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, n, dim = dense.shape
    k = sparse.shape[1]
    dv_dim = values.shape[2] if values is not None else 0
    dev = dense.device
    spatial = torch.empty((bsz, n, k), dtype=dense.dtype, device=dev)
    lowrank = torch.empty((bsz, n, dv_dim), dtype=dense.dtype, device=dev)
    cos = torch.empty((bsz, n, k), dtype=torch.float32, device=dev)
    rnorm = torch.empty((bsz, n), dtype=torch.float32, device=dev)
    snorm = torch.empty((bsz, k), dtype=torch.float32, device=dev)
    vals = values if values is not None else sparse
    block_k = _block_k(k)
    n_blocks = triton.cdiv(n, FWD_BLOCK_N)
    with on_device(dev):
        _factorize_fwd_kernel[(bsz * n_blocks,)](
            dense,
            sparse,
            vals,
            spatial,
            lowrank,
            cos,
            rnorm,
            snorm,
            n,
            k,
            dim,
            dv_dim,
            n_blocks,
            *dense.stride(),
            *sparse.stride(),
            *vals.stride(),
            float(temperature),
            MODE=_MODES[dense.dtype],
            INTERPRET=triton_interpreting(),
            BLOCK_N=FWD_BLOCK_N,
            BLOCK_K=block_k,
            BLOCK_D=FWD_BLOCK_D,
            num_warps=_fwd_num_warps(block_k),
        )
    return spatial, lowrank, cos, rnorm, snorm


def _bwd_launch(
    grad_spatial: torch.Tensor | None,
    grad_lowrank: torch.Tensor | None,
    dense: torch.Tensor,
    sparse: torch.Tensor,
    values: torch.Tensor | None,
    cos: torch.Tensor,
    rnorm: torch.Tensor,
    snorm: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, n, dim = dense.shape
    k = sparse.shape[1]
    dev = dense.device
    dv_dim = values.shape[2] if values is not None else 0
    d_dense = torch.empty((bsz, n, dim), dtype=dense.dtype, device=dev)
    d_sparse = torch.empty((bsz, k, dim), dtype=sparse.dtype, device=dev)
    d_values = torch.empty((bsz, k, dv_dim), dtype=dense.dtype, device=dev)
    has_gl = values is not None and grad_lowrank is not None and dv_dim > 0
    has_gs = grad_spatial is not None
    if values is not None and not has_gl:
        d_values.zero_()
    if not has_gs and not has_gl:
        return d_dense.zero_(), d_sparse.zero_(), d_values
    block_k = _block_k(k)
    n_blocks = triton.cdiv(n, BWD_BLOCK_N)
    split, per_program = _bwd_split(bsz, n_blocks, dev)
    ds_part = torch.empty((bsz, split, k, dim), dtype=torch.float32, device=dev)
    dv_part = torch.empty((bsz, split, k, dv_dim if has_gl else 0), dtype=torch.float32, device=dev)
    h_part = torch.empty((bsz, split, k), dtype=torch.float32, device=dev)
    vals = values if has_gl else sparse
    gl = grad_lowrank if has_gl else dense
    gs = grad_spatial if has_gs else cos
    with on_device(dev):
        _factorize_bwd_kernel[(bsz * split,)](
            dense,
            sparse,
            vals,
            cos,
            rnorm,
            snorm,
            gs,
            gl,
            d_dense,
            ds_part,
            dv_part,
            h_part,
            n,
            k,
            dim,
            dv_dim if has_gl else 0,
            split,
            per_program,
            *dense.stride(),
            *sparse.stride(),
            *vals.stride(),
            *gs.stride(),
            *gl.stride(),
            float(temperature),
            int(has_gs),
            MODE=_MODES[dense.dtype],
            INTERPRET=triton_interpreting(),
            BLOCK_N=BWD_BLOCK_N,
            BLOCK_K=block_k,
            BLOCK_D=BWD_BLOCK_D,
            num_warps=BWD_NUM_WARPS,
        )
        n_features = max(dim, dv_dim if has_gl else 0)
        if n_features > 0:
            _factorize_bwd_reduce_kernel[(bsz * k, triton.cdiv(n_features, REDUCE_BLOCK_F))](
                sparse,
                snorm,
                ds_part,
                dv_part,
                h_part,
                d_sparse,
                d_values,
                k,
                dim,
                dv_dim if has_gl else 0,
                split,
                *sparse.stride(),
                INTERPRET=triton_interpreting(),
                BLOCK_F=REDUCE_BLOCK_F,
            )
    return d_dense, d_sparse, d_values


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("stellar_kernels::factorize_triton", mutates_args=())
def _factorize_op(
    dense: torch.Tensor, sparse: torch.Tensor, values: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(spatial, lowrank, cos, rnorm, snorm); lowrank is (B, N, 0) without values.

    cos (float32 cosines) and the unclamped row norms of dense and sparse are
    saved for the backward.
    """
    return _fwd_launch(dense, sparse, values, temperature)


@_factorize_op.register_fake
def _(dense, sparse, values, temperature):
    bsz, n, _ = dense.shape
    k = sparse.shape[1]
    dv_dim = values.shape[2] if values is not None else 0
    return (
        dense.new_empty((bsz, n, k)),
        dense.new_empty((bsz, n, dv_dim)),
        dense.new_empty((bsz, n, k), dtype=torch.float32),
        dense.new_empty((bsz, n), dtype=torch.float32),
        dense.new_empty((bsz, k), dtype=torch.float32),
    )


@torch.library.custom_op("stellar_kernels::factorize_triton_backward", mutates_args=())
def _factorize_backward_op(
    grad_spatial: torch.Tensor | None,
    grad_lowrank: torch.Tensor | None,
    dense: torch.Tensor,
    sparse: torch.Tensor,
    values: torch.Tensor | None,
    cos: torch.Tensor,
    rnorm: torch.Tensor,
    snorm: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_dense, d_sparse, d_values); d_values is (B, K, 0) without values."""
    return _bwd_launch(
        grad_spatial, grad_lowrank, dense, sparse, values, cos, rnorm, snorm, temperature
    )


@_factorize_backward_op.register_fake
def _(grad_spatial, grad_lowrank, dense, sparse, values, cos, rnorm, snorm, temperature):
    bsz, k, dim = sparse.shape
    dv_dim = values.shape[2] if values is not None else 0
    return (
        dense.new_empty(dense.shape),
        sparse.new_empty(sparse.shape),
        dense.new_empty((bsz, k, dv_dim)),
    )


def _setup_context(ctx, inputs, output):
    dense, sparse, values, temperature = inputs
    _, _, cos, rnorm, snorm = output
    ctx.mark_non_differentiable(cos, rnorm, snorm)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(dense, sparse, values, cos, rnorm, snorm)
    ctx.temperature = temperature
    ctx.has_values = values is not None


def _differentiable_backward(ctx, grad_spatial, grad_lowrank):
    """The backward under create_graph=True: the reference's gradient, built as a graph,
    so a second derivative through the Triton path is exact. The backward kernels compute
    the same first derivative but have no derivative of their own."""
    dense, sparse, values = ctx.saved_tensors[:3]
    with torch.enable_grad():
        if values is None:
            outputs = (localization_reference(dense, sparse, ctx.temperature),)
        else:
            outputs = factorize_reference(dense, sparse, values, ctx.temperature)
    pairs = [(o, g) for o, g in zip(outputs, (grad_spatial, grad_lowrank)) if g is not None]
    wanted = [i for i, t in enumerate((dense, sparse, values)) if t is not None and t.requires_grad]
    grads: list[torch.Tensor | None] = [None, None, None, None]
    if pairs and wanted:
        found = torch.autograd.grad(
            [o for o, _ in pairs],
            [(dense, sparse, values)[i] for i in wanted],
            [g for _, g in pairs],
            create_graph=True,
            allow_unused=True,
        )
        for i, g in zip(wanted, found):
            grads[i] = g
    return tuple(grads)


def _backward(ctx, grad_spatial, grad_lowrank, *_unused):
    if torch.is_grad_enabled():
        return _differentiable_backward(ctx, grad_spatial, grad_lowrank)
    dense, sparse, values, cos, rnorm, snorm = ctx.saved_tensors
    d_dense, d_sparse, d_values = _factorize_backward_op(
        grad_spatial, grad_lowrank, dense, sparse, values, cos, rnorm, snorm, ctx.temperature
    )
    return d_dense, d_sparse, (d_values if ctx.has_values else None), None


_factorize_op.register_autograd(_backward, setup_context=_setup_context)


class _FactorizeFunction(torch.autograd.Function):
    """The eager path: the launches of the custom ops above without the dispatcher's
    per-call overhead (tens of microseconds, more than the forward kernel itself at ViT-B
    size); torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, dense, sparse, values, temperature):
        spatial, lowrank, cos, rnorm, snorm = _fwd_launch(dense, sparse, values, temperature)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(dense, sparse, values, cos, rnorm, snorm)
        ctx.temperature = temperature
        ctx.has_values = values is not None
        return spatial, lowrank

    @staticmethod
    def backward(ctx, grad_spatial, grad_lowrank):
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_spatial, grad_lowrank)
        dense, sparse, values, cos, rnorm, snorm = ctx.saved_tensors
        d_dense, d_sparse, d_values = _bwd_launch(
            grad_spatial, grad_lowrank, dense, sparse, values, cos, rnorm, snorm, ctx.temperature
        )
        return d_dense, d_sparse, (d_values if ctx.has_values else None), None


def _factorize_triton(
    dense: torch.Tensor, sparse: torch.Tensor, values: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if dense.numel() == 0 or sparse.numel() == 0:  # nothing to launch for
        if values is None:
            return localization_reference(dense, sparse, temperature), dense.new_empty(0)
        return factorize_reference(dense, sparse, values, temperature)
    if torch.compiler.is_compiling():
        return _factorize_op(dense, sparse, values, temperature)[:2]
    return _FactorizeFunction.apply(dense, sparse, values, temperature)


# ----------------------------------------------------------------------------- public API


def _check_pair(dense: torch.Tensor, sparse: torch.Tensor, temperature: float) -> float:
    check_tensor("dense", dense, (3,), LOC_DTYPES)
    check_tensor("sparse", sparse, (3,), LOC_DTYPES)
    check_same_device(dense=dense, sparse=sparse)
    if dense.shape[0] != sparse.shape[0] or dense.shape[2] != sparse.shape[2]:
        raise ValueError(
            "dense (B, N, d) and sparse (B, K, d) must agree in B and d: "
            f"dense {tuple(dense.shape)}, sparse {tuple(sparse.shape)}"
        )
    if dense.dtype != sparse.dtype:
        raise ValueError(
            f"dense and sparse must have one dtype, got {dense.dtype} and {sparse.dtype}"
        )
    return check_positive("temperature", temperature)


def _check_inputs(
    dense: torch.Tensor, sparse: torch.Tensor, values: torch.Tensor | None = None
) -> None:
    """No NaN or infinity, and features whose squared norms stay within the computing dtype
    (float32, or float64 for float64 inputs): |x| sqrt(d) at most sqrt(max) / 4. lowrank
    is a convex combination of the values, so they need only be finite."""
    acc = torch.promote_types(dense.dtype, torch.float32)
    limit = math.sqrt(torch.finfo(acc).max) / 4 / math.sqrt(max(dense.shape[2], 1))
    why = f"their squared norms would leave {str(acc).removeprefix('torch.')}"
    extra = {} if values is None else {"values": values}
    check_finite(why, dense=(dense, limit), sparse=(sparse, limit), **extra)


def _triton_reason(
    dense: torch.Tensor, sparse: torch.Tensor, values: torch.Tensor | None
) -> str | None:
    """Why the Triton kernels cannot serve these inputs (None when they can)."""
    if dense.dtype not in TRITON_DTYPES:
        return f"{dense.dtype} inputs (the Triton kernels take float16, bfloat16 and float32)"
    if values is not None and values.dtype != dense.dtype:
        return (
            f"values has dtype {values.dtype} and dense {dense.dtype} "
            "(the Triton kernels take one dtype)"
        )
    if sparse.shape[1] > MAX_TRITON_K:
        return f"K = {sparse.shape[1]} tokens (the Triton kernels take K <= {MAX_TRITON_K})"
    return None


def _pick(
    op: str,
    backend: str | None,
    dense: torch.Tensor,
    sparse: torch.Tensor,
    values: torch.Tensor | None,
) -> str:
    return resolve_backend(
        op,
        backend,
        dense.device,
        ("torch", "triton"),
        "triton",
        "torch",
        cannot_serve=lambda impl: (
            _triton_reason(dense, sparse, values) if impl == "triton" else None
        ),
    )


def localization(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    temperature: float = 0.06,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Softmax over the K tokens of cos(dense_n, sparse_k) / temperature.

    Args:
        dense: (B, N, d) projected patch features.
        sparse: (B, K, d) projected sparse tokens, same dtype.
        temperature: softmax temperature (> 0), a Python number (no gradient).
        backend: None (Triton on CUDA tensors, else the PyTorch reference; the reference
            also for float64 inputs, K > 64, or where triton is not installed), "torch"
            or "triton" (a CUDA tensor, or a CPU tensor under TRITON_INTERPRET=1, of a
            half or float32 dtype with K <= 64; else ValueError).
        validate: raise ValueError if `dense` or `sparse` holds NaN or an infinity, or
            entries so large that squared norms would overflow (|x| sqrt(d) beyond 4.6e18
            in float32; one host read); skipped while torch.compile traces and while a
            CUDA graph captures, and everywhere with validate=False.

    Returns:
        spatial (B, N, K) in the input dtype; differentiable w.r.t. dense and sparse, with
        the same gradients on every backend; second derivatives too (through Triton, a
        backward with create_graph=True differentiates the reference).
    """
    temperature = _check_pair(dense, sparse, temperature)
    impl = _pick("localization", backend, dense, sparse, None)
    if checking(validate, dense):
        _check_inputs(dense, sparse)
    if impl == "triton":
        return _factorize_triton(dense, sparse, None, temperature)[0]
    return localization_reference(dense, sparse, temperature)


def factorize(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    values: torch.Tensor,
    temperature: float = 0.06,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Localization matrix and the low-rank features it spans.

    Args:
        dense: (B, N, d) projected patch features (W_d D).
        sparse: (B, K, d) projected sparse tokens (W_s S), same dtype.
        values: (B, K, D) the sparse tokens themselves.
        temperature: softmax temperature (> 0), a Python number (no gradient).
        backend: None (Triton on CUDA tensors, else the PyTorch reference; the reference
            also for float64 inputs, values of another dtype than dense, K > 64, or where
            triton is not installed), "torch" or "triton" (a CUDA tensor, or a CPU tensor
            under TRITON_INTERPRET=1, of one half or float32 dtype with K <= 64; else
            ValueError).
        validate: raise ValueError if `dense`, `sparse` or `values` holds NaN or an
            infinity, or if `dense` or `sparse` has entries so large that squared norms
            would overflow (|x| sqrt(d) beyond 4.6e18 in float32; one host read); skipped
            while torch.compile traces and while a CUDA graph captures, and everywhere
            with validate=False.

    Returns:
        (spatial (B, N, K), lowrank (B, N, D) = spatial @ values), differentiable
        w.r.t. dense, sparse and values, with the same gradients on every backend;
        second derivatives too (through Triton, a backward with create_graph=True
        differentiates the reference).
    """
    temperature = _check_pair(dense, sparse, temperature)
    check_tensor("values", values, (3,), LOC_DTYPES)
    check_same_device(dense=dense, values=values)
    if values.shape[:2] != sparse.shape[:2]:
        raise ValueError(
            "values (B, K, D) must match sparse (B, K, d) in B and K: "
            f"sparse {tuple(sparse.shape)}, values {tuple(values.shape)}"
        )
    impl = _pick("factorize", backend, dense, sparse, values)
    if checking(validate, dense):
        _check_inputs(dense, sparse, values)
    if impl == "triton":
        return _factorize_triton(dense, sparse, values, temperature)
    return factorize_reference(dense, sparse, values, temperature)
