"""The operators' contract (README, "The contract"), the same on every backend.

Non-finite input, checks that cost nothing (torch.compile, no host synchronization in the
training step), gradients, backend choice, device guards and accurate costs for tokens
that share a large common component. The Triton paths run in the interpreter on the CPU
(tests/conftest.py); the gpu-marked tests repeat what needs a GPU.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import stellar_kernels as sk

triton = pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BACKENDS = ["torch", "triton"]
INF = float("inf")


# ----------------------------------------------------------------------------- references


def plan_float64_forbidden(cost: np.ndarray, eps: float, n_iters: int) -> np.ndarray:
    """Float64 log-domain Sinkhorn where +inf entries carry no mass.

    A column that is +inf in every row can take no mass at all: it is dropped and its plan
    column is zero (its dual would be +inf, which float arithmetic cannot carry).
    """
    out = np.zeros(cost.shape, dtype=np.float64)
    for b, c in enumerate(cost.astype(np.float64)):
        keep = ~np.all(np.isinf(c), axis=0)
        sub = c[:, keep]
        u, v = np.zeros(sub.shape[0]), np.zeros(sub.shape[1])
        for _ in range(n_iters):
            u = -eps * logsumexp((v[None, :] - sub) / eps, axis=1)
            v = -eps * logsumexp((u[:, None] - sub) / eps, axis=0)
        out[b][:, keep] = np.exp((u[:, None] + v[None, :] - sub) / eps)
    return out


def random_forbidden(b: int, q: int, t: int, p: float) -> torch.Tensor:
    """A (B, Q, T) cost in [0, 2) with each entry +inf with probability p, every row keeping
    at least one allowed column."""
    cost = torch.rand(b, q, t) * 2
    forbid = torch.rand(b, q, t) < p
    keep = torch.randint(t, (b, q))
    forbid.scatter_(2, keep[..., None], False)
    return cost.masked_fill(forbid, INF)


def assert_rounding_respects_forbidden(index: torch.Tensor, cost: torch.Tensor, rounding: str):
    """Indices in [0, T); a forbidden pair only for a row none of whose allowed columns is left."""
    index, cost = index.cpu(), cost.cpu()
    t = cost.shape[-1]
    assert index.dtype == torch.int64
    assert bool(((index >= 0) & (index < t)).all()), f"index out of [0, {t}): {index.tolist()}"
    allowed = torch.isfinite(cost)
    for b in range(cost.shape[0]):
        taken = index[b].tolist()
        if rounding == "permutation":
            assert len(set(taken)) == len(taken), f"problem {b}: {taken} is not one-to-one"
        for row, col in enumerate(taken):
            if allowed[b, row, col]:
                continue
            free = [c for c in range(t) if allowed[b, row, c]]
            if rounding == "argmax":
                assert not free, f"problem {b} row {row}: forbidden {col} though {free} allowed"
            others = set(taken[:row] + taken[row + 1 :])
            assert set(free) <= others, f"problem {b} row {row}: forbidden {col}, {free} left"


def match(cost, backend, **kwargs):
    return sk.sinkhorn_match(cost.to(DEVICE), backend=backend, **kwargs)


# ----------------------------------------------------------------------------- 1. non-finite


@pytest.mark.parametrize("backend", BACKENDS)
def test_forbidden_column_carries_no_mass(rng_seed, backend):
    """The issue's case: Q=4, T=6, one column +inf in every row."""
    cost = torch.rand(3, 4, 6) * 2
    cost[:, :, 2] = INF
    index, plan = match(cost, backend, rounding="argmax")
    assert torch.isfinite(plan).all()
    expected = plan_float64_forbidden(cost.numpy(), 0.1, 5)
    np.testing.assert_allclose(plan.cpu().numpy(), expected, rtol=2e-4, atol=1e-6)
    assert (plan[:, :, 2] == 0).all()
    assert_rounding_respects_forbidden(index, cost, "argmax")
    index, _ = match(cost, backend)
    assert_rounding_respects_forbidden(index, cost, "permutation")


