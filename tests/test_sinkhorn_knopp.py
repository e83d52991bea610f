"""sinkhorn_knopp: reference and Triton kernels against float64 math, distributed equivalence (gloo).

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors
(tests/conftest.py sets it); the gpu-marked tests run them at full size.
"""

import datetime
import importlib
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from ranks import free_port, spawn_ranks
from scipy.special import logsumexp

import stellar_kernels as sk
from stellar_kernels._triton import HAS_TRITON

skm = importlib.import_module("stellar_kernels.sinkhorn_knopp")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sk_float64(scores: np.ndarray, n_iters: int, scale: float, eps: float) -> np.ndarray:
    """The public STELLAR code's form: exp(s - column max), eps added to every sum."""
    q = np.exp(scores - scores.max(axis=0, keepdims=True))
    for _ in range(n_iters):
        q = q / (q.sum(axis=0, keepdims=True) + eps) ** scale
        q = q / (q.sum(axis=1, keepdims=True) + eps)
    return q


def sk_float64_log(scores: np.ndarray, n_iters: int, scale: float = 1.0) -> np.ndarray:
    """SwAV's normalization (no term added to the sums) in float64 log space, so that no
    row underflows whatever its scores. The column max is subtracted first: with scale != 1
    the result depends on it (it is part of the definition, as in sk_float64)."""
    log_q = scores.astype(np.float64) - scores.max(axis=0, keepdims=True)
    for _ in range(n_iters):
        log_q = log_q - scale * logsumexp(log_q, axis=0, keepdims=True)
        log_q = log_q - logsumexp(log_q, axis=1, keepdims=True)
    return np.exp(log_q)


def check_float64(q: torch.Tensor, scores: torch.Tensor, n_iters=3, scale=1.0, atol=1e-7, eps=0.0):
    """q against float64 math: to 1e-12 for float64 scores, else float32 accuracy."""
    want = torch.float64 if scores.dtype == torch.float64 else torch.float32
    assert q.dtype == want and q.shape == scores.shape
    host = scores.double().cpu().numpy()
    if eps == 0:
        expected = sk_float64_log(host, n_iters, scale)
    else:
        expected = sk_float64(host, n_iters, scale, eps)
    if want == torch.float64:
        np.testing.assert_allclose(q.cpu().numpy(), expected, rtol=0, atol=1e-12)
    else:
        np.testing.assert_allclose(q.cpu().numpy(), expected, rtol=1e-4, atol=atol)


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
    check_float64(q, scores, n_iters, scale)


def test_huge_logits_stay_finite(rng_seed):
    scores = torch.randn(50, 80) * 400
    q = sk.sinkhorn_knopp(scores, backend="torch")
    assert torch.isfinite(q).all()
    check_float64(q, scores, atol=1e-6)


BOTH = ["torch", pytest.param("triton", marks=needs_triton)]


def outlier_scores(n: int, p: int, dtype=torch.float32) -> torch.Tensor:
    """Logits / temperature with rows far below every column's best: the rows that a term
    added to the sums (eps) leaves unnormalized, and that underflow in the linear domain."""
    scores = torch.randn(n, p, dtype=torch.float64) * 3
    rows = torch.randperm(n)[:3]
    scores[rows] -= torch.tensor([25.0, 200.0, 1000.0], dtype=torch.float64)[:, None]
    return scores.to(dtype)


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("n,p,n_iters", [(9, 5, 1), (40, 33, 3), (17, 130, 4)])
def test_every_row_sums_to_one_whatever_the_scores(rng_seed, backend, n, p, n_iters):
    scores = outlier_scores(n, p)
    q = sk.sinkhorn_knopp(scores.to(DEVICE), n_iters=n_iters, backend=backend)
    torch.testing.assert_close(q.sum(dim=1).cpu(), torch.ones(n), rtol=0, atol=2e-6)
    check_float64(q, scores, n_iters, atol=1e-6)


