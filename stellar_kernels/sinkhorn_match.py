"""Sinkhorn optimal-transport matching of token sets (paper eq. 7-9).

`sinkhorn_match` solves a batch of entropic OT problems with unit row and
column marginals in the log domain and rounds each plan to an index;
`match_tokens` does the same on the Euclidean cost between token sets without
materializing the repeated target or the cost matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._backend import resolve_backend
from ._validation import (
    check_choice,
    check_iterations,
    check_not_nan,
    check_positive,
    check_rows_fit,
    check_same_device,
    check_tensor,
)

ROUNDINGS = ("permutation", "argmax")
MATCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class MatchResult(NamedTuple):
    index: torch.Tensor
    """(B, Q) int64: the target chosen for each query row."""
    plan: torch.Tensor
    """(B, Q, T) float32: the transport plan after n_iters."""


# ----------------------------------------------------------------------------- reference


def sinkhorn_plan_reference(cost: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """Plan exp((u_i + v_j - C_ij) / eps) after n_iters log-domain updates, float32, (B, Q, T)."""
    c = cost.float() / eps
    u = c.new_zeros(c.shape[:-1])  # u / eps, (B, Q)
    v = c.new_zeros(c.shape[:-2] + c.shape[-1:])  # v / eps, (B, T)
    for _ in range(n_iters):
        u = -torch.logsumexp(v.unsqueeze(-2) - c, dim=-1)
        v = -torch.logsumexp(u.unsqueeze(-1) - c, dim=-2)
    return torch.exp(u.unsqueeze(-1) + v.unsqueeze(-2) - c)


def round_plan(plan: torch.Tensor, rounding: str) -> torch.Tensor:
    """Index (B, Q) from a plan (B, Q, T): row argmax, or a greedy one-to-one rounding.

    The greedy rounding takes the largest remaining entry, assigns it and strikes
    its row and column, Q times. When the row-wise argmax is already one-to-one,
    every row's maximum survives the strikes, so both roundings agree.
    """
    if rounding == "argmax":
        return plan.argmax(dim=-1)
    b, q, t = plan.shape
    work = plan.clone()
    index = torch.empty(b, q, dtype=torch.long, device=plan.device)
    batch = torch.arange(b, device=plan.device)
    for _ in range(q):
        flat = work.view(b, q * t).argmax(dim=1)
        rows, cols = flat // t, flat % t
        index[batch, rows] = cols
        work[batch, rows, :] = -1.0
        work[batch, :, cols] = -1.0
    return index


def sinkhorn_match_reference(
    cost: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> MatchResult:
    plan = sinkhorn_plan_reference(cost, eps, n_iters)
    return MatchResult(round_plan(plan, rounding), plan)


def euclidean_cost_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cdist(pred, target.repeat_interleave(V, 0)) in float32, using a broadcast view of target."""
    views = pred.shape[0] // target.shape[0]
    p = pred.float().view(target.shape[0], views, *pred.shape[1:])
    t = target.float().unsqueeze(1)
    return torch.cdist(p, t).view(pred.shape[0], pred.shape[1], target.shape[1])


def match_tokens_reference(
    pred: torch.Tensor, target: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> MatchResult:
    return sinkhorn_match_reference(euclidean_cost_reference(pred, target), eps, n_iters, rounding)


# ----------------------------------------------------------------------------- public API


def _check_hyper(eps: float, n_iters: int, rounding: str) -> tuple[float, int, str]:
    return (
        check_positive("eps", eps),
        check_iterations("n_iters", n_iters),
        check_choice("rounding", rounding, ROUNDINGS),
    )


def sinkhorn_match(
    cost: torch.Tensor,
    eps: float = 0.1,
    n_iters: int = 5,
    rounding: str = "permutation",
    *,
    backend: str | None = None,
    validate: bool = True,
) -> MatchResult:
    """Entropic OT matching of Q query rows to T targets (Q <= T), batched.

    Args:
        cost: (B, Q, T) or (Q, T) float16/bfloat16/float32 cost matrix.
        eps: entropic regularization (> 0).
        n_iters: number of (u, v) log-domain updates (>= 1).
        rounding: "permutation" (one-to-one, greedy on the plan) or "argmax"
            (row-wise argmax, may repeat a target).
        backend: None (fastest available), "torch" or "triton".
        validate: scan `cost` for NaN (a host synchronization); False skips it.

    Returns:
        MatchResult(index (B, Q) int64, plan (B, Q, T) float32); 2-D input gives
        (Q,) and (Q, T).
    """
    check_tensor("cost", cost, (2, 3), MATCH_DTYPES)
    check_rows_fit("cost", cost.shape)
    eps, n_iters, rounding = _check_hyper(eps, n_iters, rounding)
    if validate:
        check_not_nan("cost", cost)
    batched = cost if cost.dim() == 3 else cost.unsqueeze(0)
    impl = resolve_backend(
        "sinkhorn_match", backend, cost.device, ("torch", "triton"), "torch", "torch"
    )
    if impl == "triton":
        raise NotImplementedError("sinkhorn_match: the Triton backend is not implemented yet")
    index, plan = sinkhorn_match_reference(batched, eps, n_iters, rounding)
    if cost.dim() == 2:
        return MatchResult(index[0], plan[0])
    return MatchResult(index, plan)


def match_tokens(
    pred: torch.Tensor,
    target: torch.Tensor,
    eps: float = 0.1,
    n_iters: int = 5,
    rounding: str = "permutation",
    *,
    backend: str | None = None,
    validate: bool = True,
) -> MatchResult:
    """Matches the tokens of V views per image to the tokens of that image's target.

    Args:
        pred: (B*V, Q, D) tokens; row b*V + v is view v of image b.
        target: (B, T, D) tokens, Q <= T.
        eps, n_iters, rounding, backend, validate: as in `sinkhorn_match`.

    Returns:
        The same as ``sinkhorn_match(torch.cdist(pred, target.repeat_interleave(V, 0)))``:
        MatchResult(index (B*V, Q) int64, plan (B*V, Q, T) float32).
    """
    check_tensor("pred", pred, (3,), MATCH_DTYPES)
    check_tensor("target", target, (3,), MATCH_DTYPES)
    check_same_device(pred=pred, target=target)
    if target.shape[0] == 0 or pred.shape[0] % target.shape[0] != 0:
        raise ValueError(
            f"pred's batch must be a multiple (V views) of target's: pred {tuple(pred.shape)}, "
            f"target {tuple(target.shape)}"
        )
    if pred.shape[2] != target.shape[2]:
        raise ValueError(
            f"pred and target must have the same token dimension D: pred {tuple(pred.shape)}, "
            f"target {tuple(target.shape)}"
        )
    if pred.shape[1] > target.shape[1]:
        raise ValueError(
            f"pred must have no more tokens than target (Q <= T): pred {tuple(pred.shape)}, "
            f"target {tuple(target.shape)}"
        )
    eps, n_iters, rounding = _check_hyper(eps, n_iters, rounding)
    if validate:
        check_not_nan("pred", pred)
        check_not_nan("target", target)
    impl = resolve_backend(
        "match_tokens", backend, pred.device, ("torch", "triton"), "torch", "torch"
    )
    if impl == "triton":
        raise NotImplementedError("match_tokens: the Triton backend is not implemented yet")
    return match_tokens_reference(pred, target, eps, n_iters, rounding)
