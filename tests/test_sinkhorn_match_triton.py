"""Triton sinkhorn_match / match_tokens against the PyTorch reference and float64 math.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) on small shapes; the gpu-marked tests repeat the comparisons
at full size on CUDA. Every kernel configuration the launchers can pick is also
compiled for sm_80 and sm_90.
"""

import importlib

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from test_sinkhorn_match import (  # noqa: E402
    GREEDY_FORBIDDEN_COST,
    INF,
    ISSUE_COST,
    assert_exact_hungarian,
    assignment_totals,
    forbidden_costs,
    plan_float64,
    scipy_hungarian,
)

import stellar_kernels as sk  # noqa: E402
from stellar_kernels import _triton  # noqa: E402
from stellar_kernels.reference import round_plan  # noqa: E402

# The modules (the package attributes of those names are the functions).
sm = importlib.import_module("stellar_kernels.sinkhorn_match")
mt = importlib.import_module("stellar_kernels.match_tokens")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- helpers


def near_tie(plan: np.ndarray, rounding: str, rtol: float, atol: float) -> bool:
    """Whether rounding `plan` (Q, T) meets, at some step, a runner-up within tolerance of the pick."""
    p = np.asarray(plan, dtype=np.float64).copy()
    if rounding == "argmax":
        if p.shape[1] < 2:
            return False
        top = np.sort(p, axis=1)[:, -2:]
        return bool(np.any(top[:, 1] - top[:, 0] <= rtol * top[:, 1] + atol))
    for _ in range(p.shape[0]):
        flat = np.sort(p.ravel())[-2:]
        if flat.size == 2 and flat[0] >= 0 and flat[1] - flat[0] <= rtol * flat[1] + atol:
            return True
        r, c = np.unravel_index(np.argmax(p), p.shape)
        p[r, :] = -1.0
        p[:, c] = -1.0
    return False


def check_hungarian(index, plan, expected_plan, rtol, atol, cost=None):
    """index is an exact rounding of our own plan, and within the plans' tolerance of the
    largest mass on the expected plan (entries within rtol * 1 + atol, each plan entry <= 1)."""
    assert_exact_hungarian(index, plan, cost, brute_force=False)
    expected_plan = np.asarray(expected_plan, dtype=np.float64)
    forbidden = np.zeros(plan.shape, bool) if cost is None else np.isinf(cost.cpu().numpy())
    q = plan.shape[1]
    for b, row in enumerate(index.cpu().numpy()):
        best, _ = scipy_hungarian(expected_plan[b], forbidden[b])
        got = expected_plan[b, np.arange(q), row].sum()
        assert got >= best - 2 * q * (rtol + atol), f"problem {b}: {got} < {best}"


def check_index(index, plan, expected_plan, rounding, rtol, atol):
    """index is exactly the rounding of our own plan (same tie-breaking as `round_plan`) and equals
    the rounding of the expected plan except in problems where that one has a near tie."""
    assert index.dtype == torch.int64 and index.shape == plan.shape[:2]
    if rounding == "hungarian":
        check_hungarian(index, plan, expected_plan, rtol, atol)
        return
    assert torch.equal(index.cpu(), round_plan(plan.cpu(), rounding))
    expected_plan = torch.as_tensor(expected_plan)
    expected = round_plan(expected_plan, rounding)
    for b in range(index.shape[0]):
        if not torch.equal(index[b].cpu(), expected[b]):
            assert near_tie(expected_plan[b].numpy(), rounding, rtol, atol), (
                f"problem {b}: index {index[b].tolist()} != {expected[b].tolist()} without a tie"
            )
    if rounding == "permutation":
        for row in index.cpu():
            assert len(set(row.tolist())) == index.shape[1]


def make_cost(b, q, t, dtype, contiguous, device=DEVICE):
    if contiguous:
        return (torch.rand(b, q, t, device=device) * 2).to(dtype)
    # A transposed view: stride 1 along Q, not along T.
    return (torch.rand(b, t, q, device=device) * 2).to(dtype).transpose(1, 2)


