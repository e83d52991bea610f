"""hungarian_match (C++ solver) against scipy.optimize.linear_sum_assignment."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import stellar_kernels as sk
from stellar_kernels._extension import cuda_extension_built


def scipy_total(cost: np.ndarray, maximize: bool) -> np.ndarray:
    totals = []
    for c in cost:
        r, col = linear_sum_assignment(c, maximize=maximize)
        totals.append(c[r, col].sum())
    return np.array(totals)


def total(cost: torch.Tensor, index: torch.Tensor) -> np.ndarray:
    return cost.double().gather(2, index.unsqueeze(-1)).sum((1, 2)).numpy()


def check_optimal(cost: torch.Tensor, maximize: bool = False):
    index = sk.hungarian_match(cost, maximize=maximize)
    assert index.shape == cost.shape[:2] and index.dtype == torch.int64
    for row in index:
        assert len(set(row.tolist())) == cost.shape[1]  # one-to-one
    np.testing.assert_allclose(
        total(cost, index), scipy_total(cost.double().numpy(), maximize), rtol=1e-9, atol=1e-6
    )
    return index


@pytest.mark.parametrize(
    "b,q,t,dtype",
    [
        (1, 1, 1, torch.float64),
        (64, 16, 16, torch.float32),
        (7, 5, 9, torch.float64),
        (3, 13, 32, torch.float32),
    ],
)
def test_random_floats(rng_seed, b, q, t, dtype):
    check_optimal(torch.rand(b, q, t, dtype=dtype))


def test_integer_costs_with_ties(rng_seed):
    check_optimal(torch.randint(0, 4, (50, 8, 8)).double())
    check_optimal(torch.zeros(3, 6, 6))


def test_negative_and_large_costs(rng_seed):
    check_optimal((torch.rand(20, 9, 11).double() - 0.5) * 1e6)


def test_maximize(rng_seed):
    check_optimal(torch.randn(20, 7, 10), maximize=True)


def test_forbidden_pairs(rng_seed):
    cost = torch.rand(30, 6, 8).double()
    forbid = torch.rand(30, 6, 8) < 0.3
    forbid[:, :, :6] &= ~torch.eye(6, dtype=torch.bool)  # keep a feasible diagonal
    cost[forbid] = float("inf")
    index = sk.hungarian_match(cost)
    assert not torch.isinf(cost.gather(2, index.unsqueeze(-1))).any()
    finite = cost.clone()
    finite[forbid] = (
        1e9  # scipy's optimum with a huge finite cost equals the forbidden-pair optimum
    )
    np.testing.assert_allclose(total(cost, index), scipy_total(finite.numpy(), False), rtol=1e-9)


def test_forbidden_pairs_maximize(rng_seed):
    cost = torch.randn(10, 5, 5).double()
    cost[:, 0, 1:] = float("-inf")  # row 0 may only take column 0
    index = check_optimal(cost, maximize=True)
    assert (index[:, 0] == 0).all()


def test_infeasible_raises(rng_seed):
    cost = torch.rand(4, 3, 3)
    cost[2, :, 1] = float("inf")  # nobody may take column 1 in problem 2
    with pytest.raises(ValueError, match="no finite assignment.*problem 2"):
        sk.hungarian_match(cost)


def test_nan_raises():
    cost = torch.rand(2, 3, 3)
    cost[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sk.hungarian_match(cost)


def test_large_problems(rng_seed):
    check_optimal(torch.rand(2, 100, 100, dtype=torch.float64))
    check_optimal(torch.rand(1, 300, 300, dtype=torch.float64))


def test_two_dimensional_and_non_contiguous(rng_seed):
    base = torch.rand(9, 5)
    index = sk.hungarian_match(base.t())  # (5, 9) transposed view
    expected = sk.hungarian_match(base.t().contiguous()[None])[0]
    assert torch.equal(index, expected)


def test_half_precision_accepted(rng_seed):
    cost = torch.rand(4, 6, 6).half()
    index = sk.hungarian_match(cost)
    np.testing.assert_allclose(
        total(cost.float(), index), scipy_total(cost.double().numpy(), False), rtol=1e-6
    )


def test_scipy_backend_agrees(rng_seed):
    cost = torch.rand(5, 4, 6)
    np.testing.assert_allclose(
        total(cost, sk.hungarian_match(cost, backend="scipy")),
        total(cost, sk.hungarian_match(cost)),
    )


def test_input_not_modified(rng_seed):
    cost = torch.randn(3, 4, 4)
    cost[0, 0, 0] = float("inf")
    before = cost.clone()
    sk.hungarian_match(cost, maximize=True)
    assert torch.equal(cost, before)


def test_cuda_extension_built_when_toolkit_present():
    """With CUDA torch and nvcc available, pip install must have compiled the CUDA sources."""
    import shutil

    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip(f"torch {torch.__version__} without CUDA or no nvcc: CUDA sources not expected")
    assert cuda_extension_built()


@pytest.mark.gpu
@pytest.mark.parametrize("b,q,t", [(512, 16, 16), (8, 5, 9), (4, 196, 196)])
def test_cuda_matches_scipy(b, q, t):
    cost = torch.rand(b, q, t, device="cuda", dtype=torch.float64)
    index = sk.hungarian_match(cost)
    assert index.device.type == "cuda"
    np.testing.assert_allclose(
        total(cost.cpu(), index.cpu()), scipy_total(cost.cpu().numpy(), False), rtol=1e-9
    )


@pytest.mark.gpu
def test_cuda_infeasible_and_maximize():
    cost = torch.randn(6, 4, 4, device="cuda")
    index = sk.hungarian_match(cost, maximize=True)
    np.testing.assert_allclose(
        total(cost.cpu(), index.cpu()), scipy_total(cost.double().cpu().numpy(), True), rtol=1e-5
    )
    cost[3, :, 2] = float("inf")
    with pytest.raises(ValueError, match="problem 3"):
        sk.hungarian_match(cost)


@pytest.mark.parametrize("k", [2, 3, 6, 12])
def test_many_small_square_problems(rng_seed, k):
    """Exercises the Jonker-Volgenant start (column reduction, row reduction) on ties and floats."""
    check_optimal(torch.randint(0, 5, (400, k, k)).double())
    check_optimal(torch.rand(400, k, k))
