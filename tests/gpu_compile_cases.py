"""Every Triton kernel with every launch configuration its launcher can choose.

(The modules are imported by name: the package exports functions of the same names.)

Each function returns (label, kernel, arguments for
`stellar_kernels.testing.compile_for_gpu`, num_warps) tuples; test_compile_for_gpu
compiles them for sm_80 and sm_90 in fresh processes (the GPU compiler rejects code
the interpreter accepts). Update a table when a launcher gains a configuration.
"""

from __future__ import annotations

import importlib

import torch


def sinkhorn_match_cases() -> list[tuple[str, object, dict, int]]:
    """Every constexpr configuration with float32 costs; half-precision costs change only
    the loads, so they are listed with the smallest tile and with the loop kernel."""
    sm = importlib.import_module("stellar_kernels.sinkhorn_match")

    cases = []
    runtime = {"scale": 2.5, "n_iters": 5, "permutation": 1}
    strides = {"stride_b": 4099, "stride_q": 67, "stride_t": 3}
    out = {"plan_ptr": "*fp32", "index_ptr": "*i64"}
    for dtype in ("fp32", "fp16", "bf16"):
        for tile in (16, 32, 64, 128):
            configs = sm.sinkhorn_candidates(tile)
            if dtype != "fp32":
                configs = configs[:1] if tile == 16 else []
            for per_program, warps in configs:
                args = {"cost_ptr": f"*{dtype}", **out, "B": 100, "Q": 13, "T": 15, **strides}
                args.update(runtime, P=per_program, BK=tile)
                label = f"tile {dtype} BK={tile} P={per_program} warps={warps}"
                cases.append((label, sm._sinkhorn_tile_kernel, args, warps))
        args = {"cost_ptr": f"*{dtype}", **out, "u_ptr": "*fp32", "v_ptr": "*fp32"}
        args.update(best_ptr="*fp32", arg_ptr="*i32", taken_ptr="*i32", Q=130, T=150)
        args.update(strides, **runtime, BQ=sm.LOOP_BLOCK, BT=sm.LOOP_BLOCK)
        cases.append((f"loop {dtype}", sm._sinkhorn_loop_kernel, args, sm.LOOP_WARPS))
    return cases


def match_tokens_cases() -> list[tuple[str, object, dict, int]]:
    """Every tile and candidate (views per program, num_warps) with float32 tokens, the
    per-row form's with float16 tokens; bfloat16 tokens and mixed dtypes with the K = 16
    default. The per-image form (VB >= 2; its batched `tl.dot` on 3-D operands meets
    constraints the interpreter does not check) with half tokens at its smallest and largest
    VB: half precision changes only the loads (the kernel converts each chunk to float32)."""
    mt = importlib.import_module("stellar_kernels.match_tokens")

    cases = []
    dtypes = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("bf16", "fp32")]
    for pred, target in dtypes:
        for tile in (16, 32, 64, 128):
            # V = 16: every per-image candidate exists (V = 3, below, runs with masked views).
            configs = mt.match_tokens_candidates(tile, 16)
            if pred != "fp32":
                rows = [c for c in configs if c[0] == mt.PER_ROW]
                images = [c for c in configs if c[0] in (2, 16)] if tile == 16 else []
                configs = (rows if pred == "fp16" else rows[:1] if tile == 16 else []) + images
            for per_program, warps in configs:
                args = {"pred_ptr": f"*{pred}", "target_ptr": f"*{target}"}
                args.update(plan_ptr="*fp32", index_ptr="*i64")
                form = "row" if per_program == mt.PER_ROW else f"image VB={per_program}"
                args.update(V=3, Q=13, T=15, D=770)
                args.update(stride_pb=12345, stride_pq=771, stride_pd=3)
                args.update(stride_tb=12347, stride_tt=773, stride_td=5)
                args.update(scale=2.5, n_iters=5, permutation=1)
                bd = mt.match_tokens_block_d(tile, per_program, warps)
                args.update(VB=per_program, BK=tile, BD=bd)
                label = f"tokens {form} {pred}/{target} BK={tile} warps={warps}"
                cases.append((label, mt._match_tokens_kernel, args, warps))
    return cases