def check_sinkhorn(cost, eps, n_iters, rounding, **kwargs):
    index, plan = sk.sinkhorn_match(
        cost, eps=eps, n_iters=n_iters, rounding=rounding, backend="triton", **kwargs
    )
    assert plan.dtype == torch.float32 and plan.shape == cost.shape
    ref_index, ref_plan = sk.sinkhorn_match(
        cost, eps=eps, n_iters=n_iters, rounding=rounding, backend="torch"
    )
    torch.testing.assert_close(plan, ref_plan, rtol=1e-4, atol=1e-6)
    expected = plan_float64(cost.float().cpu().numpy(), eps, n_iters)
    np.testing.assert_allclose(plan.cpu().numpy(), expected, rtol=2e-4, atol=1e-6)
    check_index(index, plan, ref_plan.cpu(), rounding, rtol=1e-4, atol=1e-6)
    return index, plan


def tokens_float64(pred, target, eps, n_iters):
    views = pred.shape[0] // target.shape[0]
    cost = torch.cdist(pred.double().cpu(), target.double().cpu().repeat_interleave(views, 0))
    return cost, plan_float64(cost.numpy(), eps, n_iters)


def check_tokens(pred, target, eps, n_iters, rounding):
    index, plan = sk.match_tokens(
        pred, target, eps=eps, n_iters=n_iters, rounding=rounding, backend="triton"
    )
    assert plan.shape == (pred.shape[0], pred.shape[1], target.shape[1])
    cost64, expected = tokens_float64(pred, target, eps, n_iters)
    np.testing.assert_allclose(plan.cpu().numpy(), expected, rtol=2e-3, atol=1e-5)
    # The contract: sinkhorn_match(cdist(pred, target.repeat_interleave(V, 0))).
    views = pred.shape[0] // target.shape[0]
    cost = torch.cdist(pred.float(), target.float().repeat_interleave(views, 0))
    _, ref_plan = sk.sinkhorn_match(cost, eps=eps, n_iters=n_iters, backend="torch")
    torch.testing.assert_close(plan, ref_plan, rtol=2e-3, atol=1e-5)
    check_index(index, plan, expected, rounding, rtol=2e-3, atol=1e-5)
    return index, plan


# ----------------------------------------------------------------------------- sinkhorn_match

# Every listed value of every dimension appears at least once (not the full product).
SINKHORN_CASES = [
    # b, q, t, eps, n_iters, dtype, contiguous, rounding
    (1, 1, 1, 0.1, 1, "fp32", True, "permutation"),
    (3, 5, 5, 0.05, 5, "fp16", False, "argmax"),
    (8, 5, 9, 1.0, 20, "bf16", True, "permutation"),
    (8, 16, 16, 0.1, 5, "fp32", False, "permutation"),
    (3, 13, 32, 0.05, 20, "fp32", True, "argmax"),
    (1, 16, 16, 1.0, 1, "bf16", False, "argmax"),
    (3, 13, 32, 0.1, 5, "fp16", False, "permutation"),
    (8, 5, 9, 0.05, 1, "fp32", True, "argmax"),
    (6, 5, 7, 1.0, 2, "fp32", True, "hungarian"),
    (3, 13, 32, 0.1, 5, "bf16", False, "hungarian"),
]


@pytest.mark.parametrize("b,q,t,eps,n_iters,dtype,contiguous,rounding", SINKHORN_CASES)
def test_sinkhorn_match_triton(rng_seed, b, q, t, eps, n_iters, dtype, contiguous, rounding):
    cost = make_cost(b, q, t, DTYPES[dtype], contiguous)
    check_sinkhorn(cost, eps, n_iters, rounding)


def test_two_dimensional_cost_and_default_rounding(rng_seed):
    cost = torch.rand(6, 9, device=DEVICE)
    index, plan = sk.sinkhorn_match(cost, backend="triton")
    index3, plan3 = sk.sinkhorn_match(cost[None], backend="triton")
    assert index.shape == (6,) and plan.shape == (6, 9)
    assert torch.equal(index, index3[0]) and torch.equal(plan, plan3[0])
    assert len(set(index.tolist())) == 6  # "permutation" is the default