@pytest.mark.parametrize("backend", BOTH)
def test_eps_adds_to_every_sum_as_the_public_code(rng_seed, backend):
    scores = outlier_scores(23, 31)
    q = sk.sinkhorn_knopp(scores.to(DEVICE), eps=1e-8, backend=backend)
    check_float64(q, scores, eps=1e-8, atol=1e-6)
    assert q.sum(dim=1).min() < 1e-3  # the outlier rows are left near zero, as there


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("n,p,n_iters,eps", [(13, 21, 3, 0.0), (40, 7, 2, 1e-8), (3, 70, 1, 0.0)])
def test_float64_scores_are_computed_in_float64(rng_seed, backend, n, p, n_iters, eps):
    scores = torch.randn(n, p, dtype=torch.float64) * 5
    q = sk.sinkhorn_knopp(scores.to(DEVICE), n_iters=n_iters, eps=eps, backend=backend)
    check_float64(q, scores, n_iters, eps=eps)


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_iterations_is_the_scaled_softmax_over_every_entry(rng_seed, backend, dtype):
    scores = (torch.randn(11, 6, dtype=torch.float64) * 4).to(dtype)
    q = sk.sinkhorn_knopp(scores.to(DEVICE), n_iters=0, backend=backend)
    e = np.exp(scores.double().numpy())
    want = 11 * e / e.sum()
    assert q.dtype == dtype
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(q.cpu().numpy(), want, rtol=1e-5 if atol > 1e-12 else 0, atol=atol)


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_minus_inf_scores_get_zero_mass(rng_seed, backend, eps):
    probs = torch.softmax(torch.randn(20, 9, dtype=torch.float64) * 2, dim=1)
    probs[probs < 0.05] = 0.0  # exact zeros, as MSN's targets have
    probs[torch.arange(20), probs.argmax(dim=1)] += 1e-3  # keep every row
    probs[0] = 1.0  # and every column alive
    scores = probs.log().float()
    q = sk.sinkhorn_knopp(scores.to(DEVICE), eps=eps, backend=backend).cpu()
    assert torch.equal(q[probs == 0], torch.zeros(int((probs == 0).sum())))
    check_float64(q, scores, eps=eps)


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize(
    "where,message",
    [
        ("nan", "NaN, \\+inf"),
        ("+inf", "NaN, \\+inf"),
        ("row", "a row with no finite score"),
        ("column", "a column with no finite score"),
    ],
)
def test_bad_scores_raise_unless_validate_false(rng_seed, backend, where, message):
    scores = torch.randn(12, 10)
    if where == "nan":
        scores[4, 7] = float("nan")
    elif where == "+inf":
        scores[4, 7] = float("inf")
    elif where == "row":
        scores[5] = float("-inf")
    else:
        scores[:, 3] = float("-inf")
    with pytest.raises(ValueError, match=message):
        sk.sinkhorn_knopp(scores.to(DEVICE), backend=backend)
    sk.sinkhorn_knopp(scores.to(DEVICE), backend=backend, validate=False)  # no check


@pytest.mark.parametrize("backend", BOTH)
def test_no_rows_and_no_columns(backend):
    for shape in ((0, 5), (4, 0)):
        for n_iters in (0, 3):
            q = sk.sinkhorn_knopp(torch.randn(shape).to(DEVICE), n_iters=n_iters, backend=backend)
            assert q.shape == shape and q.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_nan_raises_unless_validate_false(rng_seed, backend):
    scores = torch.randn(30, 41).to(torch.bfloat16).to(DEVICE)
    scores[17, 29] = float("nan")
    with pytest.raises(ValueError, match="scores contains NaN"):
        sk.sinkhorn_knopp(scores, backend=backend)
    sk.sinkhorn_knopp(scores, backend=backend, validate=False)  # no check, no error


def test_input_unchanged(rng_seed):
    scores = torch.randn(10, 12)
    before = scores.clone()
    sk.sinkhorn_knopp(scores, backend="torch")
    assert torch.equal(scores, before)


