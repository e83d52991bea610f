"""Localization matrix (paper eq. 14) and low-rank features (eq. 1).

spatial[b, n, k] = softmax_k(cos(dense[b, n], sparse[b, k]) / temperature)
lowrank[b] = spatial[b] @ values[b]
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._validation import check_positive, check_same_device, check_tensor

LOC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NORM_EPS = 1e-7  # L2-normalize eps of the reference code


def l2_normalize(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def localization_reference(
    dense: torch.Tensor, sparse: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(B, N, K) softmax over K of cosine similarities / temperature, computed in float32 at least."""
    acc = torch.promote_types(dense.dtype, torch.float32)
    cos = l2_normalize(dense.to(acc)) @ l2_normalize(sparse.to(acc)).transpose(1, 2)
    return torch.softmax(cos / temperature, dim=-1).to(dense.dtype)


def factorize_reference(
    dense: torch.Tensor, sparse: torch.Tensor, values: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    spatial = localization_reference(dense, sparse, temperature)
    acc = torch.promote_types(values.dtype, torch.float32)
    lowrank = (spatial.to(acc) @ values.to(acc)).to(values.dtype)
    return spatial, lowrank


def _check_pair(dense: torch.Tensor, sparse: torch.Tensor, temperature: float) -> float:
    check_tensor("dense", dense, (3,), LOC_DTYPES)
    check_tensor("sparse", sparse, (3,), LOC_DTYPES)
    check_same_device(dense=dense, sparse=sparse)
    if dense.shape[0] != sparse.shape[0] or dense.shape[2] != sparse.shape[2]:
        raise ValueError(
            "dense (B, N, d) and sparse (B, K, d) must agree in B and d: "
            f"dense {tuple(dense.shape)}, sparse {tuple(sparse.shape)}"
        )
    if dense.dtype != sparse.dtype:
        raise ValueError(
            f"dense and sparse must have one dtype, got {dense.dtype} and {sparse.dtype}"
        )
    return check_positive("temperature", temperature)


def localization(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    temperature: float = 0.06,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax over the K tokens of cos(dense_n, sparse_k) / temperature.

    Args:
        dense: (B, N, d) projected patch features.
        sparse: (B, K, d) projected sparse tokens, same dtype.
        temperature: softmax temperature (> 0).
        backend: None (fastest available), "torch" or "triton".

    Returns:
        spatial (B, N, K) in the input dtype; differentiable w.r.t. dense and sparse.
    """
    temperature = _check_pair(dense, sparse, temperature)
    impl = resolve_backend(
        "localization", backend, dense.device, ("torch", "triton"), "torch", "torch"
    )
    if impl == "triton":
        raise NotImplementedError("localization: the Triton backend is not implemented yet")
    return localization_reference(dense, sparse, temperature)


def factorize(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    values: torch.Tensor,
    temperature: float = 0.06,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Localization matrix and the low-rank features it spans.

    Args:
        dense: (B, N, d) projected patch features (W_d D).
        sparse: (B, K, d) projected sparse tokens (W_s S), same dtype.
        values: (B, K, D) the sparse tokens themselves.
        temperature: softmax temperature (> 0).
        backend: None (fastest available), "torch" or "triton".

    Returns:
        (spatial (B, N, K), lowrank (B, N, D) = spatial @ values), differentiable
        w.r.t. dense, sparse and values.
    """
    temperature = _check_pair(dense, sparse, temperature)
    check_tensor("values", values, (3,), LOC_DTYPES)
    check_same_device(dense=dense, values=values)
    if values.shape[:2] != sparse.shape[:2]:
        raise ValueError(
            "values (B, K, D) must match sparse (B, K, d) in B and K: "
            f"sparse {tuple(sparse.shape)}, values {tuple(values.shape)}"
        )
    impl = resolve_backend(
        "factorize", backend, dense.device, ("torch", "triton"), "torch", "torch"
    )
    if impl == "triton":
        raise NotImplementedError("factorize: the Triton backend is not implemented yet")
    return factorize_reference(dense, sparse, values, temperature)