@pytest.mark.parametrize("tile", [16, 32])
def test_every_tile_configuration(rng_seed, monkeypatch, tile):
    """Each (problems per program, num_warps) the tuner may pick, on a batch that none divides."""
    q, t = tile // 2 + 1, tile - 3
    cost = make_cost(5, q, t, torch.float32, True)
    key = _triton.tune_key("sinkhorn_match", cost.device, torch.float32, 5, q, t)
    for config in sm.sinkhorn_candidates(tile):
        monkeypatch.setitem(_triton.TUNED, key, config)
        check_sinkhorn(cost, 0.1, 5, "permutation")


def test_untimed_tuning_takes_the_first_candidate_and_caches_nothing():
    calls = []
    key = ("test", 1, 2, 3, torch.float32)
    got = _triton.autotune(key, [(2, 2), (1, 1)], calls.append, torch.device("cpu"))
    assert got == (2, 2) and calls == [] and key not in _triton.TUNED


def test_sliced_input_reads_strides_without_copy(rng_seed):
    base = torch.rand(4, 7, 20, device=DEVICE)
    cost = base[1:, 1:, ::2]  # strides (140, 20, 2), offset storage
    check_sinkhorn(cost, 0.1, 5, "permutation")
    before = base.clone()
    sk.sinkhorn_match(cost, backend="triton")
    assert torch.equal(base, before)


def test_permutation_rounding_both_branches(rng_seed):
    # (a) The row-wise argmax is already one-to-one: the greedy rounding must return it.
    perm = torch.stack([torch.randperm(16) for _ in range(4)]).to(DEVICE)
    cost = torch.rand(4, 16, 16, device=DEVICE).scatter_(2, perm[..., None], -5.0)
    index, plan = check_sinkhorn(cost, 0.1, 5, "permutation")
    assert torch.equal(index, perm) and torch.equal(index, plan.argmax(-1))
    # (b) Flat plans whose argmax repeats columns: the K greedy steps run.
    cost = torch.rand(8, 16, 16, device=DEVICE) * 2
    argmax = sk.sinkhorn_match(cost, eps=1.0, n_iters=1, rounding="argmax", backend="torch").index
    assert any(len(set(row.tolist())) < 16 for row in argmax)
    index, _ = check_sinkhorn(cost, 1.0, 1, "permutation")
    assert not torch.equal(index, argmax)


@pytest.mark.parametrize("shape", [(2, 4, 6), (1, 65, 129)])
def test_exact_ties_break_like_the_reference(shape):
    # Every entry equal: the plan is uniform, rounding must pick the lowest flat index each time
    # (in the loop path, across row and column blocks too).
    cost = torch.ones(shape, device=DEVICE)
    for rounding in ("permutation", "argmax"):
        index, plan = sk.sinkhorn_match(cost, rounding=rounding, backend="triton")
        ref_index, ref_plan = sk.sinkhorn_match(cost, rounding=rounding, backend="torch")
        torch.testing.assert_close(plan, ref_plan, rtol=1e-6, atol=0)
        assert torch.equal(index, round_plan(plan, rounding))
    assert torch.equal(
        sk.sinkhorn_match(cost, rounding="argmax", backend="triton").index.cpu(),
        torch.zeros(shape[:2], dtype=torch.long),
    )


@pytest.mark.parametrize(
    "b,q,t,dtype,contiguous,rounding",
    [
        (2, 5, 150, "fp16", False, "argmax"),
        (1, 70, 140, "fp32", True, "permutation"),
        (2, 6, 131, "fp32", False, "hungarian"),
    ],
)
def test_large_t_loop_path(rng_seed, b, q, t, dtype, contiguous, rounding):
    assert t > sm.TILE_LIMIT
    cost = make_cost(b, q, t, DTYPES[dtype], contiguous)
    check_sinkhorn(cost, 0.1, 5, rounding)


def test_empty_batch():
    for rounding in ("permutation", "hungarian"):
        cost = torch.rand(0, 3, 4, device=DEVICE)
        index, plan = sk.sinkhorn_match(cost, rounding=rounding, backend="triton")
        assert index.shape == (0, 3) and plan.shape == (0, 3, 4)


# ----------------------------------------------------------------------------- rounding="hungarian"


