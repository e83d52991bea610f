"""Online concept clustering (paper eq. 4-6): Sinkhorn-Knopp targets and their cross-entropy.

Targets are balanced assignments computed without gradient by
stellar_kernels.sinkhorn_knopp on logits / sk_temperature (all-reduced
across ranks under torch.distributed); predictions are
log_softmax(logits / pred_temperature).
"""

from __future__ import annotations

import torch

import stellar_kernels as sk


@torch.no_grad()
def sinkhorn_targets(
    logits: torch.Tensor,
    temperature: float = 0.06,
    n_iters: int = 3,
    eps: float = 1e-8,
    backend: str | None = None,
) -> torch.Tensor:
    """Balanced soft assignments (..., P) float32 of the rows of logits (..., P).

    eps is added to every column and row sum, as the public code does (1e-8); rows sum
    to 1 except those whose scores sit far below every prototype's best (eps = 0 makes
    every row sum to 1).
    """
    flat = logits.detach().reshape(-1, logits.shape[-1]).float()
    # validate=False: the training loop guards the loss against NaN/Inf, and the check
    # would cost a host synchronization per step.
    q = sk.sinkhorn_knopp(
        flat / temperature, n_iters=n_iters, eps=eps, backend=backend, validate=False
    )
    return q.view(logits.shape)


def cluster_cross_entropy(
    targets: torch.Tensor, logits: torch.Tensor, temperature: float = 0.12
) -> torch.Tensor:
    """Mean over rows of -sum_p targets_p log_softmax(logits / temperature)_p."""
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} and logits {tuple(logits.shape)} differ in shape"
        )
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(targets.float() * log_p).sum(dim=-1).mean()