@pytest.mark.parametrize(
    "backend,b,q,t,rounding",
    [
        ("torch", 6, 5, 7, "permutation"),
        ("triton", 6, 5, 7, "permutation"),
        ("triton", 4, 16, 16, "argmax"),
        ("torch", 4, 13, 32, "argmax"),
        ("triton", 2, 9, 140, "permutation"),  # the loop path (T > 128)
        ("triton", 1, 70, 131, "argmax"),
    ],
)
def test_scattered_forbidden_pairs(rng_seed, backend, b, q, t, rounding):
    cost = random_forbidden(b, q, t, 0.4)
    index, plan = match(cost, backend, rounding=rounding)
    assert torch.isfinite(plan).all()
    assert (plan.cpu()[torch.isinf(cost)] == 0).all()
    expected = plan_float64_forbidden(cost.numpy(), 0.1, 5)
    np.testing.assert_allclose(plan.cpu().numpy(), expected, rtol=2e-4, atol=1e-6)
    assert_rounding_respects_forbidden(index, cost, rounding)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forbidden_pair_only_when_no_allowed_column_is_left(backend):
    # Rows 0 and 1 may only take column 0; row 2 may take columns 1 and 2. One of rows 0, 1
    # must end on a forbidden pair, and only once column 0 is gone.
    cost = torch.full((1, 3, 3), INF)
    cost[0, 0, 0], cost[0, 1, 0] = 0.2, 0.1
    cost[0, 2, 1:] = torch.tensor([0.3, 0.4])
    index, plan = match(cost, backend)
    assert_rounding_respects_forbidden(index, cost, "permutation")
    assert sorted(index[0].tolist()) == [0, 1, 2]
    assert index[0, 2].item() in (1, 2) and 0 in index[0, :2].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "value,where,message",
    [
        (float("nan"), (0, 1, 2), "cost contains NaN"),
        (-INF, (1, 0, 3), "cost contains -inf"),
        (INF, (1, 2, slice(None)), "cost has a row with no allowed column"),
    ],
    ids=["nan", "-inf", "row of +inf"],
)
def test_non_finite_cost_raises_and_unchecked_indices_stay_in_range(
    rng_seed, backend, value, where, message
):
    cost = torch.rand(2, 3, 5)
    cost[where] = value
    with pytest.raises(ValueError, match=message):
        match(cost, backend)
    for rounding in ("permutation", "argmax", "hungarian"):
        index, _ = match(cost, backend, rounding=rounding, validate=False)
        assert bool(((index >= 0) & (index < 5)).all()), index.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_tokens_raise_naming_the_argument(rng_seed, backend):
    pred, target = torch.randn(4, 5, 8), torch.randn(2, 6, 8)
    for name, value in (("pred", float("nan")), ("target", INF), ("pred", -INF)):
        p, t = pred.clone(), target.clone()
        (p if name == "pred" else t)[1, 2, 3] = value
        with pytest.raises(ValueError, match=f"{name} contains"):
            sk.match_tokens(p.to(DEVICE), t.to(DEVICE), backend=backend)
        index, _ = sk.match_tokens(p.to(DEVICE), t.to(DEVICE), backend=backend, validate=False)
        assert bool(((index >= 0) & (index < 6)).all()), index.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), INF], ids=["nan", "+inf"])