@pytest.mark.parametrize("b,q,t,p", [(8, 5, 6, 0.4), (8, 4, 7, 0.6), (3, 11, 19, 0.3)])
def test_hungarian_with_forbidden_pairs_equals_the_torch_backend(rng_seed, b, q, t, p):
    """Exact on the Triton plan (brute force for small K, scipy beyond); the same index as the
    torch backend wherever the optimum is not within the two plans' difference of another."""
    cost = forbidden_costs(b, q, t, p)  # problem 0 has a free assignment, problem 1 none
    index, plan = sk.sinkhorn_match(cost.to(DEVICE), 0.1, 5, "hungarian", backend="triton")
    ref_index, ref_plan = sk.sinkhorn_match(cost, 0.1, 5, "hungarian", backend="torch")
    torch.testing.assert_close(plan.cpu(), ref_plan, rtol=1e-4, atol=1e-6)
    small = q <= 5
    assert_exact_hungarian(index, plan, cost, brute_force=small)
    check_hungarian(index, plan, ref_plan.numpy(), 1e-4, 1e-6, cost)
    if not small:
        return
    for k in range(b):
        totals = sorted(
            assignment_totals(ref_plan[k].double().numpy(), np.isinf(cost[k].numpy())).values()
        )
        if len(totals) < 2 or totals[-1] - totals[-2] > 2 * q * (1e-4 + 1e-6):
            assert index[k].tolist() == ref_index[k].tolist(), f"problem {k}"


def test_hungarian_plan_is_the_other_roundings_plan(rng_seed):
    cost = forbidden_costs(4, 5, 7, 0.3).to(DEVICE)
    plans = [
        sk.sinkhorn_match(cost, 0.1, 5, rounding, backend="triton").plan
        for rounding in ("hungarian", "permutation", "argmax")
    ]
    assert torch.equal(plans[0], plans[1]) and torch.equal(plans[0], plans[2])
    pred, target = torch.randn(4, 5, 8, device=DEVICE), torch.randn(2, 6, 8, device=DEVICE)
    plans = [
        sk.match_tokens(pred, target, rounding=rounding, backend="triton").plan
        for rounding in ("hungarian", "permutation")
    ]
    assert torch.equal(plans[0], plans[1])


def test_hungarian_avoids_the_forbidden_pairs_greedy_takes():
    # The issue's cost: its plan ties row 0's columns 1 and 2, and rows 1 and 2 on column 0,
    # so which way the greedy rounding goes depends on the plan's last bit.
    cost = torch.tensor(ISSUE_COST, device=DEVICE)
    index, plan = sk.sinkhorn_match(cost, 0.1, 5, "hungarian", backend="triton")
    assert index.tolist() in ([1, 0, 2], [2, 1, 0])  # equal mass in exact arithmetic
    assert_exact_hungarian(index[None], plan[None], cost[None])
    cost = torch.tensor([GREEDY_FORBIDDEN_COST], device=DEVICE)
    greedy = sk.sinkhorn_match(cost, 0.1, 5, "permutation", backend="triton").index
    assert torch.isinf(cost[0, range(4), greedy[0]]).any()
    index, plan = sk.sinkhorn_match(cost, 0.1, 5, "hungarian", backend="triton")
    assert_exact_hungarian(index, plan, cost)
    assert torch.equal(index, sk.sinkhorn_match(cost.cpu(), 0.1, 5, "hungarian").index)


def test_hungarian_nan_plan_indices_stay_in_range(rng_seed):
    cost = torch.rand(2, 4, 6, device=DEVICE)
    cost[0, 1, 2] = float("nan")
    cost[1, 3] = INF
    index, _ = sk.sinkhorn_match(cost, rounding="hungarian", backend="triton", validate=False)
    assert bool(((index >= 0) & (index < 6)).all()), index.tolist()
    assert all(len(set(row)) == 4 for row in index.tolist())


# ----------------------------------------------------------------------------- match_tokens

TOKEN_CASES = [
    # images, views, q, t, d, dtype, contiguous, rounding, eps, n_iters
    (3, 1, 5, 5, 8, "fp32", True, "permutation", 0.1, 5),
    (2, 4, 16, 16, 40, "fp16", True, "argmax", 0.1, 5),
    (2, 4, 13, 16, 96, "bf16", False, "permutation", 0.1, 5),
    (1, 1, 16, 16, 96, "fp32", False, "argmax", 1.0, 20),
    (2, 4, 5, 9, 40, "fp32", True, "permutation", 0.05, 1),
    (2, 3, 5, 7, 24, "fp32", False, "hungarian", 1.0, 2),
]


