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
    """scipy's optimal total per problem, summed in float64 (integers would overflow)."""
    totals = []
    for c in cost:
        r, col = linear_sum_assignment(c, maximize=maximize)
        totals.append(c[r, col].astype(np.float64).sum())
    return np.array(totals)


def total(cost: torch.Tensor, index: torch.Tensor) -> np.ndarray:
    """The assigned entries' sum per problem, in float64; rows at -1 add nothing."""
    cost, index = cost.double().cpu(), index.cpu()
    picked = cost.gather(2, index.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(index >= 0, picked, 0.0).sum(1).numpy()


def check_one_to_one(index: torch.Tensor, q: int, t: int) -> None:
    """min(Q, T) rows assigned per problem, to distinct columns in range; the rest -1."""
    for row in index.cpu():
        cols = row[row >= 0].tolist()
        assert (row >= -1).all() and all(c < t for c in cols)
        assert len(cols) == min(q, t) and len(set(cols)) == len(cols)


def check_optimal(cost: torch.Tensor, maximize: bool = False, solve=sk.hungarian_match):
    index = solve(cost, maximize=maximize)
    assert index.shape == cost.shape[:2] and index.dtype == torch.int64
    check_one_to_one(index, *cost.shape[1:])
    # Integer and bool costs go to scipy as they are: it converts them itself.
    host = cost.cpu() if not cost.is_floating_point() else cost.double().cpu()
    np.testing.assert_allclose(
        total(cost, index), scipy_total(host.numpy(), maximize), rtol=1e-9, atol=1e-6
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
    """One problem of a random shape (either orientation) and kind: floats, integer ties, wide
    ranges, forbidden pairs."""
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
    if int(torch.randint(0, 3, (1,), generator=gen)) == 0:
        cost = cost.t()  # more rows than columns
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
        check_one_to_one(index[None], *cost.shape)
        ours = total(cost[None], index[None])[0]
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


# --- more rows than columns, integer and bool costs, edge shapes --------------------------

BACKENDS = ("cpp", "scipy")


@pytest.mark.parametrize(
    "b,q,t,dtype",
    [
        (1, 2, 1, torch.float64),
        (9, 7, 5, torch.float64),
        (5, 17, 16, torch.float32),
        (3, 33, 13, torch.float32),
        (4, 45, 3, torch.float64),
        (2, 70, 41, torch.float32),
    ],
)
def test_more_rows_than_columns(rng_seed, solve, b, q, t, dtype):
    """Q > T: T rows get distinct columns, Q - T rows get -1, and the total is scipy's."""
    check_optimal(torch.rand(b, q, t, dtype=dtype), solve=solve)
    check_optimal(torch.randn(b, q, t, dtype=dtype), maximize=True, solve=solve)
    check_optimal(torch.randint(0, 3, (b, q, t)).to(dtype), solve=solve)  # ties


def test_more_rows_equals_the_transposed_problem(rng_seed, solve):
    """Q > T with ties: the pairs are those of the T x Q problem, read from the column side."""
    cost = torch.randint(0, 4, (40, 11, 6)).double()
    index = solve(cost)
    col_rows = solve(cost.transpose(1, 2).contiguous())
    for row_side, col_side in zip(index, col_rows):
        pairs = {(r, c) for r, c in enumerate(row_side.tolist()) if c >= 0}
        assert pairs == {(r, c) for c, r in enumerate(col_side.tolist())}


def test_more_rows_forbidden_everywhere(rng_seed, solve):
    """Q > T: a row forbidden in every column is allowed; it gets -1."""
    cost = torch.rand(6, 9, 4).double()
    blocked = torch.rand(6, 9) < 0.35
    blocked[:, :4] = False  # four rows stay open for the four columns
    cost[blocked] = float("inf")
    index = check_optimal(cost, solve=solve)
    assert (index[blocked] == -1).all()
    index = check_optimal(cost.masked_fill(cost == float("inf"), -float("inf")), True, solve)
    assert (index[blocked] == -1).all()
    # +inf is forbidden when maximizing too (scipy would call it invalid there)
    index = solve(cost, maximize=True)
    assert (index[blocked] == -1).all()
    check_one_to_one(index, 9, 4)


def test_more_rows_infeasible_raises(rng_seed, solve):
    cost = torch.rand(4, 7, 3)
    cost[2, :, 1] = float("inf")  # no row may take column 1 in problem 2
    with pytest.raises(ValueError, match=r"cost \(shape \(4, 7, 3\)\).*every column a row"):
        solve(cost)
    cost = torch.rand(3, 7, 3)
    cost[1, :, :2] = float("inf")  # only row 5 may take column 0 or 1
    cost[1, 5, :2] = 0.5
    with pytest.raises(ValueError, match="every column a row.*problem 1"):
        solve(cost)
    square = torch.rand(2, 3, 3)
    square[1, 2] = float("inf")  # Q <= T: a row forbidden everywhere has no column
    with pytest.raises(ValueError, match="every row a column.*problem 1"):
        solve(square)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 4, 4), (3, 6, 4)])