def test_non_finite_scores_raise(rng_seed, backend, value):
    scores = torch.randn(9, 20)
    scores[4, 7] = value
    with pytest.raises(ValueError, match="scores contains"):
        sk.sinkhorn_knopp(scores.to(DEVICE), backend=backend)
    scores[4, 7] = -INF  # a zero-mass entry, as log(0) of a probability
    q = sk.sinkhorn_knopp(scores.to(DEVICE), backend=backend)
    assert q[4, 7] == 0 and bool(torch.isfinite(q).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_factorize_and_localization_reject_nan(rng_seed, backend):
    dense, sparse, values = torch.randn(2, 7, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 5)
    for name in ("dense", "sparse", "values"):
        args = {"dense": dense.clone(), "sparse": sparse.clone(), "values": values.clone()}
        args[name][1, 2, 3] = float("nan")
        args = {k: v.to(DEVICE) for k, v in args.items()}
        with pytest.raises(ValueError, match=f"{name} contains NaN"):
            sk.factorize(**args, backend=backend)
        spatial, _ = sk.factorize(**args, backend=backend, validate=False)
        assert spatial.shape == (2, 7, 3)
        if name != "values":
            with pytest.raises(ValueError, match=f"{name} contains NaN"):
                sk.localization(args["dense"], args["sparse"], backend=backend)
            sk.localization(args["dense"], args["sparse"], backend=backend, validate=False)


# ----------------------------------------------------------------------------- 1b. beyond float32


def sk_float64(scores: np.ndarray, n_iters: int = 3) -> np.ndarray:
    """SwAV's Sinkhorn-Knopp in float64 log space (columns, then rows). Each step takes the
    max out before the log of the sum, so that neither is lost against a huge offset."""
    log_q = scores.astype(np.float64)
    for _ in range(n_iters):
        for axis in (0, 1):
            log_q = log_q - log_q.max(axis=axis, keepdims=True)
            log_q = log_q - np.log(np.exp(log_q).sum(axis=axis, keepdims=True))
    return np.exp(log_q)


def test_costs_beyond_float32_duals_raise_and_large_ones_agree():
    cost = torch.tensor([[1e38, 2e38], [0.5, 0.2]])
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"cost / eps must lie within.*2e\+38"):
            sk.sinkhorn_match(cost.to(DEVICE), eps=0.1, backend=backend)
    # Within the range the backends give the float64 answer.
    results = [sk.sinkhorn_match(cost.to(DEVICE), eps=1e2, backend=b) for b in BACKENDS]
    want = plan_float64_forbidden(cost[None].numpy(), 1e2, 5)[0]
    for index, plan in results:
        assert index.tolist() == [0, 1]
        np.testing.assert_allclose(plan.cpu().numpy(), want, atol=1e-6)


