"""Where the time goes: measurements behind benchmarks/NOTES.md (GPU only).

    python benchmarks/gpu_diagnostics.py [--out FILE.json]

For each operator: the eager time of one call (CUDA events around the Python call,
as the figures measure it) against the GPU time of the same call replayed from a
CUDA graph (no host in it), and the graph time as one factor varies: the token
dimension, the iteration count, the rounding, the warps of a kernel, the passes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stellar_kernels as sk  # noqa: E402
from benchmarks.common import copy_bandwidth_gbs, graph_ms, median_ms  # noqa: E402
from stellar_kernels import _triton  # noqa: E402

# The module (the package attribute of that name is the function).
tokens_module = importlib.import_module("stellar_kernels.match_tokens")

ROWS: list[dict] = []


def record(op: str, case: str, fn, **extra) -> None:
    try:
        fn()
        torch.cuda.synchronize()
        row = {
            "op": op,
            "case": case,
            "eager_ms": round(median_ms(fn, "cuda"), 4),
            "graph_ms": round(graph_ms(fn), 4),
            **extra,
        }
    except Exception as err:  # one failing case must not lose the others
        ROWS.append({"op": op, "case": case, "error": f"{type(err).__name__}: {err}"[:500]})
        print(f"{op:<16} {case:<44} FAILED {ROWS[-1]['error']}", flush=True)
        return
    ROWS.append(row)
    print(
        f"{op:<16} {case:<44} eager {row['eager_ms']:8.4f}  graph {row['graph_ms']:8.4f}",
        flush=True,
    )


def _fwd(inputs, backend=None):
    with torch.no_grad():
        return sk.factorize(*inputs, 0.06, backend=backend)


def _fwd_bwd(inputs, grads, backend=None):
    out = sk.factorize(*inputs, 0.06, backend=backend)
    return torch.autograd.grad(out, inputs, grads)


def factorize_rows(dtype: torch.dtype) -> None:
    b, n, k, d = 128, 196, 16, 768
    shapes = ((b, n, d), (b, k, d), (b, k, d))
    inputs = tuple(torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for s in shapes)
    grads = (
        torch.randn(b, n, k, device="cuda", dtype=dtype),
        torch.randn(b, n, d, device="cuda", dtype=dtype),
    )
    name = f"B128 N196 K16 D768 {str(dtype).removeprefix('torch.')}"
    record("factorize", f"fwd {name}", partial(_fwd, inputs))
    record("factorize", f"fwd torch {name}", partial(_fwd, inputs, "torch"))
    for label, backend in (("", None), ("torch ", "torch")):
        fn = partial(_fwd_bwd, inputs, grads, backend)
        row = {
            "op": "factorize",
            "case": f"fwd+bwd {label}{name}",
            "eager_ms": median_ms(fn, "cuda"),
        }
        ROWS.append(row)
        print(f"{row['op']:<16} {row['case']:<44} eager {row['eager_ms']:8.4f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs(dev)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.0f} GB/s (read + write)")

    # Launch overhead: the smallest torch op and the smallest of our calls.
    x = torch.randn(16, device=dev)
    record("launch", "torch add (one tiny kernel)", partial(torch.add, x, 1.0))
    tiny = torch.rand(1, 2, 2, device=dev)
    record("launch", "sinkhorn_match B1 K2", partial(sk.sinkhorn_match, tiny, validate=False))

    # sinkhorn_match on a given cost.
    cost = torch.rand(512, 16, 16, device=dev)
    for rounding in ("permutation", "argmax"):
        record(
            "sinkhorn_match",
            f"B512 K16 {rounding}",
            partial(sk.sinkhorn_match, cost, rounding=rounding, validate=False),
        )
    record(
        "sinkhorn_match",
        "B512 K16 n_iters=1",
        partial(sk.sinkhorn_match, cost, n_iters=1, validate=False),
    )
    record(
        "sinkhorn_match",
        "torch reference B512 K16",
        partial(sk.sinkhorn_match, cost, rounding="argmax", backend="torch", validate=False),
    )

    # match_tokens: cost building against the Sinkhorn part.
    for d in (16, 64, 768):
        pred = torch.randn(512, 16, d, device=dev)
        target = torch.randn(64, 16, d, device=dev)
        record(
            "match_tokens",
            f"B512 K16 D{d} fp32",
            partial(sk.match_tokens, pred, target, validate=False),
            bytes=(pred.numel() + target.numel()) * 4,
        )
    pred = torch.randn(512, 16, 768, device=dev)
    target = torch.randn(64, 16, 768, device=dev)
    record(
        "match_tokens",
        "B512 K16 D768 fp32 n_iters=1 argmax",
        partial(sk.match_tokens, pred, target, n_iters=1, rounding="argmax", validate=False),
    )
    record(
        "match_tokens",
        "B512 K16 D768 bf16",
        partial(sk.match_tokens, pred.bfloat16(), target.bfloat16(), validate=False),
    )
    # Every launch candidate: one program per view ("per row"), or VB views of one image per
    # program ("per image", each target chunk read once for them).
    for per_program, warps in tokens_module.match_tokens_candidates(16, 8):
        fn = partial(sk.match_tokens, pred, target, validate=False)
        form = "per row" if per_program == tokens_module.PER_ROW else f"per image VB={per_program}"
        # The autotuner restricted to one candidate, with a fresh cache.
        original = tokens_module.match_tokens_candidates
        tokens_module.match_tokens_candidates = lambda *_, c=(per_program, warps): [c]
        _triton.TUNED.clear()
        try:
            record("match_tokens", f"B512 K16 D768 fp32 {form} num_warps={warps}", fn)
        finally:
            tokens_module.match_tokens_candidates = original
            _triton.TUNED.clear()
    record(
        "match_tokens",
        "torch reference B512 K16 D768",
        partial(sk.match_tokens, pred, target, rounding="argmax", backend="torch", validate=False),
    )

    # sinkhorn_knopp: per-pass cost from the slope over n_iters.
    scores = torch.randn(2048, 16384, device=dev) / 0.06
    for n_iters in (1, 2, 3, 5):
        record(
            "sinkhorn_knopp",
            f"N2048 P16384 fp32 n_iters={n_iters}",
            partial(sk.sinkhorn_knopp, scores, n_iters=n_iters, validate=False),
            one_pass_ms=round(scores.numel() * 4 / (bw * 1e9 / 2) * 1e3, 4),
        )
    record(
        "sinkhorn_knopp",
        "torch reference N2048 P16384 n_iters=3",
        partial(sk.sinkhorn_knopp, scores, backend="torch", validate=False),
    )

    # factorize: forward against forward + backward.
    for dtype in (torch.bfloat16, torch.float32):
        factorize_rows(dtype)

    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_bandwidth_gbs": round(bw, 1),
        "rows": ROWS,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