def test_validate_false_never_raises(rng_seed, backend, shape):
    """Infeasible or NaN problems: every row -1, the others solved, on every backend."""
    cost = torch.rand(shape)
    cost[1, :, 0] = float("inf")  # column 0 allowed nowhere: infeasible either way
    cost[2, 0, 0] = float("nan")
    index = sk.hungarian_match(cost, validate=False, backend=backend)
    assert (index[1:] == -1).all()
    check_one_to_one(index[:1], *shape[1:])
    for bad in (1, 2):
        with pytest.raises(ValueError, match="NaN" if bad == 2 else "no finite assignment"):
            sk.hungarian_match(cost[bad : bad + 1], backend=backend)
    minus_inf = torch.rand(shape[1:])
    minus_inf[0, 0] = -float("inf")  # unbounded when minimizing
    assert (sk.hungarian_match(minus_inf, validate=False, backend=backend) == -1).all()
    with pytest.raises(ValueError, match="infinity that makes the optimum unbounded"):
        sk.hungarian_match(minus_inf, backend=backend)


INTEGER_RANGES = {
    torch.int8: (-128, 128),
    torch.int16: (-(2**15), 2**15),
    torch.int32: (-(2**31), 2**31),
    torch.int64: (-(2**62), 2**62),
    torch.uint8: (0, 256),
    torch.bool: (0, 2),
}


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", list(INTEGER_RANGES), ids=str)
def test_integer_and_bool_costs(rng_seed, solve, dtype, maximize):
    """Solved as scipy solves them (in float64), in both orientations."""
    low, high = INTEGER_RANGES[dtype]
    for shape in [(20, 5, 5), (6, 7, 12), (6, 12, 7)]:
        cost = torch.randint(low, high, shape, dtype=torch.int64).to(dtype)
        check_optimal(cost, maximize=maximize, solve=solve)
    ties = torch.randint(0, 3, (30, 6, 6)).to(dtype)
    check_optimal(ties, maximize=maximize, solve=solve)
    if high - low > 2**31:
        # Steps below float32's resolution at 2^30: exact only in float64, as scipy solves.
        offsets = torch.randint(0, 64, (30, 6, 6))
        index = solve((2**30 + offsets).to(dtype), maximize=maximize)
        check_one_to_one(index, 6, 6)
        np.testing.assert_array_equal(total(offsets, index), scipy_total(offsets.numpy(), maximize))


def test_int64_near_2_53_rounds_as_scipy(rng_seed, solve):
    """Beyond 2^53 int64 costs are taken as their float64 roundings, as scipy takes them."""
    big = 2**53
    # Exactly, the diagonal (3 - 1 = 2) beats the other pair (2 + 1 = 3); in float64,
    # 2^53 + 3 is 2^53 + 4 and 2^53 + 1 is 2^53, so the other pair (2 + 0) wins.
    cost = torch.tensor([[big + 3, big + 2], [big + 1, big - 1]])
    rows, cols = linear_sum_assignment(cost.numpy())
    assert cols.tolist() == [1, 0]  # the premise: scipy follows the rounding
    assert solve(cost).tolist() == cols.tolist()
    assert solve(cost[None]).tolist() == [cols.tolist()]
    # Random costs at several magnitudes beyond 2^53: the same answer as for numpy's float64
    # rounding of them, the conversion scipy applies. (The solvers' float64 arithmetic is not
    # exact at this scale, scipy's no more than ours, so the totals are not compared.)
    for scale, shape in [(big, (30, 6, 6)), (2**60, (10, 5, 8)), (2**62, (10, 8, 5))]:
        cost = scale + torch.randint(-(2**12), 2**12, shape)
        rounded = torch.from_numpy(cost.numpy().astype(np.float64))
        assert not torch.equal(rounded.long(), cost)  # the premise: rounding happens
        assert torch.equal(solve(cost), solve(rounded))
        assert torch.equal(solve(cost, maximize=True), solve(rounded, maximize=True))


def test_two_dimensional_more_rows(rng_seed, solve):
    cost = torch.rand(9, 4)
    index = solve(cost)
    assert index.shape == (9,)
    assert torch.equal(index, solve(cost[None])[0])
    check_optimal(cost[None], solve=solve)