def _row_args(
    s: torch.Tensor,
    acc: torch.Tensor,
    block_n: int,
    block_p: int,
    last: bool,
    exact: bool,
    prefetch: int | None = None,
) -> dict:
    args = dict(
        s_ptr=s, m_ptr=acc, b_ptr=acc, a_ptr=acc, part_ptr=acc, q_ptr=acc,
        N=1000, P=1000, stride_n=1000, stride_p=1, eps=0.0 if exact else 1e-8,
        LAST=last, EXACT=exact, BLOCK_N=block_n, BLOCK_P=block_p,
    )  # fmt: skip
    if prefetch is not None:  # the resident kernel's
        args["PREFETCH"] = prefetch
    return args


def sinkhorn_knopp_cases() -> list[tuple[str, object, dict, int]]:
    """Every kernel for every score dtype (float64 scores with float64 statistics), every
    resident BLOCK_P and both row steps (EXACT: eps = 0, shifted by the row max)."""
    skm = importlib.import_module("stellar_kernels.sinkhorn_knopp")

    cases = []
    f32, f64, i32 = (torch.empty(1, dtype=d) for d in (torch.float32, torch.float64, torch.int32))
    scores = [torch.empty(1, dtype=d) for d in (torch.float32, torch.float64)]
    scores += [torch.empty(1, dtype=d) for d in (torch.bfloat16, torch.float16)]

    def acc(s: torch.Tensor) -> torch.Tensor:
        return f64 if s.dtype == torch.float64 else f32

    for s in scores:
        for check_rows in (False, True):
            args = dict(
                s_ptr=s, pmax_ptr=acc(s), psum_ptr=acc(s), flag_ptr=acc(s), seen_ptr=i32,
                N=1000, P=1000, stride_n=1000, stride_p=1, rows_per_split=64,
                LIMIT=torch.finfo(acc(s).dtype).max / 2, CHECK_ROWS=check_rows, BLOCK_N=skm.COLSTATS_BLOCK_N,
                BLOCK_P=skm.COLSTATS_BLOCK_P,
            )  # fmt: skip
            label = f"colstats/{s.dtype}/check_rows={check_rows}"
            cases.append((label, skm._sk_colstats_kernel, args, skm.COLSTATS_WARPS))
    for a in (f32, f64):
        for first in (False, True):
            for finish in (False, True):
                args = dict(
                    pmax_ptr=a, psum_ptr=a, m_ptr=a, b_ptr=a, colsum_ptr=a,
                    R=100, P=1000, scale=1.0, eps=1e-8, FIRST=first, FINISH=finish,
                    BLOCK_R=skm.REDUCE_BLOCK_R, BLOCK_P=skm.REDUCE_BLOCK_P,
                )  # fmt: skip
                label = f"reduce/{a.dtype}/first={first}/finish={finish}"
                cases.append((label, skm._sk_reduce_kernel, args, skm.REDUCE_WARPS))
    resident = [1 << k for k in range(4, skm.MAX_RESIDENT_P.bit_length())]
    for exact in (False, True):
        for last in (False, True):
            for block_p in resident:
                block_n, block_p, default_warps = skm.resident_config(block_p)
                for prefetch, warps in skm.resident_candidates(default_warps):
                    args = _row_args(f32, f32, block_n, block_p, last, exact, prefetch)
                    label = (
                        f"resident/P{block_p}/last={last}/exact={exact}/prefetch={prefetch}"
                        f"/warps={warps}"
                    )
                    cases.append((label, skm._sk_rows_resident_kernel, args, warps))
            block_n, block_p, default_warps = skm.resident_config(skm.MAX_RESIDENT_P)
            for s in scores[1:]:
                for prefetch, warps in skm.resident_candidates(default_warps):
                    args = _row_args(s, acc(s), block_n, block_p, last, exact, prefetch)
                    label = (
                        f"resident/{s.dtype}/last={last}/exact={exact}/prefetch={prefetch}"
                        f"/warps={warps}"
                    )
                    cases.append((label, skm._sk_rows_resident_kernel, args, warps))
            for s in scores:
                block = (skm.CHUNKED_BLOCK_N, skm.CHUNKED_BLOCK_P)
                args = _row_args(s, acc(s), *block, last, exact)
                label = f"chunked/{s.dtype}/last={last}/exact={exact}"
                cases.append((label, skm._sk_rows_chunked_kernel, args, skm.CHUNKED_WARPS))
    return cases


