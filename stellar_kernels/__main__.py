"""`python -m stellar_kernels`: a self-check of every operator on this machine.

Runs each operator with its default backend for this device on random inputs,
compares it with an independent reference (float64 numpy math or scipy) and prints
one line per operator.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

import stellar_kernels as sk
from stellar_kernels._extension import cuda_extension_built


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


def sinkhorn_knopp_float64(scores: np.ndarray, n_iters: int) -> np.ndarray:
    """SwAV's normalization in float64 log space (columns, then rows, n_iters times)."""
    log_q = scores - scores.max(axis=0, keepdims=True)
    for _ in range(n_iters):
        for axis in (0, 1):
            top = log_q.max(axis=axis, keepdims=True)
            log_q = log_q - top - np.log(np.exp(log_q - top).sum(axis=axis, keepdims=True))
    return np.exp(log_q)


def factorize_float64(
    dense: np.ndarray, sparse: np.ndarray, values: np.ndarray, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over tokens of cosine similarities / temperature, and its product with values."""
    d = dense / np.linalg.norm(dense, axis=-1, keepdims=True)
    s = sparse / np.linalg.norm(sparse, axis=-1, keepdims=True)
    logits = d @ s.transpose(0, 2, 1) / temperature
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    spatial = e / e.sum(axis=-1, keepdims=True)
    return spatial, spatial @ values


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m stellar_kernels",
        description=__doc__.split("\n\n", 1)[1].strip(),
        epilog="Exit code 0 when every operator agrees with its reference, 1 otherwise.",
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(
        f"stellar_kernels on {device} (torch {torch.__version__}, CUDA extension built: {cuda_extension_built()})"
    )
    failures = 0

    def report(name: str, ok: bool, ms: float, detail: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name:<16} {ms:8.2f} ms  {detail}")

    cost = torch.rand(64, 16, 16, device=device)
    (index, plan), ms = _timed(lambda: sk.sinkhorn_match(cost))
    c = cost.double().cpu().numpy() / 0.1
    u, v = np.zeros(c.shape[:2]), np.zeros((c.shape[0], c.shape[2]))
    for _ in range(5):
        u = -np.log(np.exp(v[:, None, :] - c).sum(2))
        v = -np.log(np.exp(u[:, :, None] - c).sum(1))
    err = np.abs(plan.cpu().numpy() - np.exp(u[:, :, None] + v[:, None, :] - c)).max()
    report("sinkhorn_match", err < 1e-4, ms, f"64 problems 16x16, max plan error {err:.1e}")

    pred, target = torch.randn(64, 16, 96, device=device), torch.randn(8, 16, 96, device=device)
    (index_t, _), ms = _timed(lambda: sk.match_tokens(pred, target))
    expected = sk.sinkhorn_match(
        torch.cdist(pred, target.repeat_interleave(8, 0)), backend="torch"
    ).index
    agree = (index_t == expected).float().mean().item()
    report(
        "match_tokens",
        agree > 0.99,
        ms,
        f"8 images x 8 views, {agree:.1%} indices equal to cdist+sinkhorn",
    )

    scores = torch.randn(512, 2048, device=device) / 0.06
    q, ms = _timed(lambda: sk.sinkhorn_knopp(scores))
    err = np.abs(q.cpu().numpy() - sinkhorn_knopp_float64(scores.double().cpu().numpy(), 3)).max()
    report("sinkhorn_knopp", err < 1e-5, ms, f"512 x 2048, max error {err:.1e} against float64")

    dense, sparse = torch.randn(8, 196, 64, device=device), torch.randn(8, 16, 64, device=device)
    values = torch.randn(8, 16, 128, device=device)
    (spatial, lowrank), ms = _timed(lambda: sk.factorize(dense, sparse, values, 0.06))
    want_spatial, want_lowrank = factorize_float64(
        *(x.double().cpu().numpy() for x in (dense, sparse, values)), 0.06
    )
    err = max(
        np.abs(spatial.cpu().numpy() - want_spatial).max(),
        np.abs(lowrank.cpu().numpy() - want_lowrank).max() / np.abs(want_lowrank).max(),
    )
    report(
        "factorize",
        err < 1e-4,
        ms,
        f"8 x 196 patches x 16 tokens, max error {err:.1e} against float64",
    )

    index_h, ms = _timed(lambda: sk.hungarian_match(cost))
    ours = cost.gather(2, index_h.unsqueeze(-1)).sum().item()
    best = sum(p[linear_sum_assignment(p)].sum() for p in cost.double().cpu().numpy())
    report(
        "hungarian_match",
        abs(ours - best) < 1e-4,
        ms,
        f"64 problems 16x16, total {ours:.4f} vs scipy {best:.4f}",
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