def test_tokens_beyond_float32_distances_raise_and_large_ones_agree(rng_seed):
    target = torch.randn(2, 4, 8)
    pred = target.repeat_interleave(3, 0)[:, torch.randperm(4)] + 0.1 * torch.randn(6, 4, 8)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="pred has entries beyond"):
            sk.match_tokens((pred * 1e19).to(DEVICE), target.to(DEVICE), backend=backend)
    scaled = [
        sk.match_tokens((pred * 1e16).to(DEVICE), (target * 1e16).to(DEVICE), backend=b)
        for b in BACKENDS
    ]
    assert torch.equal(scaled[0].index.cpu(), scaled[1].index.cpu())
    torch.testing.assert_close(scaled[0].plan.cpu(), scaled[1].plan.cpu(), rtol=0, atol=1e-5)
    assert bool(torch.isfinite(scaled[0].plan).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_scores_computed_or_refused(backend):
    wide = torch.tensor([[1e300, 0.0], [0.0, 1.0]], dtype=torch.float64)
    q = sk.sinkhorn_knopp(wide.to(DEVICE), backend=backend)
    np.testing.assert_allclose(q.cpu().numpy(), sk_float64(wide.numpy()), rtol=0, atol=1e-12)
    # Scores near float32's limit, s - max (down to -3e38) still within it.
    big = torch.tensor([[1.5e38, 1.0e38], [1.0e38, 1.5e38], [-1.5e38, -1.0e38], [2.0, 1.0]])
    q = sk.sinkhorn_knopp(big.to(DEVICE), backend=backend)
    np.testing.assert_allclose(q.cpu().numpy(), sk_float64(big.double().numpy()), atol=1e-6)
    with pytest.raises(ValueError, match="beyond half of float32's range"):
        sk.sinkhorn_knopp(torch.tensor([[3e38, 0.0], [0.0, -3e38]]).to(DEVICE), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [INF, -INF, 1e30], ids=["+inf", "-inf", "1e30"])
def test_localization_and_factorize_refuse_infinite_or_overflowing_features(backend, value):
    dense, sparse, values = torch.randn(2, 7, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 5)
    bad_dense, bad_sparse = dense.clone(), sparse.clone()
    bad_dense[1, 4, 2] = bad_sparse[1, 2, 6] = value
    message = "has entries beyond" if value == 1e30 else "contains NaN or an infinity"
    with pytest.raises(ValueError, match=f"dense {message}"):
        sk.localization(bad_dense.to(DEVICE), sparse.to(DEVICE), backend=backend)
    with pytest.raises(ValueError, match=f"sparse {message}"):
        sk.factorize(dense.to(DEVICE), bad_sparse.to(DEVICE), values.to(DEVICE), backend=backend)
    if value != 1e30:  # huge values are fine: lowrank is a convex combination of them
        bad_values = values.clone()
        bad_values[0, 1, 1] = value
        with pytest.raises(ValueError, match="values contains NaN or an infinity"):
            sk.factorize(
                dense.to(DEVICE), sparse.to(DEVICE), bad_values.to(DEVICE), backend=backend
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_match_tokens_takes_an_empty_batch(backend):
    index, plan = sk.match_tokens(
        torch.randn(0, 4, 8, device=DEVICE), torch.randn(0, 5, 8, device=DEVICE), backend=backend
    )
    assert index.shape == (0, 4) and index.dtype == torch.int64
    assert plan.shape == (0, 4, 5) and plan.dtype == torch.float32
    with pytest.raises(ValueError, match="multiple"):
        sk.match_tokens(torch.randn(2, 4, 8), torch.randn(0, 5, 8), backend=backend)


# ----------------------------------------------------------------------------- 2. checks that cost nothing


def _operator_calls(backend: str | None):
    """Each operator called with its default arguments (only `backend` set)."""
    kw = {} if backend is None else {"backend": backend}
    return {
        "sinkhorn_match": (
            lambda c: sk.sinkhorn_match(c, **kw).plan,
            (torch.rand(3, 4, 6),),
        ),
        "match_tokens": (
            lambda p, t: sk.match_tokens(p, t, **kw).plan,
            (torch.randn(4, 5, 8), torch.randn(2, 5, 8)),
        ),
        "sinkhorn_knopp": (lambda s: sk.sinkhorn_knopp(s, **kw), (torch.randn(6, 10),)),
        "factorize": (
            lambda d, s, v: sk.factorize(d, s, v, **kw)[1],
            (torch.randn(2, 7, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 5)),
        ),
        "localization": (
            lambda d, s: sk.localization(d, s, **kw),
            (torch.randn(2, 7, 8), torch.randn(2, 3, 8)),
        ),
    }


@pytest.mark.parametrize("backend", [None, "triton"], ids=["default", "triton"])
@pytest.mark.parametrize(
    "op", ["sinkhorn_match", "match_tokens", "sinkhorn_knopp", "factorize", "localization"]
)
def test_default_arguments_trace_with_fullgraph(rng_seed, backend, op):
    fn, args = _operator_calls(backend)[op]
    args = [a.to(DEVICE) for a in args]
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="eager")(*args)
    torch.testing.assert_close(got, fn(*args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hungarian_rounding_traces_with_fullgraph(rng_seed, backend):
    """The exact rounding inside a compiled graph: both solves in one batch, no host read."""
    cost = random_forbidden(3, 4, 6, 0.4)
    cost[0, range(4), torch.randperm(6)[:4]] = 1.0  # problem 0: a free assignment
    cost[1, :2] = INF  # problem 1: rows 0 and 1 share column 0, no free assignment
    cost[1, :2, 0] = 0.5
    pred, target = torch.randn(4, 5, 8), torch.randn(2, 6, 8)

    def fn(cost, pred, target):
        a = sk.sinkhorn_match(cost, rounding="hungarian", backend=backend)
        b = sk.match_tokens(pred, target, rounding="hungarian", backend=backend)
        return a.index, a.plan, b.index, b.plan

    args = [x.to(DEVICE) for x in (cost, pred, target)]
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="eager")(*args)
    want = fn(*args)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert not torch.isinf(cost[0, range(4), got[0][0].cpu()]).any()


def test_hungarian_default_arguments_trace_with_fullgraph(rng_seed):
    cost = torch.rand(3, 4, 6)
    torch._dynamo.reset()
    got = torch.compile(sk.hungarian_match, fullgraph=True, backend="eager")(cost)
    assert torch.equal(got, sk.hungarian_match(cost))


def test_training_step_runs_no_input_checks(monkeypatch, tmp_path):
    """The training loop turns the operators' data checks off (its own NaN/Inf guard on the
    loss remains), so a step makes no host synchronization for them."""
    from stellar.testing import MINI_OVERRIDES
    from stellar.train import train as train_module

    seen = []
    for name in ("sinkhorn_match", "match_tokens", "sinkhorn_knopp", "factorize"):
        original = getattr(sk, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, kwargs.get("validate", True)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(sk, name, spy)
    monkeypatch.setattr(
        sk, "hungarian_match", lambda *a, **k: pytest.fail("the default matcher is Sinkhorn")
    )
    argv = ["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--max-steps", "2"]
    assert train_module.main(argv + MINI_OVERRIDES) == 0
    called = {name for name, _ in seen}
    assert {"match_tokens", "sinkhorn_knopp", "factorize"} <= called, called
    assert all(validate is False for _, validate in seen), seen


# ----------------------------------------------------------------------------- 3. gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_never_require_grad(rng_seed, backend):
    cost = torch.rand(2, 4, 5, device=DEVICE, requires_grad=True)
    res = sk.sinkhorn_match(cost, backend=backend)
    assert not res.plan.requires_grad and not res.index.requires_grad
    pred = torch.randn(4, 5, 8, device=DEVICE, requires_grad=True)
    target = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    assert not sk.match_tokens(pred, target, backend=backend).plan.requires_grad
    scores = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    q = sk.sinkhorn_knopp(scores, backend=backend)
    assert not q.requires_grad
    # A target used in a loss: the gradient reaches the logits only through the loss itself.
    loss = -(q * torch.log_softmax(scores, dim=1)).sum()
    loss.backward()
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("with_values", [True, False])
def test_second_derivative_through_triton_matches_torch(rng_seed, with_values):
    shapes = ((2, 7, 8), (2, 3, 8), (2, 3, 5))
    base = [torch.randn(*s, device=DEVICE) for s in shapes]
    weights = [torch.randn(2, 7, 3, device=DEVICE), torch.randn(2, 7, 5, device=DEVICE)]

    def second_derivative(backend):
        leaves = [x.clone().requires_grad_() for x in base]
        if with_values:
            spatial, lowrank = sk.factorize(*leaves, 0.5, backend=backend)
            loss = (spatial * weights[0]).sum() + (lowrank * weights[1]).square().sum()
        else:
            leaves = leaves[:2]
            loss = (sk.localization(*leaves, 0.5, backend=backend) * weights[0]).square().sum()
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)

    for got, want in zip(second_derivative("triton"), second_derivative("torch")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_second_derivative_through_torch_is_correct(rng_seed):
    args = [
        torch.randn(*s, dtype=torch.float64, requires_grad=True)
        for s in ((2, 5, 6), (2, 3, 6), (2, 3, 4))
    ]
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: sk.factorize(a, b, c, 0.5, backend="torch"), args
    )


# ----------------------------------------------------------------------------- 4. devices


KERNEL_MODULES = [
    "stellar_kernels.sinkhorn_match",
    "stellar_kernels.match_tokens",
    "stellar_kernels.sinkhorn_knopp",
    "stellar_kernels.localization",
]


def test_every_triton_launch_is_guarded_by_the_input_device(rng_seed, monkeypatch):
    """Each kernel launch happens inside `on_device(<the input's device>)`, which makes that
    device (and so its current stream) the one Triton launches on."""
    active: list[torch.device] = []

    @contextmanager
    def recording_on_device(device):
        active.append(torch.device(device))
        try:
            yield
        finally:
            active.pop()

    launched = []

    class Checked:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            assert active and active[-1] == DEVICE, f"{self.name} launched outside a guard"
            launched.append(self.name)
            return self.kernel[grid]

    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, "on_device", recording_on_device)
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, Checked(name, getattr(module, name)))

    sk.sinkhorn_match(torch.rand(2, 4, 6, device=DEVICE), backend="triton")
    sk.sinkhorn_match(torch.rand(1, 3, 130, device=DEVICE), backend="triton")
    sk.match_tokens(
        torch.randn(4, 5, 8, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE), backend="triton"
    )
    sk.sinkhorn_knopp(torch.randn(6, 10, device=DEVICE), backend="triton")
    inputs = [
        torch.randn(*s, device=DEVICE, requires_grad=True)
        for s in ((2, 7, 8), (2, 3, 8), (2, 3, 5))
    ]
    spatial, lowrank = sk.factorize(*inputs, backend="triton")
    (lowrank.sum() + spatial.square().sum()).backward()
    assert {
        "_sinkhorn_tile_kernel",
        "_sinkhorn_loop_kernel",
        "_match_tokens_kernel",
        "_sk_colstats_kernel",
        "_sk_rows_resident_kernel",
        "_factorize_fwd_kernel",
        "_factorize_bwd_kernel",
    } <= set(launched)