@pytest.mark.parametrize("images,views,q,t,d,dtype,contiguous,rounding,eps,n_iters", TOKEN_CASES)
def test_match_tokens_triton(
    rng_seed, images, views, q, t, d, dtype, contiguous, rounding, eps, n_iters
):
    dtype = DTYPES[dtype]
    if contiguous:
        pred = torch.randn(images * views, q, d, device=DEVICE).to(dtype)
        target = torch.randn(images, t, d, device=DEVICE).to(dtype)
    else:  # token dimension not innermost
        pred = torch.randn(images * views, d, q, device=DEVICE).to(dtype).transpose(1, 2)
        target = torch.randn(images, d, t, device=DEVICE).to(dtype).transpose(1, 2)
    check_tokens(pred, target, eps, n_iters, rounding)


def test_match_tokens_mixed_dtypes(rng_seed):
    pred = torch.randn(4, 6, 24, device=DEVICE).half()
    target = torch.randn(2, 6, 24, device=DEVICE)
    check_tokens(pred, target, 0.1, 5, "permutation")


def test_match_tokens_large_t(rng_seed):
    pred = torch.randn(2, 3, 8, device=DEVICE)
    target = torch.randn(1, 140, 8, device=DEVICE)
    check_tokens(pred, target, 0.1, 5, "permutation")


def test_match_tokens_views_are_close_to_the_target(rng_seed):
    """STELLAR-like tokens: each view is a noisy copy of the target, so matching is near identity."""
    target = torch.nn.functional.layer_norm(torch.randn(2, 16, 64, device=DEVICE), (64,))
    perm = torch.stack([torch.randperm(16, device=DEVICE) for _ in range(6)])
    pred = target.repeat_interleave(3, 0).gather(1, perm[..., None].expand(-1, -1, 64))
    pred = pred + 0.05 * torch.randn_like(pred)
    index, _ = check_tokens(pred, target, 0.1, 5, "permutation")
    assert torch.equal(index, perm)


# ----------------------------------------------------------------------------- match_tokens per image

# images, views, q, t, d, pred dtype, target dtype, contiguous: odd V (masked views in the
# last group of an image), Q < T, D not a multiple of any chunk, every dtype, mixed dtypes,
# tiles 16 and 32.
IMAGE_CASES = [
    (2, 3, 13, 16, 70, "fp32", "fp32", True),
    (1, 5, 5, 9, 40, "fp16", "fp16", False),
    (2, 4, 16, 16, 100, "bf16", "bf16", True),
    (2, 3, 6, 7, 24, "bf16", "fp32", False),
    (1, 3, 20, 30, 50, "fp32", "fp32", True),
]


def make_tokens(images, views, q, t, d, pred_dtype, target_dtype, contiguous, device=DEVICE):
    if contiguous:
        pred = torch.randn(images * views, q, d, device=device)
        target = torch.randn(images, t, d, device=device)
    else:  # token dimension not innermost
        pred = torch.randn(images * views, d, q, device=device).transpose(1, 2)
        target = torch.randn(images, d, t, device=device).transpose(1, 2)
    return pred.to(DTYPES[pred_dtype]), target.to(DTYPES[target_dtype])


def tokens_as(monkeypatch, config, pred, target, rounding, eps=0.1, n_iters=5):
    """sk.match_tokens on the Triton path launched with `config` (views per program,
    num_warps), as the tuner's choice for this call's key."""
    monkeypatch.setitem(_triton.TUNED, mt.match_tokens_tune_key(pred, target), config)
    return sk.match_tokens(pred, target, eps, n_iters, rounding, backend="triton")


def token_configs(pred, target):
    """The launch candidates of this shape: (the untimed per-row default, the per-image ones)."""
    views = pred.shape[0] // target.shape[0]
    candidates = mt.match_tokens_candidates(sm.tile_edge(target.shape[1]), views)
    assert candidates[0][0] == mt.PER_ROW
    per_image = [c for c in candidates if c[0] != mt.PER_ROW]
    assert per_image, "no per-image candidate for this shape"
    return candidates[0], per_image


