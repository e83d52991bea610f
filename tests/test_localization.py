"""localization / factorize: the reference against float64 math and gradcheck, the Triton
kernels (interpreter on CPU) against the reference, the custom ops, torch.compile, and a
compile of every kernel configuration for sm_80 and sm_90."""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import stellar_kernels as sk
from stellar_kernels._triton import HAS_TRITON

loc = importlib.import_module("stellar_kernels.localization")

HAS_CUDA = torch.cuda.is_available()
CAN_RUN_TRITON = HAS_TRITON and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(
    not CAN_RUN_TRITON, reason="needs triton and a GPU or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if HAS_CUDA else "cpu"


def factorize_float64(dense, sparse, values, temperature):
    d = dense.double().numpy()
    s = sparse.double().numpy()
    v = values.double().numpy()
    dn = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-7)
    sn = s / np.maximum(np.linalg.norm(s, axis=-1, keepdims=True), 1e-7)
    logits = np.einsum("bnd,bkd->bnk", dn, sn) / temperature
    logits -= logits.max(-1, keepdims=True)
    spatial = np.exp(logits)
    spatial /= spatial.sum(-1, keepdims=True)
    return spatial, np.einsum("bnk,bkc->bnc", spatial, v)


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize(
    "b,n,k,d,dd,temperature",
    [
        (2, 9, 3, 12, 7, 0.06),
        (1, 16, 16, 32, 32, 0.5),
        (3, 5, 4, 8, 20, 1.0),
        (2, 49, 8, 24, 24, 0.06),
    ],
)
def test_factorize_matches_float64(rng_seed, b, n, k, d, dd, temperature):
    dense, sparse, values = torch.randn(b, n, d), torch.randn(b, k, d), torch.randn(b, k, dd)
    spatial, lowrank = sk.factorize(dense, sparse, values, temperature, backend="torch")
    exp_spatial, exp_lowrank = factorize_float64(dense, sparse, values, temperature)
    np.testing.assert_allclose(spatial.numpy(), exp_spatial, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(lowrank.numpy(), exp_lowrank, rtol=1e-4, atol=1e-5)
    loc_ = sk.localization(dense, sparse, temperature, backend="torch")
    np.testing.assert_allclose(loc_.numpy(), exp_spatial, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_in_input_dtype(rng_seed, dtype):
    dense, sparse, values = (torch.randn(2, 7, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 5))
    spatial, lowrank = sk.factorize(
        dense.to(dtype), sparse.to(dtype), values.to(dtype), 0.5, backend="torch"
    )
    assert spatial.dtype == dtype and lowrank.dtype == dtype
    exp_spatial, exp_lowrank = factorize_float64(
        dense.to(dtype), sparse.to(dtype), values.to(dtype), 0.5
    )
    np.testing.assert_allclose(spatial.float().numpy(), exp_spatial, rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(lowrank.float().numpy(), exp_lowrank, rtol=2e-2, atol=2e-2)


def test_gradcheck(rng_seed):
    dense = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    sparse = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: sk.factorize(a, b, c, 0.5, backend="torch"), (dense, sparse, values)
    )


def test_zero_patch_gives_uniform_row(rng_seed):
    dense = torch.randn(1, 4, 8)
    dense[0, 2] = 0
    spatial = sk.localization(dense, torch.randn(1, 5, 8), 0.06, backend="torch")
    assert torch.isfinite(spatial).all()
    np.testing.assert_allclose(spatial[0, 2].numpy(), np.full(5, 0.2), rtol=1e-6)


def test_non_contiguous(rng_seed):
    dense = torch.randn(2, 8, 6).transpose(1, 2)  # (2, 6, 8)
    sparse = torch.randn(2, 8, 3).transpose(1, 2)  # (2, 3, 8)
    values = torch.randn(2, 5, 3).transpose(1, 2)  # (2, 3, 5)
    got = sk.factorize(dense, sparse, values, 0.1, backend="torch")
    want = sk.factorize(
        dense.contiguous(), sparse.contiguous(), values.contiguous(), 0.1, backend="torch"
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ----------------------------------------------------------------------------- Triton kernels

# Per-entry tolerances of the Triton path against the float64 reference on the same (already
# rounded) inputs: |got - want| <= rtol * (|want| + rms(want)), entry by entry. The rms
# term is a floor for entries that cancel to near zero (a gradient is a sum of terms of
# either sign), not a fraction of the largest entry. Half types: outputs are rounded to
# the dtype once (bfloat16 keeps 8 significant bits, float16 11); gradients also see the
# dtype's rounding of the incoming gradient and of the half-precision tensor-core operands.
OUT_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [
    (2, 9, 3, 12, 7),
    (1, 16, 16, 32, 32),
    (3, 5, 4, 8, 20),
    (2, 49, 8, 24, 24),
    (1, 64, 16, 64, 48),
]
TEMPERATURES = [0.06, 0.5, 1.0]
# Every shape with every dtype, the temperature cycling so that each meets every dtype.
CASES = [
    pytest.param(shape, TEMPERATURES[(i + j) % 3], dtype, id=f"{shape}-{dtype}")
    for i, shape in enumerate(SHAPES)
    for j, dtype in enumerate(DTYPES)
]


def assert_close_entrywise(got, want, rtol, what):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    floor = want.square().mean().sqrt().item()
    ratio = (got - want).abs() / (want.abs() + floor).clamp_min(1e-300)
    worst = ratio.argmax()
    err = ratio.flatten()[worst].item()
    assert err <= rtol, (
        f"{what}: entry {np.unravel_index(worst.item(), want.shape)} is "
        f"{got.flatten()[worst].item():.6g}, expected {want.flatten()[worst].item():.6g} "
        f"(error {err:.2e} of |expected| + rms {floor:.3g}; rtol {rtol:g})"
    )


def make_inputs(shape, dtype, device=DEVICE):
    b, n, k, d, dd = shape
    return [
        torch.randn(*s, device=device).to(dtype).requires_grad_()
        for s in ((b, n, d), (b, k, d), (b, k, dd))
    ]


def grads(outputs, inputs, weights):
    loss = sum((o.double() * w.double()).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def check_against_reference(inputs, temperature, dtype, use=(True, True)):
    """Forward and the three gradients of the Triton path against the reference."""
    dense, sparse, values = inputs
    spatial, lowrank = sk.factorize(dense, sparse, values, temperature, backend="triton")
    assert spatial.dtype == dtype and lowrank.dtype == dtype
    up = [x.detach().double().requires_grad_() for x in inputs]
    ref = sk.factorize(*up, temperature, backend="torch")
    assert_close_entrywise(spatial, ref[0], OUT_TOL[dtype], "spatial")
    assert_close_entrywise(lowrank, ref[1], OUT_TOL[dtype], "lowrank")

    weights = [torch.randn(o.shape, device=o.device) for o in (spatial, lowrank)]
    used = [i for i in range(2) if use[i]]
    got = grads([(spatial, lowrank)[i] for i in used], inputs, [weights[i] for i in used])
    want = grads([ref[i] for i in used], up, [weights[i] for i in used])
    for name, g, w in zip(("dense", "sparse", "values"), got, want):
        assert g.dtype == dtype
        assert_close_entrywise(g, w, GRAD_TOL[dtype], f"d_{name}")


@needs_triton
@pytest.mark.parametrize("shape,temperature,dtype", CASES)
def test_triton_matches_reference(rng_seed, shape, temperature, dtype):
    check_against_reference(make_inputs(shape, dtype), temperature, dtype)


@needs_triton
@pytest.mark.parametrize("k,dtype", [(1, torch.float32), (33, torch.bfloat16), (64, torch.float32)])
def test_triton_k_range(rng_seed, k, dtype):
    """K = 1 (a trivial softmax) and the BLOCK_K = 64 tile, with K padded inside it."""
    check_against_reference(make_inputs((1, 70, k, 40, 33), dtype), 0.06, dtype)


@needs_triton
@pytest.mark.parametrize("use", [(True, False), (False, True)], ids=["spatial", "lowrank"])
def test_triton_one_output_used(rng_seed, use):
    check_against_reference(make_inputs((2, 20, 5, 16, 24), torch.float32), 0.2, torch.float32, use)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_localization(rng_seed, dtype):
    dense, sparse, _ = make_inputs((2, 30, 6, 40, 1), dtype)
    got = sk.localization(dense, sparse, 0.06, backend="triton")
    assert got.dtype == dtype
    up = [x.detach().double().requires_grad_() for x in (dense, sparse)]
    assert_close_entrywise(
        got, sk.localization(*up, 0.06, backend="torch"), OUT_TOL[dtype], "spatial"
    )
    w = torch.randn(got.shape, device=got.device)
    g = grads([got], (dense, sparse), [w])
    r = grads([sk.localization(*up, 0.06, backend="torch")], up, [w])
    for name, a, b in zip(("dense", "sparse"), g, r):
        assert_close_entrywise(a, b, GRAD_TOL[dtype], f"d_{name}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_zero_patch_gives_uniform_row(rng_seed, dtype):
    dense, sparse, values = make_inputs((1, 6, 5, 16, 8), dtype)
    with torch.no_grad():
        dense[0, 2] = 0
    spatial, lowrank = sk.factorize(dense, sparse, values, 0.06, backend="triton")
    assert torch.isfinite(spatial).all() and torch.isfinite(lowrank).all()
    torch.testing.assert_close(
        spatial[0, 2].float().cpu(), torch.full((5,), 0.2), rtol=0, atol=1e-3
    )
    g = grads(
        [spatial, lowrank],
        (dense, sparse, values),
        [torch.randn(o.shape, device=o.device) for o in (spatial, lowrank)],
    )
    assert all(torch.isfinite(x).all() for x in g)


@needs_triton
def test_triton_non_contiguous(rng_seed):
    dense = torch.randn(2, 24, 9, device=DEVICE).transpose(1, 2).requires_grad_()  # (2, 9, 24)
    sparse = torch.randn(4, 2, 24, device=DEVICE).transpose(0, 1).requires_grad_()  # (2, 4, 24)
    values = torch.randn(2, 4, 40, device=DEVICE)[:, :, ::2].requires_grad_()  # (2, 4, 20)
    inputs = (dense, sparse, values)
    spatial, lowrank = sk.factorize(*inputs, 0.3, backend="triton")
    contiguous = [x.detach().contiguous().requires_grad_() for x in inputs]
    ref = sk.factorize(*contiguous, 0.3, backend="triton")
    torch.testing.assert_close(spatial, ref[0])
    torch.testing.assert_close(lowrank, ref[1])
    # Gradients that are themselves non-contiguous (an expanded weight).
    w = (torch.randn(1, 1, 20, device=DEVICE).expand(2, 9, 20),)
    got = torch.autograd.grad(lowrank, inputs, w)
    want = torch.autograd.grad(ref[1], contiguous, w)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


@needs_triton
@pytest.mark.parametrize("split", [1, 2])
def test_triton_backward_split_is_deterministic(rng_seed, monkeypatch, split):
    """The patch blocks of an image spread over `split` programs (several blocks each);
    partial sums are added in a fixed order, so results repeat bit for bit."""
    per_program = -(-3 // split)  # the 3 patch blocks of 150 patches over `split` programs
    monkeypatch.setattr(loc, "_bwd_split", lambda batch, n_blocks, device: (split, per_program))
    inputs = make_inputs((2, 150, 5, 20, 24), torch.float32)
    check_against_reference(inputs, 0.1, torch.float32)
    runs = []
    for _ in range(2):
        out = sk.factorize(*inputs, 0.1, backend="triton")
        runs.append(grads(out, inputs, [torch.ones(o.shape, device=o.device) for o in out]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


UNSUPPORTED_BY_TRITON = [
    pytest.param(((1, 3, 8), (1, 3, 4)), torch.float64, torch.float64, "float64", id="float64"),
    pytest.param(((1, 3, 8), (1, 3, 4)), torch.float32, torch.bfloat16, "dtype", id="mixed"),
    pytest.param(((1, 65, 8), (1, 65, 4)), torch.float32, torch.float32, "K <= 64", id="K=65"),
]


@pytest.mark.parametrize("shapes,dtype,values_dtype,why", UNSUPPORTED_BY_TRITON)
def test_inputs_triton_cannot_serve(rng_seed, monkeypatch, shapes, dtype, values_dtype, why):
    """backend=None falls back to the reference; an explicit backend="triton" says why not."""
    monkeypatch.delenv("STELLAR_KERNELS_BACKEND", raising=False)
    dense = torch.randn(1, 5, 8, device=DEVICE, dtype=dtype)
    sparse = torch.randn(shapes[0], device=DEVICE, dtype=dtype)
    values = torch.randn(shapes[1], device=DEVICE, dtype=values_dtype)
    assert loc._pick("factorize", None, dense, sparse, values) == "torch"
    got = sk.factorize(dense, sparse, values, 0.1)
    want = factorize_float64(dense.cpu(), sparse.cpu(), values.cpu(), 0.1)
    rtol = 1e-4 if min(dtype.itemsize, values_dtype.itemsize) >= 4 else 1e-2  # bfloat16 output
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.double().cpu().numpy(), w, rtol=rtol, atol=rtol / 10)
    if HAS_TRITON:
        with pytest.raises(ValueError, match=f"backend='triton'.*{why}"):
            sk.factorize(dense, sparse, values, 0.1, backend="triton")


def test_cpu_default_backend_is_torch(monkeypatch):
    monkeypatch.delenv("STELLAR_KERNELS_BACKEND", raising=False)
    x = torch.randn(1, 4, 8)
    assert loc._pick("factorize", None, x, x, x) == "torch"


# ----------------------------------------------------------------------------- custom ops


@needs_triton
def test_opcheck_forward_and_backward(rng_seed):
    dense, sparse, values = make_inputs((2, 7, 3, 16, 5), torch.float32)
    torch.library.opcheck(loc._factorize_op, (dense, sparse, values, 0.3))
    torch.library.opcheck(loc._factorize_op, (dense, sparse, None, 0.3))
    spatial, lowrank, cos, rnorm, snorm = loc._factorize_op(dense, sparse, values, 0.3)
    saved = [x.detach() for x in (dense, sparse, values)]
    gs, gl = (torch.randn(o.shape, device=o.device) for o in (spatial, lowrank))
    for grad_spatial, grad_lowrank in [(gs, gl), (None, gl), (gs, None)]:
        torch.library.opcheck(
            loc._factorize_backward_op,
            (grad_spatial, grad_lowrank, *saved, cos, rnorm, snorm, 0.3),
        )


def check_compile(backend, device):
    torch._dynamo.reset()
    dense, sparse, values = make_inputs((2, 12, 4, 16, 8), torch.float32, device)

    def step(dense, sparse, values):
        spatial, lowrank = sk.factorize(dense, sparse, values, 0.1, backend="triton")
        return (lowrank**2).sum() + (spatial * spatial.detach()).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(dense, sparse, values)
    got = torch.autograd.grad(loss, (dense, sparse, values))
    want = torch.autograd.grad(step(dense, sparse, values), (dense, sparse, values))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@needs_triton
def test_torch_compile_fullgraph(rng_seed):
    """Dynamo traces through the custom op (no graph break) and AOT autograd through its
    backward op; aot_eager keeps the CPU test fast (inductor: the GPU test below)."""
    check_compile("aot_eager", DEVICE)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor(rng_seed):
    check_compile("inductor", "cuda")


def test_import_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, stellar_kernels as sk\n"
        "x = torch.randn(1, 4, 8)\n"
        "s, l = sk.factorize(x, torch.randn(1, 2, 8), torch.randn(1, 2, 3))\n"
        "assert s.shape == (1, 4, 2) and l.shape == (1, 4, 3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "STELLAR_KERNELS_BACKEND"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_gpu_vit_b(rng_seed, dtype):
    """ViT-B size: B=128, N=196, K=16, d=D=768."""
    check_against_reference(make_inputs((128, 196, 16, 768, 768), dtype, "cuda"), 0.06, dtype)


@pytest.mark.gpu
def test_gpu_vit_b_deterministic(rng_seed):
    inputs = make_inputs((128, 196, 16, 768, 768), torch.bfloat16, "cuda")
    runs = []
    for _ in range(2):
        out = sk.factorize(*inputs, 0.06)
        runs.append([*out, *grads(out, inputs, [torch.ones(o.shape, device="cuda") for o in out])])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 33, 64])
def test_gpu_other_k(rng_seed, k):
    check_against_reference(
        make_inputs((4, 1024, k, 1280, 1280), torch.bfloat16, "cuda"), 0.06, torch.bfloat16
    )


@pytest.mark.gpu
def test_gpu_default_backend_is_triton(rng_seed, monkeypatch):
    monkeypatch.delenv("STELLAR_KERNELS_BACKEND", raising=False)
    dense, sparse, values = make_inputs((2, 9, 3, 64, 64), torch.bfloat16, "cuda")
    assert loc._pick("factorize", None, dense, sparse, values) == "triton"
    assert loc._pick("factorize", None, dense.cpu(), sparse.cpu(), values.cpu()) == "torch"