def test_autotune_key_holds_batch_dtype_and_device():
    key = importlib.import_module("stellar_kernels._triton").tune_key
    base = key("sinkhorn_match", torch.device("cuda", 0), torch.float32, 512, 16, 16)
    assert base == key("sinkhorn_match", torch.device("cuda", 0), torch.float32, 509, 16, 16)
    for other in (
        key("sinkhorn_match", torch.device("cuda", 0), torch.float32, 8, 16, 16),
        key("sinkhorn_match", torch.device("cuda", 1), torch.float32, 512, 16, 16),
        key("sinkhorn_match", torch.device("cuda", 0), torch.bfloat16, 512, 16, 16),
        key("sinkhorn_match", torch.device("cuda", 0), torch.float32, 512, 16, 32),
        key("match_tokens", torch.device("cuda", 0), torch.float32, 512, 16, 16),
    ):
        assert other != base


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_input_on_a_non_current_device(rng_seed):
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    stream = torch.cuda.Stream(dev)
    with torch.cuda.stream(stream):
        cost = torch.rand(64, 16, 16, device=dev)
        pred, target = torch.randn(64, 16, 96, device=dev), torch.randn(8, 16, 96, device=dev)
        scores = torch.randn(256, 1024, device=dev)
        inputs = [
            torch.randn(*s, device=dev, requires_grad=True)
            for s in ((4, 49, 64), (4, 16, 64), (4, 16, 64))
        ]
        got = [
            sk.sinkhorn_match(cost).plan,
            sk.match_tokens(pred, target).plan,
            sk.sinkhorn_knopp(scores),
            *sk.factorize(*inputs),
        ]
        torch.autograd.grad(got[-1].sum(), inputs)
        want = [
            sk.sinkhorn_match(cost, backend="torch").plan,
            sk.match_tokens(pred, target, backend="torch").plan,
            sk.sinkhorn_knopp(scores, backend="torch"),
            *sk.factorize(*inputs, backend="torch"),
        ]
    stream.synchronize()
    assert torch.cuda.current_device() == 0
    for g, w in zip(got, want):
        assert g.device == dev
        torch.testing.assert_close(g, w, rtol=2e-3, atol=1e-4)


