"""sinkhorn_match / match_tokens references against float64 math of eq. 8-9 and POT."""

import importlib
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

import stellar_kernels as sk
from stellar_kernels.reference import round_plan

sm = importlib.import_module("stellar_kernels.sinkhorn_match")


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
    "views,d,rounding",
    [(1, 8, "argmax"), (4, 40, "permutation"), (2, 96, "permutation"), (3, 24, "hungarian")],
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


# ----------------------------------------------------------------------------- rounding="hungarian"

INF = float("inf")
ISSUE_COST = [[0.8, 0.3, 0.5], [0.2, 0.5, INF], [0.3, INF, 0.8]]
# Its largest mass over all assignments, and its greedy rounding, take row 3's forbidden pair.
GREEDY_FORBIDDEN_COST = [
    [0.1, INF, 0.8, 0.9],
    [INF, 0.7, 0.5, 0.7],
    [0.9, 0.5, 0.8, 0.1],
    [0.2, INF, 0.9, 0.9],
]


def assignment_totals(plan: np.ndarray, forbidden: np.ndarray) -> dict[tuple[int, ...], float]:
    """Float64 total plan mass of every assignment of the Q rows to distinct columns that
    avoids every forbidden pair, or of every assignment where none does (brute force)."""
    q, t = plan.shape
    rows = np.arange(q)
    every = [list(p) for p in itertools.permutations(range(t), q)]
    free = [p for p in every if not forbidden[rows, p].any()]
    return {tuple(p): float(np.sum(plan[rows, p], dtype=np.float64)) for p in (free or every)}


def scipy_hungarian(plan: np.ndarray, forbidden: np.ndarray) -> tuple[float, bool]:
    """(largest float64 total plan mass, whether an assignment free of forbidden pairs exists)
    by scipy: forbidden pairs excluded, or, where that leaves none, the plain plan."""
    plan = plan.astype(np.float64)
    try:
        rows, cols = linear_sum_assignment(np.where(forbidden, -np.inf, plan), maximize=True)
        feasible = True
    except ValueError:
        rows, cols = linear_sum_assignment(plan, maximize=True)
        feasible = False
    return float(plan[rows, cols].sum()), feasible


def assert_exact_hungarian(index, plan, cost=None, brute_force=True):
    """Every problem's index is an assignment of largest plan mass: among those free of the
    forbidden pairs (+inf cost) where one exists, else among all."""
    index, plan = index.cpu(), plan.cpu().double().numpy()
    forbidden = np.zeros(plan.shape, bool) if cost is None else np.isinf(cost.cpu().numpy())
    q = plan.shape[1]
    for b in range(plan.shape[0]):
        got = index[b].tolist()
        assert len(set(got)) == q, f"problem {b}: {got} is not one-to-one"
        total = float(np.sum(plan[b, np.arange(q), got]))
        if brute_force:
            totals = assignment_totals(plan[b], forbidden[b])
            assert tuple(got) in totals, f"problem {b}: {got} takes a forbidden pair"
            best = max(totals.values())
        else:
            best, feasible = scipy_hungarian(plan[b], forbidden[b])
            if feasible:
                assert not forbidden[b, np.arange(q), got].any(), f"problem {b}: {got}"
        assert total >= best - 1e-12 * max(1.0, best), f"problem {b}: {total} < {best}"


def forbidden_costs(b: int, q: int, t: int, p: float) -> torch.Tensor:
    """(B, Q, T) costs in [0, 2), each pair +inf with probability p; problem 0 has an
    assignment free of forbidden pairs, problem 1 none (rows 0 and 1 may only take column 0);
    every row keeps an allowed column."""
    cost = torch.rand(b, q, t) * 2
    forbid = torch.rand(b, q, t) < p
    forbid.scatter_(2, torch.randint(t, (b, q, 1)), False)
    forbid[0].scatter_(1, torch.randperm(t)[:q, None], False)
    forbid[1, :2] = True
    forbid[1, :2, 0] = False
    return cost.masked_fill(forbid, INF)


@pytest.mark.parametrize(
    "b,q,t,eps,n_iters,p",
    [
        (32, 5, 5, 1.0, 1, 0.0),
        (8, 4, 7, 0.1, 5, 0.0),
        (12, 5, 5, 0.1, 5, 0.4),
        (12, 4, 7, 1.0, 2, 0.6),
    ],
)
def test_hungarian_is_the_best_assignment_by_brute_force(rng_seed, b, q, t, eps, n_iters, p):
    cost = forbidden_costs(b, q, t, p) if p else torch.rand(b, q, t) * 2
    index, plan = sk.sinkhorn_match(cost, eps, n_iters, "hungarian", backend="torch")
    assert index.dtype == torch.int64 and index.shape == (b, q)
    assert_exact_hungarian(index, plan, cost)
    if (q, t, eps) == (5, 5, 1.0):
        # Flat plans: the greedy rounding misses the optimum in about a third of them.
        greedy = sk.sinkhorn_match(cost, eps, n_iters, "permutation", backend="torch").index
        assert not torch.equal(index, greedy)


