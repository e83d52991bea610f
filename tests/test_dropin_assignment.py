"""hungarian_match as a drop-in for the assignment calls people make today.

These tests swap hungarian_match into the calls people make today, scipy's
linear_sum_assignment on one problem and torch-linear-assignment's
batch_linear_assignment on a CPU batch, and compare with those installed clients on the
same inputs. Ties may be broken differently, so the comparisons are of what every optimal
answer shares: the total cost, how many rows are assigned (and which stay -1 in count),
and the error on a problem with no solution.
"""

import numpy as np
import pytest
import torch
import torch_linear_assignment as tla  # the test extra pins 0.1.0
from scipy.optimize import linear_sum_assignment

import stellar_kernels as sk

INF = float("inf")


# --- scipy.optimize.linear_sum_assignment, one problem at a time ----------------------------


def ours_as_scipy(
    cost: np.ndarray, maximize: bool = False, validate: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """hungarian_match in linear_sum_assignment's calling convention: (row_ind, col_ind)."""
    index = sk.hungarian_match(torch.from_numpy(cost), maximize, validate=validate).numpy()
    rows = np.flatnonzero(index >= 0)
    return rows, index[rows]


def compare_with_scipy(cost: np.ndarray, maximize: bool = False) -> None:
    want_rows, want_cols = linear_sum_assignment(cost, maximize=maximize)
    rows, cols = ours_as_scipy(cost, maximize)
    assert rows.dtype == want_rows.dtype and cols.dtype == want_cols.dtype
    assert len(rows) == len(want_rows) == min(cost.shape)
    assert len(set(cols.tolist())) == len(cols)
    assert np.all(np.diff(rows) > 0)  # row_ind ascending, as scipy returns it
    # Summed in float64: the totals of integer costs would overflow their own dtype.
    as_float = cost.astype(np.float64)
    np.testing.assert_allclose(
        as_float[rows, cols].sum(), as_float[want_rows, want_cols].sum(), rtol=1e-12, atol=1e-9
    )


@pytest.fixture
def gen(rng_seed) -> np.random.Generator:
    return np.random.default_rng(rng_seed)


SHAPES = [(1, 1), (7, 7), (30, 30), (4, 11), (11, 4), (25, 40), (40, 25), (1, 9), (9, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("maximize", [False, True])
def test_scipy_floats(gen, shape, maximize):
    compare_with_scipy(gen.standard_normal(shape), maximize)
    compare_with_scipy(gen.random(shape).astype(np.float32), maximize)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("maximize", [False, True])
def test_scipy_ties_and_integer_costs(gen, shape, maximize):
    compare_with_scipy(gen.integers(0, 3, shape), maximize)  # int64, many ties
    for dtype in (np.int8, np.int16, np.int32, np.uint8):
        info = np.iinfo(dtype)
        values = gen.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
        compare_with_scipy(values, maximize)
    compare_with_scipy(gen.integers(-(2**62), 2**62, shape), maximize)
    # Unit steps at 2^30, finer than float32 resolves there: scipy solves them in float64.
    compare_with_scipy((2**30 + gen.integers(0, 64, shape)).astype(np.int32), maximize)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("maximize", [False, True])
def test_scipy_bool_costs(gen, shape, maximize):
    compare_with_scipy(gen.random(shape) < 0.5, maximize)


@pytest.mark.parametrize("shape", [(8, 8), (5, 12), (12, 5), (20, 31), (31, 20)])
def test_scipy_forbidden_entries(gen, shape):
    """+inf forbids a pair (-inf when maximizing); an optimal diagonal stays allowed."""
    for _ in range(10):
        cost = gen.random(shape)
        forbid = gen.random(shape) < 0.5
        k = min(shape)
        forbid[np.arange(k), np.arange(k)] = False
        compare_with_scipy(np.where(forbid, INF, cost))
        compare_with_scipy(np.where(forbid, -INF, cost), maximize=True)


def test_scipy_rows_forbidden_everywhere(gen):
    """More rows than columns: a row forbidden in every column is simply left out."""
    cost = gen.random((9, 4))
    cost[[1, 4, 6]] = INF
    compare_with_scipy(cost)
    assert not {1, 4, 6} & set(ours_as_scipy(cost)[0].tolist())
    compare_with_scipy(-cost, maximize=True)


def infeasible_problems() -> list[np.ndarray]:
    square = np.ones((4, 4))
    square[:, 2] = INF  # no row may take column 2
    wide = np.ones((3, 6))
    wide[1] = INF  # row 1 may take no column
    tall = np.ones((6, 3))
    tall[:, 0] = INF  # no row may take column 0
    tall_few = np.full((6, 3), INF)
    tall_few[2] = 1.0  # one allowed row for three columns
    return [square, wide, tall, tall_few]


@pytest.mark.parametrize("case", range(4))
def test_scipy_infeasible(case):
    cost = infeasible_problems()[case]
    with pytest.raises(ValueError):
        linear_sum_assignment(cost)
    with pytest.raises(ValueError, match=r"cost \(shape"):
        ours_as_scipy(cost)
    rows, cols = ours_as_scipy(cost, validate=False)
    assert len(rows) == len(cols) == 0  # every row -1
    with pytest.raises(ValueError):
        linear_sum_assignment(np.where(cost == INF, -INF, cost), maximize=True)
    with pytest.raises(ValueError, match=r"cost \(shape"):
        ours_as_scipy(np.where(cost == INF, -INF, cost), maximize=True)


def test_scipy_invalid_entries():
    """NaN, and -inf when minimizing: scipy refuses them, and so does hungarian_match."""
    for bad in (np.nan, -INF):
        for shape in [(3, 3), (3, 5), (5, 3)]:
            cost = np.ones(shape)
            cost[1, 1] = bad
            with pytest.raises(ValueError):
                linear_sum_assignment(cost)
            with pytest.raises(ValueError, match="cost"):
                ours_as_scipy(cost)
            assert len(ours_as_scipy(cost, validate=False)[0]) == 0


def test_scipy_empty():
    for shape in [(0, 0), (0, 4), (4, 0)]:
        want_rows, _ = linear_sum_assignment(np.ones(shape))
        rows, cols = ours_as_scipy(np.ones(shape))
        assert len(rows) == len(cols) == len(want_rows) == 0


# --- torch_linear_assignment.batch_linear_assignment on CPU tensors -------------------------
# Its CPU path loops scipy's solver over the batch (minimizing, costs taken as float32 unless
# float64) and writes -1 for rows without a column; +inf entries are forbidden pairs there.


def compare_with_tla(cost: torch.Tensor) -> None:
    want = tla.batch_linear_assignment(cost)
    got = sk.hungarian_match(cost)
    assert got.shape == want.shape and got.dtype == want.dtype == torch.int64
    assert torch.equal((got < 0).sum(1), (want < 0).sum(1))
    for problem, g, w in zip(cost.double(), got, want):
        assert len(set(g[g >= 0].tolist())) == int((g >= 0).sum())
        ours = problem[g >= 0].gather(1, g[g >= 0, None]).sum()
        theirs = problem[w >= 0].gather(1, w[w >= 0, None]).sum()
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-9)
    # The client's own helper reads our output as it reads its own.
    rows, cols = tla.assignment_to_indices(got)
    want_rows, want_cols = tla.assignment_to_indices(want)
    assert rows.shape == want_rows.shape and cols.shape == want_cols.shape


TLA_SHAPES = [(16, 6, 6), (8, 5, 13), (8, 13, 5), (4, 20, 33), (4, 33, 20), (3, 1, 7), (3, 7, 1)]


@pytest.mark.parametrize("shape", TLA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tla_random(rng_seed, shape, dtype):
    compare_with_tla(torch.rand(shape, dtype=dtype))
    compare_with_tla(torch.randn(shape, dtype=dtype) * 1e3)


@pytest.mark.parametrize("shape", TLA_SHAPES)
def test_tla_ties(rng_seed, shape):
    # Small integers: exact in the float32 the client converts them to, full of ties.
    compare_with_tla(torch.randint(0, 3, shape).float())
    compare_with_tla(torch.randint(-2, 3, shape))


@pytest.mark.parametrize("shape", TLA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tla_forbidden_entries(rng_seed, shape, dtype):
    cost = torch.rand(shape, dtype=dtype)
    forbid = torch.rand(shape) < 0.5
    k = min(shape[1:])
    forbid[:, torch.arange(k), torch.arange(k)] = False  # keeps every problem feasible
    compare_with_tla(cost.masked_fill(forbid, INF))


def test_tla_infeasible_raises_like_the_client():
    cost = torch.rand(3, 6, 4)
    cost[1, :, 2] = INF  # no row may take column 2 in problem 1
    with pytest.raises(ValueError):
        tla.batch_linear_assignment(cost)
    with pytest.raises(ValueError, match="problem 1"):
        sk.hungarian_match(cost)


def test_tla_empty_batch():
    cost = torch.rand(0, 4, 6)
    assert torch.equal(sk.hungarian_match(cost), tla.batch_linear_assignment(cost))
