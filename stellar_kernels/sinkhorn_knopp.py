"""Sinkhorn-Knopp balanced assignment for online clustering (paper eq. 4-6).

Given scores s (N, P) (logits divided by the SK temperature), the result is
q = exp(s - max_col) with, n_iters times, each column divided by its sum (plus
eps, to the power `scale`) and then each row divided by its sum (plus eps).
Across ranks, column statistics are all-reduced, so every rank gets the rows of
the result that one call on all ranks' rows stacked would give.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._backend import resolve_backend
from ._validation import check_iterations, check_not_nan, check_positive, check_tensor


def distributed_group(group: object | None, local: bool) -> object | None:
    """The process group to reduce column statistics over, or None for a local call."""
    if local or not dist.is_available() or not dist.is_initialized():
        return None
    if group is None:
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def all_reduce_(x: torch.Tensor, op: object, group: object | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


def sinkhorn_knopp_reference(
    scores: torch.Tensor, n_iters: int, scale: float, eps: float, group: object | None
) -> torch.Tensor:
    """Eager SK: one float32 N x P buffer (the output), normalized in place."""
    col_max = scores.amax(dim=0).float()
    all_reduce_(col_max, dist.ReduceOp.MAX, group)
    q = scores.float() - col_max  # the output buffer; every later step is in place
    q.exp_()
    for _ in range(n_iters):
        col_sum = all_reduce_(q.sum(dim=0), dist.ReduceOp.SUM, group)
        q.div_(col_sum.add_(eps).pow_(scale))
        q.div_(q.sum(dim=1, keepdim=True).add_(eps))
    return q


def sinkhorn_knopp(
    scores: torch.Tensor,
    n_iters: int = 3,
    scale: float = 1.0,
    eps: float = 1e-8,
    group: object | None = None,
    local: bool = False,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Balanced soft assignment of N rows to P prototypes.

    Args:
        scores: (N, P) logits already divided by the SK temperature; any float dtype.
        n_iters: column-then-row normalization rounds (>= 1).
        scale: exponent of the column normalization (> 0; 1.0 is plain SK).
        eps: added to every column and row sum (> 0).
        group: process group for the column all-reduces; None means the default
            group when torch.distributed is initialized.
        local: never communicate (for a call made on some ranks only).
        backend: None (fastest available), "torch" or "triton".
        validate: scan `scores` for NaN (a host synchronization); False skips it.

    Returns:
        q (N, P) float32; `scores` is not modified.
    """
    check_tensor("scores", scores, (2,))
    n_iters = check_iterations("n_iters", n_iters)
    scale = check_positive("scale", scale)
    eps = check_positive("eps", eps)
    if validate:
        check_not_nan("scores", scores)
    impl = resolve_backend(
        "sinkhorn_knopp", backend, scores.device, ("torch", "triton"), "torch", "torch"
    )
    if impl == "triton":
        raise NotImplementedError("sinkhorn_knopp: the Triton backend is not implemented yet")
    return sinkhorn_knopp_reference(scores, n_iters, scale, eps, distributed_group(group, local))