def test_warp_decomposition_equals_serial_with_more_rows(rng_seed):
    """Through the public Q > T handling, both teams still give identical assignments."""
    for cost in (torch.rand(20, 13, 7), torch.randint(0, 3, (40, 9, 5)).double()):
        for maximize in (False, True):
            assert torch.equal(
                hungarian_emulated_warp(cost, maximize), sk.hungarian_match(cost, maximize)
            )


def test_scipy_backend_more_rows(rng_seed):
    cost = torch.rand(6, 10, 7).double()
    cost[:, 8] = float("inf")  # one row forbidden everywhere
    index = sk.hungarian_match(cost, backend="scipy")
    check_one_to_one(index, 10, 7)
    assert (index[:, 8] == -1).all()
    np.testing.assert_allclose(total(cost, index), total(cost, sk.hungarian_match(cost)))
    np.testing.assert_allclose(total(cost, index), scipy_total(cost.numpy(), False))
    cost[3, :, 2] = float("inf")
    with pytest.raises(ValueError, match="every column a row.*problem 3"):
        sk.hungarian_match(cost, backend="scipy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape", [(0, 3, 4), (0, 4, 3), (2, 0, 3), (2, 3, 0), (2, 0, 0), (0, 0), (3, 0), (0, 3)]
)
def test_empty_shapes(backend, shape):
    """No column: every row -1 (giving every column a row is vacuous); nothing else to do."""
    for maximize in (False, True):
        index = sk.hungarian_match(torch.rand(shape), maximize, backend=backend)
        assert index.shape == shape[:-1] and index.dtype == torch.int64
        assert (index == -1).all()
        if backend == "cpp":
            assert torch.equal(hungarian_emulated_warp(torch.rand(shape), maximize), index)


def test_more_rows_traces_without_host_round_trip(rng_seed):
    """fullgraph tracing fails on any host read, so the Q > T path has none."""
    cost = torch.randint(0, 5, (3, 7, 4))
    torch._dynamo.reset()
    got = torch.compile(sk.hungarian_match, fullgraph=True, backend="eager")(cost)
    assert torch.equal(got, sk.hungarian_match(cost))


def test_bad_arguments_name_them():
    with pytest.raises(ValueError, match="cost must have a real or bool dtype.*complex64"):
        sk.hungarian_match(torch.ones(2, 3, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="cost must be 2-D or 3-D"):
        sk.hungarian_match(torch.ones(2, 2, 3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="cost must be a torch.Tensor"):
        sk.hungarian_match(np.ones((3, 3)))
    with pytest.raises(TypeError, match="maximize must be a bool"):
        sk.hungarian_match(torch.rand(5, 3), maximize=1)


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


@pytest.mark.gpu
def test_cuda_more_rows_integers_and_edges(rng_seed):
    check_cuda(torch.rand(8, 9, 5, device="cuda"))
    check_cuda(torch.rand(4, 70, 41, device="cuda").double())
    check_cuda(torch.randint(0, 3, (64, 13, 7), device="cuda").double())
    check_cuda(torch.randn(6, 20, 11, device="cuda"), maximize=True)
    for dtype in (torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool):
        check_cuda(torch.randint(0, 2, (16, 6, 9), device="cuda").to(dtype))
        check_cuda(torch.randint(0, 2, (16, 9, 6), device="cuda").to(dtype), maximize=True)
    cost = torch.rand(5, 7, 3, device="cuda")
    cost[:, 4] = float("inf")  # a row forbidden everywhere gets -1
    assert (check_cuda(cost)[:, 4] == -1).all().item()
    cost[2, :, 1] = float("inf")
    with pytest.raises(ValueError, match="every column a row.*problem 2"):
        sk.hungarian_match(cost)
    index = sk.hungarian_match(cost, validate=False)
    assert (index[2] == -1).all().item()
    assert torch.equal(index.cpu(), sk.hungarian_match(cost.cpu(), validate=False))
    for shape in [(0, 4, 3), (2, 3, 0), (2, 0, 3)]:
        index = sk.hungarian_match(torch.rand(shape, device="cuda"))
        assert index.is_cuda and index.shape == shape[:2] and (index == -1).all().item()


@pytest.mark.gpu
def test_cuda_more_rows_without_host_sync(rng_seed):
    """Q > T and integer costs stay on the GPU: no synchronization with validate=False."""
    cost = torch.randint(0, 5, (256, 12, 7), device="cuda")
    want = sk.hungarian_match(cost, validate=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sk.hungarian_match(cost, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