@pytest.mark.gpu
def test_gpu_tuning_leaves_other_threads_alone(rng_seed):
    """Tuning while another thread does CUDA work (allocations, synchronizations): neither
    fails, and the tuned results equal the reference."""
    import threading

    guard = importlib.import_module("stellar_kernels._triton")
    guard.TUNED.clear()
    stop = threading.Event()
    errors = []

    def busy():
        try:
            while not stop.is_set():
                x = torch.randn(1 << 16, device="cuda")
                torch.cuda.synchronize()
                del x
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        for b in (4, 64, 512):
            cost = torch.rand(b, 16, 16, device="cuda")
            got = sk.sinkhorn_match(cost)
            torch.testing.assert_close(got.plan, sk.sinkhorn_match(cost, backend="torch").plan)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors


# ----------------------------------------------------------------------------- 6. backend choice


DEFAULT_CASES = {
    # operator: (its module, the Triton entry it runs, a call on small CPU inputs)
    "sinkhorn_match": ("sinkhorn_match", "sinkhorn_match_triton", lambda: sk.sinkhorn_match(torch.rand(2, 3, 4))),
    "match_tokens": ("match_tokens", "match_tokens_triton", lambda: sk.match_tokens(torch.randn(4, 3, 8), torch.randn(2, 3, 8))),
    "sinkhorn_knopp": ("sinkhorn_knopp", "sinkhorn_knopp_triton", lambda: sk.sinkhorn_knopp(torch.randn(5, 7))),
    "localization": ("localization", "_factorize_triton", lambda: sk.localization(torch.randn(2, 6, 8), torch.randn(2, 3, 8))),
    "factorize": ("localization", "_factorize_triton", lambda: sk.factorize(torch.randn(2, 6, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 5))),
}  # fmt: skip


