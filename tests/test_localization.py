"""localization / factorize references against float64 math and gradcheck."""

import numpy as np
import pytest
import torch

import stellar_kernels as sk


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
    loc = sk.localization(dense, sparse, temperature, backend="torch")
    np.testing.assert_allclose(loc.numpy(), exp_spatial, rtol=1e-4, atol=1e-6)


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