@pytest.mark.parametrize("images,views,q,t,d,pred_dtype,target_dtype,contiguous", IMAGE_CASES)
def test_match_tokens_per_image_is_bitwise_the_per_row_form(
    rng_seed, monkeypatch, images, views, q, t, d, pred_dtype, target_dtype, contiguous
):
    """Streaming D in the per-row form's chunks, the per-image form does the same arithmetic
    on every entry: the same plan and index, bit for bit (the interpreter's batched dot keeps
    each product's order), for every rounding (the greedy one with its K steps too: eps=1,
    one iteration, flat plans whose argmax repeats columns)."""
    pred, target = make_tokens(images, views, q, t, d, pred_dtype, target_dtype, contiguous)
    per_row_chunk = mt.match_tokens_block_d
    monkeypatch.setattr(mt, "match_tokens_block_d", lambda tile, *_: per_row_chunk(tile))
    row, per_image = token_configs(pred, target)
    roundings = [("permutation", 0.1, 5), ("permutation", 1.0, 1), ("argmax", 0.1, 5)]
    for rounding, eps, n_iters in [*roundings, ("hungarian", 0.1, 5)]:
        want = tokens_as(monkeypatch, row, pred, target, rounding, eps, n_iters)
        for config in per_image:
            got = tokens_as(monkeypatch, config, pred, target, rounding, eps, n_iters)
            assert torch.equal(got.plan, want.plan), (config, rounding, eps)
            assert torch.equal(got.index, want.index), (config, rounding, eps)


@pytest.mark.parametrize("images,views,q,t,d,pred_dtype,target_dtype,contiguous", IMAGE_CASES)
def test_match_tokens_every_per_image_candidate(
    rng_seed, monkeypatch, images, views, q, t, d, pred_dtype, target_dtype, contiguous
):
    """Each per-image candidate as the launcher runs it (its own chunk of D: other sums, so
    the costs' last bits move, by ~1e-5 of the plan at eps = 0.1): the contract's plan, and
    the per-row form's within 1e-4 with the same index except at a near tie."""
    pred, target = make_tokens(images, views, q, t, d, pred_dtype, target_dtype, contiguous)
    row_config, per_image = token_configs(pred, target)
    row = tokens_as(monkeypatch, row_config, pred, target, "argmax")
    for config in per_image:
        monkeypatch.setitem(_triton.TUNED, mt.match_tokens_tune_key(pred, target), config)
        index, plan = check_tokens(pred, target, 0.1, 5, "permutation")
        torch.testing.assert_close(plan, row.plan, rtol=1e-4, atol=1e-6)
        check_index(index, plan, row.plan.cpu(), "permutation", rtol=1e-4, atol=1e-6)


def test_match_tokens_candidates_bound_the_per_image_form():
    """The per-image form only with more than one view, VB below 2 V, at tiles 16 and 32,
    with a chunk of 16 to 64 and at most 8 pred floats per thread; the default is per-row."""
    for tile in (16, 32, 64, 128):
        assert mt.match_tokens_candidates(tile, 1) == [
            c for c in mt.match_tokens_candidates(tile, 8) if c[0] == mt.PER_ROW
        ]
        for views in (1, 2, 3, 8, 16, 40):
            candidates = mt.match_tokens_candidates(tile, views)
            assert candidates[0] == (mt.PER_ROW, candidates[0][1])
            for per_program, warps in candidates:
                if per_program == mt.PER_ROW:
                    continue
                assert tile <= 32 and 2 <= per_program < 2 * views and per_program <= 16
                chunk = mt.match_tokens_block_d(tile, per_program, warps)
                assert 16 <= chunk <= 64
                assert per_program * tile * chunk <= 8 * 32 * warps or chunk == 16
    assert (8, 8) in mt.match_tokens_candidates(16, 8)


