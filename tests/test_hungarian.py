"""hungarian_match against scipy.optimize.linear_sum_assignment.

Every CPU case runs twice: through the C++ solver (one thread per problem) and
through the CUDA kernel's 32-lane decomposition of the same solver emulated on
the CPU (hungarian_emulated_warp), so the warp logic is checked here too; a
32-thread run of the warp under ThreadSanitizer checks its synchronization. The
gpu-marked tests run the CUDA kernel itself.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import stellar_kernels as sk
from stellar_kernels._extension import cuda_extension_built, load_extension
from stellar_kernels.hungarian import _prepare, hungarian_emulated_warp

SOLVERS = {"cpp": sk.hungarian_match, "warp_emulated": hungarian_emulated_warp}


@pytest.fixture(params=sorted(SOLVERS))
def solve(request):
    return SOLVERS[request.param]


def scipy_total(cost: np.ndarray, maximize: bool) -> np.ndarray:
    totals = []
    for c in cost:
        r, col = linear_sum_assignment(c, maximize=maximize)
        totals.append(c[r, col].sum())
    return np.array(totals)


def total(cost: torch.Tensor, index: torch.Tensor) -> np.ndarray:
    return cost.double().cpu().gather(2, index.cpu().unsqueeze(-1)).sum((1, 2)).numpy()


def check_optimal(cost: torch.Tensor, maximize: bool = False, solve=sk.hungarian_match):
    index = solve(cost, maximize=maximize)
    assert index.shape == cost.shape[:2] and index.dtype == torch.int64
    for row in index.cpu():
        assert len(set(row.tolist())) == cost.shape[1]  # one-to-one
    np.testing.assert_allclose(
        total(cost, index), scipy_total(cost.double().cpu().numpy(), maximize), rtol=1e-9, atol=1e-6
    )
    return index


def machol_wien(n: int) -> torch.Tensor:
    """c_ij = i * j: a classic hard case for shortest-augmenting-path solvers."""
    i = torch.arange(n, dtype=torch.float64)
    return (i[:, None] * i[None, :])[None]


@pytest.mark.parametrize(
    "b,q,t,dtype",
    [
        (1, 1, 1, torch.float64),
        (64, 16, 16, torch.float32),
        (7, 5, 9, torch.float64),
        (3, 13, 32, torch.float32),
        (4, 40, 70, torch.float32),
        (3, 33, 33, torch.float64),
    ],
)
def test_random_floats(rng_seed, solve, b, q, t, dtype):
    check_optimal(torch.rand(b, q, t, dtype=dtype), solve=solve)


def test_integer_costs_with_ties(rng_seed, solve):
    check_optimal(torch.randint(0, 4, (50, 8, 8)).double(), solve=solve)
    check_optimal(torch.randint(0, 3, (6, 37, 45)).float(), solve=solve)
    check_optimal(torch.zeros(3, 6, 6), solve=solve)


def test_negative_and_large_costs(rng_seed, solve):
    check_optimal((torch.rand(20, 9, 11).double() - 0.5) * 1e6, solve=solve)
    check_optimal(-torch.rand(5, 12, 12).double() * 1e12, solve=solve)


def test_rectangular(rng_seed, solve):
    check_optimal(torch.rand(10, 3, 50, dtype=torch.float64), solve=solve)
    check_optimal(torch.randn(4, 31, 64), solve=solve)


def test_maximize(rng_seed, solve):
    check_optimal(torch.randn(20, 7, 10), maximize=True, solve=solve)
    check_optimal(torch.randn(10, 16, 16).double(), maximize=True, solve=solve)


def test_forbidden_pairs(rng_seed, solve):
    cost = torch.rand(30, 6, 8).double()
    forbid = torch.rand(30, 6, 8) < 0.3
    forbid[:, :, :6] &= ~torch.eye(6, dtype=torch.bool)  # keep a feasible diagonal
    cost[forbid] = float("inf")
    index = solve(cost)
    assert not torch.isinf(cost.gather(2, index.unsqueeze(-1))).any()
    finite = cost.clone()
    # scipy's optimum with a huge finite cost equals the forbidden-pair optimum
    finite[forbid] = 1e9
    np.testing.assert_allclose(total(cost, index), scipy_total(finite.numpy(), False), rtol=1e-9)


def test_forbidden_pairs_square(rng_seed, solve):
    """Square problems with +inf skip the Jonker-Volgenant start; scipy handles inf itself."""
    cost = torch.rand(20, 12, 12).double()
    forbid = torch.rand(20, 12, 12) < 0.4
    forbid &= ~torch.eye(12, dtype=torch.bool)
    cost[forbid] = float("inf")
    check_optimal(cost, solve=solve)


def test_forbidden_pairs_maximize(rng_seed, solve):
    cost = torch.randn(10, 5, 5).double()
    cost[:, 0, 1:] = float("-inf")  # row 0 may only take column 0
    index = check_optimal(cost, maximize=True, solve=solve)
    assert (index[:, 0] == 0).all()


def test_infeasible_raises(rng_seed, solve):
    cost = torch.rand(4, 3, 3)
    cost[2, :, 1] = float("inf")  # nobody may take column 1 in problem 2
    with pytest.raises(ValueError, match="no finite assignment.*problem 2"):
        solve(cost)
    cost = torch.rand(3, 2, 40)
    cost[1, :, :39] = float("inf")  # two rows, one allowed column
    with pytest.raises(ValueError, match="problem 1"):
        solve(cost)


def test_nan_raises(solve):
    cost = torch.rand(2, 3, 3)
    cost[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solve(cost)


def test_one_by_one(solve):
    assert solve(torch.tensor([[[3.5]]])).tolist() == [[0]]
    assert solve(torch.tensor([[[2.0, -1.0, 5.0]]]), maximize=True).tolist() == [[2]]


def test_large_problems(rng_seed, solve):
    check_optimal(torch.rand(2, 100, 100, dtype=torch.float64), solve=solve)
    check_optimal(torch.rand(1, 300, 300, dtype=torch.float64), solve=solve)
    check_optimal(machol_wien(100), solve=solve)


@pytest.mark.parametrize("k", [2, 3, 6, 12])
def test_many_small_square_problems(rng_seed, solve, k):
    """Exercises the Jonker-Volgenant start (column reduction, row reduction) on ties and floats."""
    check_optimal(torch.randint(0, 5, (400, k, k)).double(), solve=solve)
    check_optimal(torch.rand(400, k, k), solve=solve)


def random_problem(gen: torch.Generator) -> tuple[torch.Tensor, bool]:
    """One problem of a random shape and kind: floats, integer ties, wide ranges, forbidden pairs."""
    q = int(torch.randint(1, 48, (1,), generator=gen))
    t = q + int(torch.randint(0, 3, (1,), generator=gen)) * int(
        torch.randint(0, 20, (1,), generator=gen)
    )
    kind = int(torch.randint(0, 4, (1,), generator=gen))
    if kind == 0:
        cost = torch.rand(q, t, generator=gen, dtype=torch.float64)
    elif kind == 1:
        cost = torch.randint(-2, 3, (q, t), generator=gen).double()
    elif kind == 2:
        cost = torch.randn(q, t, generator=gen, dtype=torch.float64) * 10.0 ** float(
            torch.randint(-3, 9, (1,), generator=gen)
        )
    else:
        cost = torch.rand(q, t, generator=gen, dtype=torch.float64)
        density = float(torch.rand(1, generator=gen)) * 0.9
        cost[torch.rand(q, t, generator=gen) < density] = float("inf")
    maximize = bool(torch.randint(0, 2, (1,), generator=gen))
    if maximize:
        cost = cost.masked_fill(cost == float("inf"), float("-inf"))
    return cost, maximize


def test_fuzz_against_scipy(rng_seed, solve):
    """Random shapes and kinds, some infeasible: same optimum (or same infeasibility) as scipy."""
    gen = torch.Generator().manual_seed(rng_seed)
    for _ in range(400):
        cost, maximize = random_problem(gen)
        try:
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=maximize)
        except ValueError:
            with pytest.raises(ValueError, match="no finite assignment"):
                solve(cost, maximize=maximize)
            continue
        index = solve(cost, maximize=maximize)
        assert sorted(set(index.tolist())) == sorted(index.tolist())
        ours = cost.gather(1, index[:, None]).sum().item()
        np.testing.assert_allclose(ours, cost.numpy()[rows, cols].sum(), rtol=1e-9, atol=1e-9)


def test_warp_decomposition_equals_serial(rng_seed):
    """Both teams break every tie the same way, so their assignments are identical."""
    cases = [
        torch.rand(50, 16, 16),
        torch.rand(8, 20, 70).double(),
        torch.randint(0, 3, (100, 9, 9)).float(),
        torch.randint(0, 6, (4, 64, 64)).double(),
        torch.randn(6, 45, 45),
        machol_wien(40),
    ]
    forbidden = torch.rand(30, 10, 10).double()
    forbidden[torch.rand(30, 10, 10) < 0.3] = float("inf")
    forbidden[:, torch.arange(10), torch.arange(10)] = 0.5
    cases.append(forbidden)
    load_extension()
    for cost in cases:
        for maximize in (False, True):
            prepared = _prepare(cost, maximize)
            serial, s_status = torch.ops.stellar_ext.hungarian(prepared, maximize)
            warp, w_status = torch.ops.stellar_ext.hungarian_emulated_warp(prepared, maximize)
            assert torch.equal(s_status, w_status)
            assert torch.equal(serial, warp), f"shape {tuple(cost.shape)}, maximize={maximize}"


def test_warp_synchronization_under_thread_sanitizer(rng_seed, tmp_path):
    """32 threads run the solver as the 32 lanes of a warp, with a barrier where the kernel
    calls __syncwarp(): ThreadSanitizer finds no race and the result equals the serial one."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = Path(__file__).resolve().parents[1] / "csrc" / "testing" / "hungarian_warp_threads.cc"
    binary = tmp_path / "hungarian_warp_threads"
    flags = ["-O1", "-g", "-std=c++17", "-pthread", "-fsanitize=thread"]
    build = subprocess.run(
        [compiler, *flags, str(source), "-o", str(binary)], capture_output=True, text=True
    )
    if build.returncode != 0 and "sanitize" in build.stderr:
        pytest.skip(f"ThreadSanitizer unavailable: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    try:
        result = subprocess.run(
            [str(binary), str(rng_seed)], capture_output=True, text=True, timeout=120, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail("lanes deadlocked: a decision was not uniform across the warp")
    if "FATAL: ThreadSanitizer" in result.stderr:
        pytest.skip(f"ThreadSanitizer cannot run here: {result.stderr[-300:]}")
    assert "WARNING: ThreadSanitizer" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "DIFFERENT" not in result.stdout


def test_two_dimensional_and_non_contiguous(rng_seed, solve):
    base = torch.rand(9, 5)
    index = solve(base.t())  # (5, 9) transposed view
    expected = solve(base.t().contiguous()[None])[0]
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


def test_validate_false_leaves_minus_one():
    cost = torch.rand(3, 4, 4)
    cost[1, :, 0] = float("inf")
    index = sk.hungarian_match(cost, validate=False)
    assert (index[1] == -1).all() and (index[[0, 2]] >= 0).all()


def test_cuda_kernels_built_wherever_they_can_be():
    """An install-time build compiles the CUDA sources wherever CUDA torch meets a toolkit; a
    build on first use wherever a GPU is visible too (elsewhere nothing could run them)."""
    from stellar_kernels._build import find_cuda_home
    from stellar_kernels._extension import installed_library

    library = load_extension()
    toolkit = find_cuda_home()[0] is not None and torch.version.cuda is not None
    at_install = library == installed_library()
    if not toolkit or not (at_install or torch.cuda.is_available()):
        pytest.skip(f"no toolkit, or {library.name} was built on first use without a GPU")
    if os.environ.get("STELLAR_NO_CUDA") == "1":
        pytest.skip("STELLAR_NO_CUDA=1")
    assert cuda_extension_built(), f"{library} lacks the CUDA kernels"
    assert hasattr(torch.ops.stellar_ext, "hungarian_cuda_scratch")


# --- the CUDA kernel itself -------------------------------------------------------------


def check_cuda(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """The CUDA result is optimal (scipy) and equal to the CPU solver's assignment."""
    index = check_optimal(cost, maximize)
    assert index.device == cost.device
    on_cpu = sk.hungarian_match(cost.cpu(), maximize=maximize)
    assert torch.equal(index.cpu(), on_cpu), "CUDA and CPU solvers broke a tie differently"
    return index


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b,q,t,dtype",
    [
        (1, 1, 1, torch.float32),
        (512, 16, 16, torch.float32),
        (512, 16, 16, torch.float64),
        (8, 5, 9, torch.float64),
        (3, 13, 32, torch.float32),
        (4, 40, 70, torch.float64),
        (4, 196, 196, torch.float32),
        (2, 196, 196, torch.float64),
        (1, 300, 300, torch.float32),
        (1, 1024, 1024, torch.float32),
    ],
)
def test_cuda_matches_scipy(rng_seed, b, q, t, dtype):
    check_cuda(torch.rand(b, q, t, device="cuda", dtype=dtype))


@pytest.mark.gpu
def test_cuda_ties_negative_large_rectangular_maximize(rng_seed):
    check_cuda(torch.randint(0, 4, (200, 8, 8), device="cuda").double())
    check_cuda(torch.randint(0, 3, (6, 37, 45), device="cuda").float())
    check_cuda((torch.rand(20, 9, 11, device="cuda").double() - 0.5) * 1e6)
    check_cuda(torch.rand(10, 3, 50, device="cuda"))
    check_cuda(torch.randn(20, 7, 10, device="cuda"), maximize=True)
    check_cuda(torch.randn(64, 16, 16, device="cuda").double(), maximize=True)
    check_cuda(machol_wien(300).cuda())


@pytest.mark.gpu
def test_cuda_forbidden_infeasible_nan(rng_seed):
    cost = torch.rand(20, 12, 12, device="cuda").double()
    forbid = torch.rand(20, 12, 12, device="cuda") < 0.4
    forbid &= ~torch.eye(12, dtype=torch.bool, device="cuda")
    cost[forbid] = float("inf")
    check_cuda(cost)
    cost = torch.randn(10, 5, 5, device="cuda")
    cost[:, 0, 1:] = float("-inf")
    assert (check_cuda(cost, maximize=True)[:, 0] == 0).all()
    cost = torch.rand(6, 4, 4, device="cuda")
    cost[3, :, 2] = float("inf")
    with pytest.raises(ValueError, match="no finite assignment.*problem 3"):
        sk.hungarian_match(cost)
    index = sk.hungarian_match(cost, validate=False)
    assert (index[3] == -1).all().item() and (index[[0, 1, 2, 4, 5]] >= 0).all().item()
    cost[3, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sk.hungarian_match(cost)


@pytest.mark.gpu
@pytest.mark.parametrize("scratch", [1, 2, 3])
@pytest.mark.parametrize("maximize", [False, True])
def test_cuda_every_scratch_placement(rng_seed, scratch, maximize):
    """Shared memory, cost in global memory, everything in global memory: same answers."""
    load_extension()
    for cost in (
        torch.rand(40, 16, 16, device="cuda"),
        torch.rand(5, 20, 70, device="cuda").double(),
        torch.rand(3, 50, 50, device="cuda").transpose(1, 2),  # strided
    ):
        prepared = _prepare(cost, maximize)
        index, status = torch.ops.stellar_ext.hungarian_cuda_scratch(prepared, maximize, scratch)
        assert (status == 0).all().item()
        expected, _ = torch.ops.stellar_ext.hungarian(prepared.cpu(), maximize)
        assert torch.equal(index.cpu(), expected)


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream(rng_seed):
    cost = torch.rand(256, 16, 16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        index = sk.hungarian_match(cost, validate=False)
    stream.synchronize()
    assert torch.equal(index.cpu(), sk.hungarian_match(cost.cpu()))


@pytest.mark.gpu
def test_cuda_non_contiguous_and_half(rng_seed):
    base = torch.rand(4, 9, 5, device="cuda")
    check_cuda(base.transpose(1, 2))
    cost = torch.rand(4, 6, 6, device="cuda").half()
    index = sk.hungarian_match(cost)
    np.testing.assert_allclose(
        total(cost.float(), index), scipy_total(cost.double().cpu().numpy(), False), rtol=1e-6
    )
