"""sinkhorn_knopp reference against float64 math, and its distributed equivalence (gloo)."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import stellar_kernels as sk


def sk_float64(scores: np.ndarray, n_iters: int, scale: float, eps: float) -> np.ndarray:
    q = np.exp(scores - scores.max(axis=0, keepdims=True))
    for _ in range(n_iters):
        q = q / (q.sum(axis=0, keepdims=True) + eps) ** scale
        q = q / (q.sum(axis=1, keepdims=True) + eps)
    return q


@pytest.mark.parametrize(
    "n,p,n_iters,scale,dtype",
    [
        (1, 7, 1, 1.0, torch.float32),
        (37, 53, 3, 0.5, torch.float32),
        (64, 128, 5, 1.0, torch.bfloat16),
        (20, 300, 3, 1.0, torch.float16),
        (257, 1000, 3, 1.0, torch.float64),
    ],
)
def test_matches_float64(rng_seed, n, p, n_iters, scale, dtype):
    scores = (torch.randn(n, p) * 3).to(dtype)
    q = sk.sinkhorn_knopp(scores, n_iters=n_iters, scale=scale, backend="torch")
    assert q.dtype == torch.float32 and q.shape == (n, p)
    expected = sk_float64(scores.double().numpy(), n_iters, scale, 1e-8)
    np.testing.assert_allclose(q.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_huge_logits_stay_finite(rng_seed):
    scores = torch.randn(50, 80) * 400
    q = sk.sinkhorn_knopp(scores, backend="torch")
    assert torch.isfinite(q).all()
    expected = sk_float64(scores.double().numpy(), 3, 1.0, 1e-8)
    np.testing.assert_allclose(q.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_input_unchanged(rng_seed):
    scores = torch.randn(10, 12)
    before = scores.clone()
    sk.sinkhorn_knopp(scores, backend="torch")
    assert torch.equal(scores, before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port, scores, backend, env, queue):
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = scores.chunk(world)[rank]
        q = sk.sinkhorn_knopp(rows, n_iters=3, backend=backend)
        q_local = sk.sinkhorn_knopp(rows, n_iters=3, backend=backend, local=True)
        queue.put((rank, q, q_local))
    finally:
        torch.distributed.destroy_process_group()


def run_two_ranks(scores: torch.Tensor, backend: str, env: dict | None = None):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_distributed_worker, args=(r, 2, port, scores, backend, env or {}, queue)
        )
        for r in range(2)
    ]
    for proc in procs:
        proc.start()
    results = dict((r, (q, ql)) for r, q, ql in (queue.get(timeout=120) for _ in procs))
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return results


def test_two_ranks_equal_one_call_on_stacked_rows(rng_seed):
    scores = torch.randn(23, 40) * 4
    results = run_two_ranks(scores, "torch")
    stacked = torch.cat([results[0][0], results[1][0]])
    expected = sk_float64(scores.double().numpy(), 3, 1.0, 1e-8)
    np.testing.assert_allclose(stacked.numpy(), expected, rtol=1e-4, atol=1e-7)
    # local=True must not communicate: each rank normalizes its own rows only.
    for rank, rows in enumerate(scores.chunk(2)):
        np.testing.assert_allclose(
            results[rank][1].numpy(),
            sk_float64(rows.double().numpy(), 3, 1.0, 1e-8),
            rtol=1e-4,
            atol=1e-7,
        )
