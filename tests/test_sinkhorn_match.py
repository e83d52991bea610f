"""sinkhorn_match / match_tokens references against float64 math of eq. 8-9 and POT."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import stellar_kernels as sk
from stellar_kernels.reference import round_plan


def plan_float64(cost: np.ndarray, eps: float, n_iters: int) -> np.ndarray:
    """Independent float64 log-domain Sinkhorn, one problem at a time."""
    out = np.empty_like(cost, dtype=np.float64)
    for b, c in enumerate(cost.astype(np.float64)):
        u = np.zeros(c.shape[0])
        v = np.zeros(c.shape[1])
        for _ in range(n_iters):
            u = -eps * logsumexp((v[None, :] - c) / eps, axis=1)
            v = -eps * logsumexp((u[:, None] - c) / eps, axis=0)
        out[b] = np.exp((u[:, None] + v[None, :] - c) / eps)
    return out


@pytest.mark.parametrize(
    "b,q,t,eps,n_iters",
    [(1, 1, 1, 0.1, 1), (3, 5, 9, 0.05, 5), (8, 16, 16, 0.1, 20), (2, 13, 32, 1.0, 5)],
)
def test_plan_matches_float64(rng_seed, b, q, t, eps, n_iters):
    cost = torch.rand(b, q, t) * 2
    index, plan = sk.sinkhorn_match(cost, eps=eps, n_iters=n_iters, backend="torch")
    expected = plan_float64(cost.numpy(), eps, n_iters)
    np.testing.assert_allclose(plan.numpy(), expected, rtol=2e-4, atol=1e-6)
    assert plan.dtype == torch.float32 and index.dtype == torch.int64
    assert index.shape == (b, q)


@pytest.mark.parametrize("n,eps", [(4, 1.0), (7, 0.5)])
def test_plan_matches_pot_at_convergence(rng_seed, n, eps):
    ot = pytest.importorskip("ot")
    cost = torch.rand(1, n, n, dtype=torch.float32)
    _, plan = sk.sinkhorn_match(cost, eps=eps, n_iters=500, backend="torch")
    ones = np.ones(n)
    expected = ot.bregman.sinkhorn_log(
        ones, ones, cost[0].double().numpy(), eps, numItermax=5000, stopThr=1e-12
    )
    np.testing.assert_allclose(plan[0].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_two_dimensional_cost(rng_seed):
    cost = torch.rand(6, 9)
    index, plan = sk.sinkhorn_match(cost, backend="torch")
    index3, plan3 = sk.sinkhorn_match(cost[None], backend="torch")
    assert index.shape == (6,) and plan.shape == (6, 9)
    assert torch.equal(index, index3[0]) and torch.equal(plan, plan3[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(rng_seed, dtype):
    cost = torch.rand(3, 5, 5).to(dtype)
    _, plan = sk.sinkhorn_match(cost, backend="torch")
    expected = plan_float64(cost.float().numpy(), 0.1, 5)
    np.testing.assert_allclose(plan.numpy(), expected, rtol=2e-4, atol=1e-6)


def test_non_contiguous_cost(rng_seed):
    base = torch.rand(4, 9, 5)
    cost = base.transpose(1, 2)  # (4, 5, 9), not contiguous
    index, plan = sk.sinkhorn_match(cost, backend="torch")
    index_c, plan_c = sk.sinkhorn_match(cost.contiguous(), backend="torch")
    assert torch.equal(index, index_c) and torch.allclose(plan, plan_c)


def test_permutation_is_one_to_one_and_greedy(rng_seed):
    plan = torch.rand(16, 7, 11)
    index = round_plan(plan, "permutation")
    for b in range(plan.shape[0]):
        assert len(set(index[b].tolist())) == plan.shape[1]
        # Independent greedy: repeatedly the largest remaining entry.
        p = plan[b].clone().numpy()
        expected = np.full(p.shape[0], -1)
        for _ in range(p.shape[0]):
            r, c = np.unravel_index(np.argmax(p), p.shape)
            expected[r] = c
            p[r, :] = -1
            p[:, c] = -1
        assert index[b].tolist() == expected.tolist()


def test_permutation_equals_argmax_when_argmax_is_one_to_one(rng_seed):
    q = 8
    perm = torch.stack([torch.randperm(q) for _ in range(5)])
    plan = torch.rand(5, q, q) * 0.5
    plan.scatter_(2, perm.unsqueeze(-1), 1.0 + torch.rand(5, q, 1))
    assert torch.equal(round_plan(plan, "permutation"), round_plan(plan, "argmax"))
    assert torch.equal(round_plan(plan, "argmax"), perm)


def test_inputs_not_modified(rng_seed):
    cost = torch.rand(2, 4, 4)
    before = cost.clone()
    sk.sinkhorn_match(cost, backend="torch")
    pred, target = torch.randn(4, 3, 5), torch.randn(2, 3, 5)
    p0, t0 = pred.clone(), target.clone()
    sk.match_tokens(pred, target, backend="torch")
    assert torch.equal(cost, before) and torch.equal(pred, p0) and torch.equal(target, t0)


@pytest.mark.parametrize(
    "views,d,rounding", [(1, 8, "argmax"), (4, 40, "permutation"), (2, 96, "permutation")]
)
def test_match_tokens_equals_cdist_then_sinkhorn(rng_seed, views, d, rounding):
    b, k = 3, 5
    pred = torch.randn(b * views, k, d)
    target = torch.randn(b, k, d)
    index, plan = sk.match_tokens(pred, target, rounding=rounding, backend="torch")
    cost = torch.cdist(pred.double(), target.double().repeat_interleave(views, 0))
    expected_plan = plan_float64(cost.numpy(), 0.1, 5)
    np.testing.assert_allclose(plan.numpy(), expected_plan, rtol=2e-3, atol=1e-5)
    exp_index, _ = sk.sinkhorn_match(cost.float(), rounding=rounding, backend="torch")
    assert torch.equal(index, exp_index)