def test_eager_outputs_come_from_one_allocation(rng_seed, monkeypatch):
    """Outside the custom ops, index and plan are contiguous views of one buffer, the index
    first and the plan from a 256-byte boundary after it; with ONE_OUTPUT_ALLOCATION off, two
    allocations. Both ways the same results."""
    cost = make_cost(5, 6, 9, torch.float32, True)
    wide = make_cost(2, 5, 131, torch.float32, True)  # the loop path
    pred, target = torch.randn(6, 5, 24, device=DEVICE), torch.randn(2, 7, 24, device=DEVICE)
    calls = [
        lambda: sk.sinkhorn_match(cost, backend="triton"),
        lambda: sk.sinkhorn_match(cost[0], backend="triton"),
        lambda: sk.sinkhorn_match(wide, rounding="argmax", backend="triton"),
        lambda: sk.match_tokens(pred, target, backend="triton"),
    ]
    for call in calls:
        index, plan = call()
        assert index.dtype == torch.int64 and plan.dtype == torch.float32
        assert index.is_contiguous() and plan.is_contiguous()
        assert index.untyped_storage().data_ptr() == plan.untyped_storage().data_ptr()
        offset = plan.data_ptr() - index.untyped_storage().data_ptr()
        assert offset % sm.OUTPUT_ALIGNMENT == 0 and offset >= index.numel() * 8
        assert index.data_ptr() == index.untyped_storage().data_ptr()
        monkeypatch.setattr(sm, "ONE_OUTPUT_ALLOCATION", False)
        separate = call()
        monkeypatch.setattr(sm, "ONE_OUTPUT_ALLOCATION", True)
        assert (
            separate.index.untyped_storage().data_ptr()
            != separate.plan.untyped_storage().data_ptr()
        )
        assert torch.equal(index, separate.index) and torch.equal(plan, separate.plan)
    for b, q, t in [(0, 3, 4), (3, 0, 4), (1, 1, 1), (3, 5, 7)]:  # odd sizes and empty ones
        index, plan = sm.match_outputs(b, q, t, DEVICE)
        assert index.shape == (b, q) and plan.shape == (b, q, t)
        plan.fill_(0.5)
        index.fill_(-1)
        assert bool((plan == 0.5).all()) and bool((index == -1).all())


# ----------------------------------------------------------------------------- backend, ops, compile


def test_custom_ops_pass_opcheck(rng_seed):
    cost = make_cost(3, 5, 7, torch.float32, False)
    torch.library.opcheck(
        torch.ops.stellar_kernels.sinkhorn_match.default, (cost, 0.1, 5, "argmax")
    )
    pred = torch.randn(4, 5, 24, device=DEVICE)
    target = torch.randn(2, 6, 24, device=DEVICE)
    torch.library.opcheck(
        torch.ops.stellar_kernels.match_tokens.default, (pred, target, 0.1, 3, "permutation")
    )
    # Their outputs come from two allocations (a custom op's outputs must not alias), where
    # the eager path's share one.
    for index, plan in (
        torch.ops.stellar_kernels.sinkhorn_match(cost, 0.1, 5, "argmax"),
        torch.ops.stellar_kernels.match_tokens(pred, target, 0.1, 3, "permutation"),
    ):
        assert index.untyped_storage().data_ptr() != plan.untyped_storage().data_ptr()


def test_torch_compile_fullgraph(rng_seed):
    def step(cost, pred, target):
        index, plan = sk.sinkhorn_match(cost, validate=False, backend="triton")
        t_index, t_plan = sk.match_tokens(pred, target, validate=False, backend="triton")
        return index, plan.sum(-1), t_index, t_plan * 2

    cost = torch.rand(3, 5, 9, device=DEVICE)
    pred = torch.randn(4, 5, 24, device=DEVICE)
    target = torch.randn(2, 7, 24, device=DEVICE)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(cost, pred, target)
    want = step(cost, pred, target)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[3], want[3])


# ----------------------------------------------------------------------------- GPU, full size


@pytest.fixture
def untuned(monkeypatch):
    """The default configurations only (the tuned ones are checked in one test below)."""
    monkeypatch.setenv("STELLAR_KERNELS_AUTOTUNE", "0")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rounding", ["permutation", "argmax", "hungarian"])
def test_gpu_sinkhorn_match_full_size(rng_seed, untuned, dtype, rounding):
    cost = make_cost(512, 16, 16, DTYPES[dtype], dtype != "fp16", device="cuda")
    check_sinkhorn(cost, 0.1, 5, rounding)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_gpu_match_tokens_full_size(rng_seed, untuned, dtype):
    dtype = DTYPES[dtype]
    pred = torch.randn(512, 16, 768, device="cuda").to(dtype)
    target = torch.randn(64, 16, 768, device="cuda").to(dtype)
    for rounding in ("permutation", "argmax", "hungarian"):
        check_tokens(pred, target, 0.1, 5, rounding)
    check_tokens(pred.transpose(0, 1).contiguous().transpose(0, 1), target, 0.1, 5, "permutation")