# ---------------------------------------------------------------------------------------------
# Triton kernels (interpreter on the CPU)
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "n,p,n_iters,scale,dtype",
    [
        (1, 7, 1, 1.0, torch.float32),
        (37, 53, 3, 0.5, torch.bfloat16),
        (64, 128, 5, 1.0, torch.float16),
        (20, 300, 3, 0.5, torch.float32),
        (257, 1000, 3, 1.0, torch.bfloat16),
    ],
)
def test_triton_matches_float64_and_reference(rng_seed, n, p, n_iters, scale, dtype):
    scores = (torch.randn(n, p) * 3).to(dtype).to(DEVICE)
    q = sk.sinkhorn_knopp(scores, n_iters=n_iters, scale=scale, backend="triton")
    check_float64(q, scores, n_iters, scale)
    ref = sk.sinkhorn_knopp(scores, n_iters=n_iters, scale=scale, backend="torch")
    torch.testing.assert_close(q, ref, rtol=1e-4, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("n,p,n_iters,scale", [(37, 53, 1, 1.0), (20, 300, 3, 0.5)])
def test_triton_chunked_rows(rng_seed, monkeypatch, n, p, n_iters, scale):
    """Rows wider than the resident tile: two sweeps per row block, masked column tail."""
    scores = (torch.randn(n, p) * 3).to(DEVICE)
    monkeypatch.setattr(skm, "MAX_RESIDENT_P", 16)
    monkeypatch.setattr(skm, "CHUNKED_BLOCK_P", 32)
    q, flags = skm.sinkhorn_knopp_triton(scores, n_iters, scale, 1e-8, None, True)
    check_float64(q, scores, n_iters, scale, eps=1e-8)
    assert flags.tolist() == [0, 0, 0]


@needs_triton
@pytest.mark.parametrize(
    "n,p,n_iters,dtype", [(9, 45, 2, torch.float32), (5, 70, 3, torch.float64)]
)
def test_triton_chunked_rows_exact(rng_seed, monkeypatch, n, p, n_iters, dtype):
    """The chunked kernel's running row max: outlier rows normalized, float64 kept."""
    scores = outlier_scores(n, p, dtype).to(DEVICE)
    monkeypatch.setattr(skm, "MAX_RESIDENT_P", 16)
    monkeypatch.setattr(skm, "CHUNKED_BLOCK_P", 32)
    q, flags = skm.sinkhorn_knopp_triton(scores, n_iters, 1.0, 0.0, None, True)
    check_float64(q, scores, n_iters, atol=1e-6)
    assert flags.tolist() == [0, 0, 0]


@needs_triton
@pytest.mark.parametrize("n,p,dtype", [(37, 53, torch.float32), (5, 300, torch.bfloat16)])
def test_triton_prefetching_rows(rng_seed, monkeypatch, n, p, dtype):
    """The resident kernel's prefetching form (each program reads its next row block ahead),
    more programs than blocks for some: the same result as float64 math."""
    scores = (torch.randn(n, p) * 3).to(dtype).to(DEVICE)
    monkeypatch.setattr(skm, "resident_candidates", lambda warps: [(1, warps)])
    monkeypatch.setattr(skm, "RESIDENT_TILE", 64)  # several row blocks per program
    q, flags = skm.sinkhorn_knopp_triton(scores, 3, 1.0, 0.0, None, True)
    check_float64(q, scores, 3, 1.0)
    assert flags.tolist() == [0, 0, 0]


@needs_triton
def test_triton_huge_logits_stay_finite(rng_seed):
    scores = (torch.randn(50, 80) * 400).to(DEVICE)
    q = sk.sinkhorn_knopp(scores, backend="triton")
    assert torch.isfinite(q).all()
    check_float64(q, scores, atol=1e-6)


@needs_triton
def test_triton_input_unchanged_and_strided(rng_seed):
    base = (torch.randn(40, 30) * 3).to(torch.bfloat16).to(DEVICE)
    scores = base.t()  # non-contiguous (30, 40)
    before = scores.clone()
    q = sk.sinkhorn_knopp(scores, n_iters=2, scale=0.5, backend="triton")
    assert torch.equal(scores, before)
    check_float64(q, scores, 2, 0.5)


@needs_triton
def test_custom_op_opcheck(rng_seed):
    scores = (torch.randn(9, 20) * 3).to(DEVICE)
    torch.library.opcheck(skm.sinkhorn_knopp_op, (scores, 2, 0.5, 1e-8))


@needs_triton
def test_compiles_without_graph_break(rng_seed):
    scores = (torch.randn(6, 10) * 3).to(DEVICE)

    def fn(x):
        return sk.sinkhorn_knopp(x * 2.0, backend="triton", validate=False).sum(dim=1)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(scores), fn(scores), rtol=1e-5, atol=1e-6)