def localization_cases() -> list[tuple[str, object, dict, int]]:
    """Forward and backward for every dtype and BLOCK_K, and the reduce kernel, with ViT-B
    sizes (196 patches, 768 channels)."""
    import triton

    loc = importlib.import_module("stellar_kernels.localization")

    n, d = 196, 768
    rows = dict(b=n * d, n=d, d=1)  # strides of a contiguous (B, N, d) tensor
    cases = []
    for dtype, mode in loc._MODES.items():
        io = torch.empty(1, dtype=dtype)
        f32 = torch.empty(1, dtype=torch.float32)
        name = str(dtype).removeprefix("torch.")
        for block_k in sorted({loc._block_k(k) for k in range(1, loc.MAX_TRITON_K + 1)}):
            k = block_k - 1
            toks = dict(b=k * d, k=d, d=1)  # strides of a contiguous (B, K, d) tensor
            common = dict(
                N=n, K=k, d=d, D=d, temperature=0.06, MODE=mode, INTERPRET=False,
                BLOCK_K=block_k,
                **{f"s_d{a}": v for a, v in rows.items()},
                **{f"s_s{a}": v for a, v in toks.items()},
                **{f"s_v{a}": v for a, v in toks.items()},
            )  # fmt: skip
            fwd = dict(
                dense_ptr=io, sparse_ptr=io, values_ptr=io, spatial_ptr=io, lowrank_ptr=io,
                cos_ptr=f32, rnorm_ptr=f32, snorm_ptr=f32,
                n_blocks=triton.cdiv(n, loc.FWD_BLOCK_N),
                BLOCK_N=loc.FWD_BLOCK_N, BLOCK_D=loc.FWD_BLOCK_D, **common,
            )  # fmt: skip
            bwd = dict(
                dense_ptr=io, sparse_ptr=io, values_ptr=io, cos_ptr=f32, rnorm_ptr=f32,
                snorm_ptr=f32, gspatial_ptr=io, glowrank_ptr=io, ddense_ptr=io,
                dsparse_part_ptr=f32, dvalues_part_ptr=f32, h_part_ptr=f32,
                split=2, blocks_per_program=2, s_gsb=n * k, s_gsn=k, s_gsk=1,
                **{f"s_gl{a}": v for a, v in rows.items()},
                has_gspatial=1, BLOCK_N=loc.BWD_BLOCK_N, BLOCK_D=loc.BWD_BLOCK_D, **common,
            )  # fmt: skip
            warps = loc._fwd_num_warps(block_k)
            cases.append((f"fwd_{name}_BLOCK_K{block_k}", loc._factorize_fwd_kernel, fwd, warps))
            label = f"bwd_{name}_BLOCK_K{block_k}"
            cases.append((label, loc._factorize_bwd_kernel, bwd, loc.BWD_NUM_WARPS))
        reduce = dict(
            sparse_ptr=io, snorm_ptr=f32, dsparse_part_ptr=f32, dvalues_part_ptr=f32,
            h_part_ptr=f32, dsparse_ptr=io, dvalues_ptr=io, K=16, d=d, D=d, split=2,
            s_sb=16 * d, s_sk=d, s_sd=1, INTERPRET=False, BLOCK_F=loc.REDUCE_BLOCK_F,
        )  # fmt: skip
        cases.append((f"reduce_{name}", loc._factorize_bwd_reduce_kernel, reduce, 4))
    return cases