@pytest.mark.parametrize("b,q,t,p", [(4, 13, 21, 0.0), (4, 11, 11, 0.3), (3, 17, 33, 0.5)])
def test_hungarian_equals_scipy_on_larger_shapes(rng_seed, b, q, t, p):
    cost = forbidden_costs(b, q, t, p) if p else torch.rand(b, q, t) * 2
    index, plan = sk.sinkhorn_match(cost, 0.05, 5, "hungarian", backend="torch")
    assert_exact_hungarian(index, plan, cost, brute_force=False)


def test_hungarian_avoids_the_forbidden_pair_greedy_takes():
    cost = torch.tensor(ISSUE_COST)
    greedy = sk.sinkhorn_match(cost, 0.1, 5, "permutation", backend="torch").index
    assert greedy.tolist() == [1, 2, 0]  # row 1 on its forbidden column 2
    index, plan = sk.sinkhorn_match(cost, 0.1, 5, "hungarian", backend="torch")
    # Both assignments free of forbidden pairs have mass 1.4999 (equal in exact arithmetic).
    assert index.tolist() in ([1, 0, 2], [2, 1, 0])
    assert_exact_hungarian(index[None], plan[None], cost[None])


def test_hungarian_avoids_a_forbidden_pair_of_the_largest_mass_over_all():
    cost = torch.tensor([GREEDY_FORBIDDEN_COST])
    index, plan = sk.sinkhorn_match(cost, 0.1, 5, "hungarian", backend="torch")
    # The premise: the largest mass over all assignments needs a forbidden pair.
    every = assignment_totals(plan[0].double().numpy(), np.ones((4, 4), bool))
    top = max(every, key=every.get)
    assert torch.isinf(cost[0, range(4), list(top)]).any()
    assert_exact_hungarian(index, plan, cost)
    greedy = sk.sinkhorn_match(cost, 0.1, 5, "permutation", backend="torch").index
    assert torch.isinf(cost[0, range(4), greedy[0]]).any()


def test_hungarian_without_any_free_assignment_takes_the_largest_mass():
    # Rows 0 and 1 may only take column 0, so one of them must take a forbidden pair; among
    # all assignments the largest mass puts row 2 on its better column.
    cost = torch.full((1, 3, 4), INF)
    cost[0, 0, 0], cost[0, 1, 0] = 0.2, 0.1
    cost[0, 2, 1:] = torch.tensor([0.5, 0.2, 0.9])
    index, plan = sk.sinkhorn_match(cost, 0.1, 5, "hungarian", backend="torch")
    assert 0 in index[0, :2].tolist() and index[0, 2].item() == 2
    assert_exact_hungarian(index, plan, cost)


def test_hungarian_second_solve_on_the_cpu_equals_the_batched_one(rng_seed, monkeypatch):
    """The CPU solves again only the problems without a free assignment; on a GPU and while
    torch.compile traces both problems of every input are solved in one batch."""
    cost = forbidden_costs(10, 5, 6, 0.6)
    plan = sk.sinkhorn_match(cost, rounding="argmax", backend="torch").plan
    allowed = cost != INF
    direct = sm.round_hungarian(plan, allowed)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(sm.round_hungarian(plan, allowed), direct)
    assert_exact_hungarian(direct, plan, cost)


def test_hungarian_plan_is_the_other_roundings_plan(rng_seed):
    cost = forbidden_costs(4, 5, 7, 0.3)
    plans = [
        sk.sinkhorn_match(cost, 0.1, 5, rounding, backend="torch").plan
        for rounding in ("hungarian", "permutation", "argmax")
    ]
    assert torch.equal(plans[0], plans[1]) and torch.equal(plans[0], plans[2])


def test_hungarian_indices_stay_in_range_on_nan_plans(rng_seed):
    cost = torch.rand(3, 4, 6)
    cost[0, 1, 2] = float("nan")
    cost[1, 2, 3] = -INF
    cost[2, 0] = INF  # a row with no allowed column
    index, plan = sk.sinkhorn_match(cost, rounding="hungarian", backend="torch", validate=False)
    assert plan[:2].isnan().any()
    assert bool(((index >= 0) & (index < 6)).all()), index.tolist()
    assert all(len(set(row)) == 4 for row in index.tolist())


def test_rounding_choices_name_hungarian():
    for call in (
        lambda: sk.sinkhorn_match(torch.rand(3, 4), rounding="exact"),
        lambda: sk.match_tokens(torch.randn(2, 3, 4), torch.randn(1, 3, 4), rounding="exact"),
    ):
        with pytest.raises(ValueError, match=r"rounding must be one of .*'hungarian'"):
            call()


def test_match_tokens_hungarian_is_the_best_assignment(rng_seed):
    pred, target = torch.randn(6, 5, 8), torch.randn(2, 6, 8)
    index, plan = sk.match_tokens(pred, target, 1.0, 2, "hungarian", backend="torch")
    assert_exact_hungarian(index, plan)
    _, greedy_plan = sk.match_tokens(pred, target, 1.0, 2, backend="torch")
    assert torch.equal(plan, greedy_plan)