def _distributed_worker(rank, world, port, rows_per_rank, backend, env, queue):
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A peer left alone in a collective fails after this timeout instead of hanging the test.
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        rows = rows_per_rank[rank]
        try:
            q = sk.sinkhorn_knopp(rows, n_iters=3, backend=backend).numpy()
        except ValueError as err:
            q = str(err)
        q_local = sk.sinkhorn_knopp(rows, n_iters=3, backend=backend, local=True, validate=False)
        # numpy arrays travel by value: a tensor would be shared through a file descriptor
        # that dies with this process if it exits before the parent has read it.
        queue.put((rank, (q, q_local.numpy())))
    finally:
        torch.distributed.destroy_process_group()


def run_two_ranks(rows_per_rank: list[torch.Tensor], backend: str, monkeypatch):
    """Each rank's sinkhorn_knopp result (an array, or the ValueError's message) and local result."""
    env = {}
    if backend == "triton":
        # The workers take CPU tensors: the kernels run in the interpreter, which must be
        # chosen before triton is imported (spawned workers inherit this environment).
        env = {"TRITON_INTERPRET": "1"}
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = spawn_ranks(_distributed_worker, (rows_per_rank, backend, env))
    return {rank: (q, torch.from_numpy(q_local)) for rank, (q, q_local) in results.items()}


BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_equal_one_call_on_stacked_rows(rng_seed, monkeypatch, backend):
    scores = torch.randn(23, 40) * 4
    results = run_two_ranks(list(scores.chunk(2)), backend, monkeypatch)
    stacked = torch.cat([torch.from_numpy(results[0][0]), torch.from_numpy(results[1][0])])
    check_float64(stacked, scores)
    # local=True must not communicate: each rank normalizes its own rows only.
    for rank, rows in enumerate(scores.chunk(2)):
        check_float64(results[rank][1], rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_with_no_rows_joins_the_collectives(rng_seed, monkeypatch, backend):
    scores = torch.randn(11, 19) * 4
    results = run_two_ranks([scores[:0], scores], backend, monkeypatch)
    empty, full = results[0][0], results[1][0]
    assert empty.shape == (0, 19) and empty.dtype == np.float32
    check_float64(torch.from_numpy(full), scores)  # all of the stacked rows live on rank 1
    assert results[0][1].shape == (0, 19)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_on_one_rank_raises_on_every_rank(rng_seed, monkeypatch, backend):
    scores = torch.randn(14, 9) * 4
    scores[10, 3] = float("nan")  # in rank 1's rows only
    results = run_two_ranks(list(scores.chunk(2)), backend, monkeypatch)
    for rank in (0, 1):
        message = results[rank][0]
        assert isinstance(message, str), f"rank {rank} did not raise"
        assert message.startswith("scores contains NaN, +inf") and "rank or another" in message


# ---------------------------------------------------------------------------------------------
# GPU: full sizes, memory, host synchronization
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(
    "n,p,dtype",
    [
        (2048, 16384, torch.float32),
        (2048, 16384, torch.bfloat16),
        (65536, 128, torch.float16),
        (1, 65536, torch.float32),
        (100, 65536, torch.bfloat16),
        (65536, 1, torch.float32),
    ],
)
def test_gpu_full_size_matches_reference(rng_seed, n, p, dtype):
    scores = (torch.randn(n, p, device="cuda") * 8).to(dtype)
    q = sk.sinkhorn_knopp(scores, backend="triton")
    ref = sk.sinkhorn_knopp(scores, backend="torch")
    torch.testing.assert_close(q, ref, rtol=1e-4, atol=1e-7)
    if n * p <= 2048 * 16384:
        check_float64(q, scores)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("n,p", [(2048, 16384), (300, 40000)])
def test_gpu_exact_rows_and_float64(rng_seed, n, p):
    """Full size: outlier rows normalized on the resident and the chunked kernels, and
    float64 scores computed in float64 (against the reference's float64 on the GPU)."""
    scores = outlier_scores(n, p).cuda()
    q = sk.sinkhorn_knopp(scores, backend="triton")
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n, device="cuda"), rtol=0, atol=1e-5)
    torch.testing.assert_close(q, sk.sinkhorn_knopp(scores, backend="torch"), rtol=1e-4, atol=1e-7)
    scores64 = outlier_scores(n // 4, p, torch.float64).cuda()
    q64 = sk.sinkhorn_knopp(scores64, backend="triton")
    assert q64.dtype == torch.float64
    torch.testing.assert_close(
        q64, sk.sinkhorn_knopp(scores64, backend="torch"), rtol=0, atol=1e-12
    )


@pytest.mark.gpu
@needs_triton
def test_gpu_huge_logits_and_scale(rng_seed):
    scores = torch.randn(512, 4096, device="cuda") * 400
    q = sk.sinkhorn_knopp(scores, n_iters=5, scale=0.5, backend="triton")
    assert torch.isfinite(q).all()
    check_float64(q, scores, 5, 0.5, atol=1e-6)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(
    "n,p,validate", [(2048, 16384, True), (2048, 16384, False), (256, 40000, True)]
)
def test_gpu_peak_memory_is_output_plus_vectors(record_property, n, p, validate):
    scores = torch.randn(n, p, device="cuda")
    sk.sinkhorn_knopp(scores, backend="triton", validate=False)  # compile outside the measure
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    q = sk.sinkhorn_knopp(scores, backend="triton", validate=validate)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    output = q.numel() * 4
    vectors = (3 * p + 2 * n) * 4  # m (with 2 flags), b, one column sum; a, rows seen
    record_property("peak_extra_bytes", extra)
    print(
        f"sinkhorn_knopp ({n}, {p}) validate={validate}: peak extra {extra} B = output {output} + {extra - output}"
    )
    # The caching allocator rounds each of the five small vectors up to 512 B (or 2 MiB blocks).
    assert extra <= output + vectors + 5 * 512 + (2 << 20)


@pytest.mark.gpu
@needs_triton
def test_gpu_no_host_sync_with_validate_false():
    scores = torch.randn(256, 1024, device="cuda")
    sk.sinkhorn_knopp(scores, validate=False)  # compile and cache device properties first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q = sk.sinkhorn_knopp(scores, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_float64(q, scores)


@pytest.mark.gpu
@needs_triton
def test_gpu_torch_compile_fullgraph(rng_seed):
    scores = torch.randn(128, 512, device="cuda")

    def fn(x):
        return sk.sinkhorn_knopp(x / 0.06, validate=False).argmax(dim=1)

    compiled = torch.compile(fn, fullgraph=True)
    assert torch.equal(compiled(scores), fn(scores))


def _nccl_worker(port, scores, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    try:
        x = scores.cuda()
        group = torch.distributed.group.WORLD
        q, _ = skm.sinkhorn_knopp_triton(x, 3, 0.5, 0.0, group)  # the all-reduce path, on NCCL
        queue.put((q.cpu().numpy(), sk.sinkhorn_knopp(x, scale=0.5, local=True).cpu().numpy()))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.gpu
@needs_triton
def test_gpu_nccl_all_reduce_path(rng_seed):
    """One GPU: a world of one rank still runs every NCCL all-reduce of the Triton path."""
    scores = torch.randn(300, 2000) * 4
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_nccl_worker, args=(free_port(), scores, queue))
    proc.start()
    q, q_local = (torch.from_numpy(x) for x in queue.get(timeout=180))
    proc.join(timeout=60)
    assert proc.exitcode == 0
    torch.testing.assert_close(q, q_local, rtol=1e-5, atol=1e-8)
    check_float64(q, scores, 3, 0.5)