@pytest.mark.parametrize("op", sorted(DEFAULT_CASES))
def test_cuda_tensors_default_to_triton_and_cpu_tensors_to_torch(monkeypatch, op):
    """The real backend choice, told the inputs sit on a CUDA device, runs the Triton entry
    (in the interpreter here); on the CPU device it runs the reference."""
    monkeypatch.delenv("STELLAR_KERNELS_BACKEND", raising=False)
    module_name, entry, call = DEFAULT_CASES[op]
    module = importlib.import_module(f"stellar_kernels.{module_name}")
    calls = []
    launch = getattr(module, entry)

    def recorded(*args, **kwargs):
        calls.append(entry)
        return launch(*args, **kwargs)

    monkeypatch.setattr(module, entry, recorded)
    call()
    assert calls == [], f"{op} on a CPU tensor ran {entry}"
    real = module.resolve_backend

    def as_if_on_cuda(name, backend, device, *args, **kwargs):
        return real(name, backend, torch.device("cuda"), *args, **kwargs)

    monkeypatch.setattr(module, "resolve_backend", as_if_on_cuda)
    call()
    assert calls == [entry], f"{op} on a CUDA tensor did not run {entry}"


def test_unknown_environment_backend_raises(monkeypatch):
    monkeypatch.setenv("STELLAR_KERNELS_BACKEND", "tritn")
    for call in (
        lambda: sk.sinkhorn_knopp(torch.randn(3, 4)),
        lambda: sk.sinkhorn_match(torch.rand(2, 3, 4)),
        lambda: sk.hungarian_match(torch.rand(2, 3, 4)),
    ):
        with pytest.raises(
            ValueError, match=r"STELLAR_KERNELS_BACKEND.*'tritn'.*'torch'.*'triton'"
        ):
            call()


@pytest.mark.parametrize(
    "shapes,dtypes,reason",
    [
        (((1, 5, 8), (1, 3, 8), (1, 3, 4)), (torch.float64,) * 3, "float64"),
        (((1, 5, 8), (1, 3, 8), (1, 3, 4)), (torch.float32,) * 2 + (torch.bfloat16,), "dtype"),
        (((1, 5, 8), (1, 65, 8), (1, 65, 4)), (torch.float32,) * 3, "K <= 64"),
    ],
    ids=["float64", "mixed", "K>64"],
)
def test_explicit_triton_that_cannot_serve_raises(shapes, dtypes, reason):
    dense, sparse, values = (torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes))
    with pytest.raises(ValueError, match=f"backend='triton'.*{reason}"):
        sk.factorize(dense, sparse, values, backend="triton")
    # backend=None chooses what can serve it.
    spatial, _ = sk.factorize(dense, sparse, values)
    assert spatial.shape == (1, 5, sparse.shape[1])


def test_hungarian_backends_are_named():
    with pytest.raises(ValueError, match=r"'cpp', 'cuda', 'scipy'.*reference.*'scipy'"):
        sk.hungarian_match(torch.rand(2, 3, 4), backend="torch")


# ----------------------------------------------------------------------------- 7. accurate costs