@pytest.mark.gpu
def test_gpu_every_candidate_configuration(rng_seed, monkeypatch):
    """The tuner times every candidate once and caches its pick; each configuration it may
    pick, not only the one it picked, computes the same."""
    cuda = torch.device("cuda")
    key = _triton.tune_key("sinkhorn_match", cuda, torch.float32, 512, 16, 16)
    monkeypatch.delitem(_triton.TUNED, key, raising=False)
    sk.sinkhorn_match(torch.rand(512, 16, 16, device="cuda"))
    assert _triton.TUNED[key] in sm.sinkhorn_candidates(16)
    cost = make_cost(509, 16, 16, torch.float32, True, device="cuda")  # the same key (512)
    for config in sm.sinkhorn_candidates(16):
        monkeypatch.setitem(_triton.TUNED, key, config)
        check_sinkhorn(cost, 0.1, 5, "permutation")
    pred = torch.randn(512, 16, 768, device="cuda")
    target = torch.randn(64, 16, 768, device="cuda")
    key = mt.match_tokens_tune_key(pred, target)
    assert key == _triton.tune_key(
        "match_tokens", cuda, torch.float32, 512, 16, 16, 768, 8, torch.float32
    )
    monkeypatch.delitem(_triton.TUNED, key, raising=False)
    sk.match_tokens(pred, target)
    assert _triton.TUNED[key] in mt.match_tokens_candidates(16, 8)
    row = None
    for config in mt.match_tokens_candidates(16, 8):  # the per-row form first
        monkeypatch.setitem(_triton.TUNED, key, config)
        index, plan = check_tokens(pred, target, 0.1, 5, "permutation")
        row = (index, plan) if row is None else row
        # Each form against the per-row default: other chunks of D and other layouts give
        # other sums, so float32 costs that differ in their last bits (~1e-3 of a plan entry
        # at D = 768, eps = 0.1: the tolerance of check_tokens against float64).
        torch.testing.assert_close(plan, row[1], rtol=2e-3, atol=1e-5)
        check_index(index, plan, row[1].cpu(), "permutation", rtol=2e-3, atol=1e-5)
    for q, t in [(30, 32), (64, 64), (100, 128)]:
        check_sinkhorn(
            make_cost(64, q, t, torch.float32, True, device="cuda"), 0.1, 5, "permutation"
        )


@pytest.mark.gpu
@pytest.mark.parametrize("rounding", ["permutation", "argmax", "hungarian"])
def test_gpu_large_t(rng_seed, untuned, rounding):
    check_sinkhorn(make_cost(6, 150, 200, torch.float32, False, device="cuda"), 0.1, 5, rounding)
    pred = torch.randn(4, 150, 64, device="cuda")
    target = torch.randn(2, 160, 64, device="cuda")
    check_tokens(pred, target, 0.1, 5, rounding)


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph(rng_seed):
    cost = torch.rand(512, 16, 16, device="cuda")
    pred = torch.randn(512, 16, 768, device="cuda")
    target = torch.randn(64, 16, 768, device="cuda")
    forbidden = cost.masked_fill(torch.rand_like(cost) < 0.3, INF)

    def step():
        a = sk.sinkhorn_match(cost, validate=False)
        b = sk.match_tokens(pred, target, validate=False)
        c = sk.sinkhorn_match(forbidden, rounding="hungarian", validate=False)
        d = sk.match_tokens(pred, target, rounding="hungarian", validate=False)
        return a.index, a.plan, b.index, b.plan, c.index, d.index

    want = step()  # tunes (and synchronizes) once per shape
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = step()
    cost.copy_(torch.rand_like(cost))
    forbidden.copy_(cost.masked_fill(torch.rand_like(cost) < 0.3, INF))
    pred.copy_(torch.randn_like(pred))
    graph.replay()
    torch.cuda.synchronize()
    fresh = step()
    for got, expected in zip(out, fresh):
        assert torch.equal(got, expected)
    assert want[1].shape == out[1].shape