def near_duplicate_tokens(images: int, views: int, k: int, d: int):
    """Tokens that share a large common component (as real ViT tokens share their mean)."""
    common = 3 * torch.randn(d)
    target = common + 0.01 * torch.randn(images, k, d)
    perm = torch.stack([torch.randperm(k) for _ in range(images * views)])
    pred = target.repeat_interleave(views, 0).gather(1, perm[..., None].expand(-1, -1, d))
    return pred + 1e-3 * torch.randn(pred.shape), target


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_duplicate_tokens_keep_float32_accuracy(rng_seed, backend):
    pred, target = near_duplicate_tokens(2, 2, 16, 768)
    cost = torch.cdist(pred.double(), target.double().repeat_interleave(2, 0))
    expected = plan_float64_forbidden(cost.numpy(), 0.1, 5)
    _, plan = sk.match_tokens(pred.to(DEVICE), target.to(DEVICE), backend=backend)
    err = np.abs(plan.cpu().numpy() - expected).max()
    assert err <= 1e-3, f"plan {err:.2e} away from float64"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_near_duplicate_tokens_full_size(rng_seed, dtype):
    pred, target = near_duplicate_tokens(64, 8, 16, 768)
    pred, target = pred.to(dtype), target.to(dtype)
    cost = torch.cdist(pred.double(), target.double().repeat_interleave(8, 0))
    expected = plan_float64_forbidden(cost.numpy(), 0.1, 5)
    _, plan = sk.match_tokens(pred.cuda(), target.cuda())
    err = np.abs(plan.cpu().numpy() - expected).max()
    assert err <= 1e-3, f"plan {err:.2e} away from float64"


@pytest.mark.gpu
def test_gpu_forbidden_pairs_full_size(rng_seed):
    cost = random_forbidden(512, 16, 16, 0.3)
    for rounding in ("permutation", "argmax"):
        index, plan = sk.sinkhorn_match(cost.cuda(), rounding=rounding)
        assert torch.isfinite(plan).all()
        expected = plan_float64_forbidden(cost.numpy(), 0.1, 5)
        np.testing.assert_allclose(plan.cpu().numpy(), expected, rtol=1e-3, atol=1e-6)
        assert_rounding_respects_forbidden(index, cost, rounding)
    bad = cost.clone()
    bad[100, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="cost contains NaN"):
        sk.sinkhorn_match(bad.cuda())


# ----------------------------------------------------------------------------- 8. self-contained docs


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_grep(pattern: str, *flags: str) -> str:
    """`git grep -I -E pattern` over the tracked files (skips where git or the checkout is missing)."""
    try:
        out = subprocess.run(
            ["git", "grep", "-I", "-E", *flags, pattern],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if out.returncode not in (0, 1):
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return out.stdout


def test_nothing_cites_files_outside_the_repository():
    """A page cited by section (an upper-case page name, then a section sign or the word
    section and a number) is a Markdown page of this repository, and no path climbs out."""
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True)
    pages = {os.path.basename(p)[:-3] for p in listed.stdout.split()}
    found = git_grep(r"\b[A-Z][A-Z_]+(\.md)?[ ]*(§|section) ?[0-9]", "-n", "-o")
    foreign = [
        hit
        for hit in found.splitlines()
        if re.split(r"[ .§]", hit.split(":", 2)[2])[0] not in pages
    ]
    assert not foreign, "\n".join(foreign)
    climbing = git_grep(r"\.\./[A-Za-z_]+/", "-n")
    assert not climbing, climbing


def test_every_cited_docs_page_exists():
    cited = set(git_grep(r"docs/[A-Za-z0-9_-]+\.md", "-h", "-o").split())
    assert cited, "no docs page is cited"
    missing = sorted(page for page in cited if not os.path.isfile(os.path.join(ROOT, page)))
    assert not missing, f"cited but missing: {missing}"


def test_readme_states_the_contract_for_every_operator():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "### The contract" in readme
    section = readme.split("### The contract", 1)[1].split("\n### ", 1)[0]
    operators = ["sinkhorn_match", "match_tokens", "sinkhorn_knopp"]
    operators += ["localization", "factorize", "hungarian_match"]
    missing = [op for op in operators if f"`{op}`" not in section]
    assert not missing, f"the contract says nothing of {missing}"
    for promise in ("validate=False", "fullgraph=True", "STELLAR_KERNELS_BACKEND", "local=True"):
        assert promise in section, promise
    for op in operators:
        doc = getattr(sk, op).__doc__
        assert "validate:" in doc and "backend:" in doc, f"{op}'s docstring lacks the contract"
