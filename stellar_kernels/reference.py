"""The PyTorch reference of every operator: what `backend="torch"` runs.

Each is plain eager PyTorch, written to read like the math of docs/design.md, and is
itself tested against independent sources (float64 numpy, scipy, POT). The Triton and
CUDA paths are tested against these. Input checks live in the public entry points, not
here. None of these records gradients except the localization ones.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

INF = float("inf")

# ----------------------------------------------------------------------------- Sinkhorn matching


def sinkhorn_plan_reference(cost: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """Plan exp((u_i + v_j - C_ij) / eps) after n_iters log-domain updates, float32, (B, Q, T).

    +inf costs are forbidden pairs: masked out of every log-sum-exp and zero in the plan.
    A column forbidden in every row takes no mass (its dual is +inf, never used).
    """
    c = cost.float() / eps
    allowed = c != INF
    u = c.new_zeros(c.shape[:-1])  # u / eps, (B, Q)
    v = c.new_zeros(c.shape[:-2] + c.shape[-1:])  # v / eps, (B, T)
    for _ in range(n_iters):
        u = -torch.logsumexp(torch.where(allowed, v.unsqueeze(-2) - c, -INF), dim=-1)
        v = -torch.logsumexp(torch.where(allowed, u.unsqueeze(-1) - c, -INF), dim=-2)
    return torch.where(allowed, torch.exp(u.unsqueeze(-1) + v.unsqueeze(-2) - c), 0.0)


def rounding_scores(plan: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The values the roundings rank: the plan on allowed pairs, -0.5 on forbidden pairs
    and NaN entries, so that a forbidden pair is only taken when nothing else is left (a
    struck entry is -1 below them all), and every row always has a pick in [0, T)."""
    keep = plan == plan  # not NaN
    if allowed is not None:
        keep &= allowed
    return torch.where(keep, plan, -0.5)


def round_plan(
    plan: torch.Tensor, rounding: str, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Index (B, Q) from a plan (B, Q, T): row argmax, or a greedy one-to-one rounding.

    The greedy rounding takes the largest remaining entry (lowest flat index among equal
    ones), assigns it and strikes its row and column, Q times. When the row-wise argmax is
    already one-to-one, every row's maximum survives the strikes, so both roundings agree.
    `allowed` (B, Q, T) marks the pairs that are not forbidden (default: all).
    """
    work = rounding_scores(plan, allowed).contiguous()  # a fresh buffer, struck in place
    if rounding == "argmax":
        return work.argmax(dim=-1)
    b, q, t = work.shape
    index = torch.empty(b, q, dtype=torch.long, device=plan.device)
    batch = torch.arange(b, device=plan.device)
    for _ in range(q):
        flat = work.view(b, q * t).argmax(dim=1)
        rows, cols = flat // t, flat % t
        index[batch, rows] = cols
        work[batch, rows, :] = -1.0
        work[batch, :, cols] = -1.0
    return index


@torch.no_grad()
def sinkhorn_match_reference(
    cost: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (B, Q), plan (B, Q, T)) of a (B, Q, T) cost."""
    plan = sinkhorn_plan_reference(cost, eps, n_iters)
    return round_plan(plan, rounding, cost != INF), plan


def euclidean_cost_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cdist(pred, target.repeat_interleave(V, 0)) in float32, using a broadcast view of target.

    Token 0 of each image's target is subtracted from both sides first: distances do not
    change, and tokens that share a large common component (as ViT tokens share their
    mean) lose it before any product is formed, where it would cancel catastrophically.
    """
    images = target.shape[0]
    views = pred.shape[0] // images
    t = target.float()
    origin = t[:, :1]  # (B, 1, D)
    p = pred.float().view(images, views, *pred.shape[1:]) - origin.unsqueeze(1)
    return torch.cdist(p, (t - origin).unsqueeze(1)).view(
        pred.shape[0], pred.shape[1], target.shape[1]
    )


@torch.no_grad()
def match_tokens_reference(
    pred: torch.Tensor, target: torch.Tensor, eps: float, n_iters: int, rounding: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return sinkhorn_match_reference(euclidean_cost_reference(pred, target), eps, n_iters, rounding)


# ----------------------------------------------------------------------------- Sinkhorn-Knopp


def nonfinite_flag(x: torch.Tensor) -> torch.Tensor:
    """0-dim float32 on x's device: 1 if x holds a NaN or an infinity, else 0 (no host sync).

    aminmax propagates NaN and shows either infinity, so no x-sized mask is formed.
    """
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    lo, hi = torch.aminmax(x)
    return (~(torch.isfinite(lo) & torch.isfinite(hi))).float()


@torch.no_grad()
def sinkhorn_knopp_reference(
    scores: torch.Tensor,
    n_iters: int,
    scale: float,
    eps: float,
    group: object | None,
    flag_nonfinite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager SK: one float32 N x P buffer (the output), normalized in place.

    Returns (q, nonfinite): nonfinite is 1 when any rank's scores hold a NaN or an
    infinity (computed only with flag_nonfinite, else 0). It travels with the column max
    in the first all-reduce, so every rank learns it, and every rank runs the same
    collectives whatever its row count (zero rows included).
    """
    n, p = scores.shape
    stats = torch.empty(p + 1, dtype=torch.float32, device=scores.device)
    stats[:p] = scores.amax(dim=0) if n else -INF  # amax of no rows would raise
    stats[p] = nonfinite_flag(scores) if flag_nonfinite else 0.0
    if group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    col_max, nonfinite = stats[:p], stats[p]
    q = scores.float() - col_max  # the output buffer; every later step is in place
    q.exp_()
    for _ in range(n_iters):
        col_sum = q.sum(dim=0)
        if group is not None:
            dist.all_reduce(col_sum, op=dist.ReduceOp.SUM, group=group)
        q.div_(col_sum.add_(eps).pow_(scale))
        q.div_(q.sum(dim=1, keepdim=True).add_(eps))
    return q, nonfinite


# ----------------------------------------------------------------------------- localization

NORM_EPS = 1e-7
"""L2-normalization eps of the localization (the public code's value)."""


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


# ----------------------------------------------------------------------------- Hungarian


def hungarian_scipy(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """A loop of scipy.optimize.linear_sum_assignment over the batch (B, Q, T) -> (B, Q) int64.

    Costs are taken as float64, as scipy takes them (integers and bools included). Rows
    left without a column (Q > T) get -1, and so does every row of a problem scipy cannot
    solve (no complete assignment, or NaN), so that a problem solved has min(Q, T) rows
    assigned and one not solved has none.
    """
    from scipy.optimize import linear_sum_assignment

    host = cost.detach().to("cpu", torch.float64).numpy()
    index = np.full(host.shape[:2], -1, dtype=np.int64)
    for b, problem in enumerate(host):
        try:
            rows, cols = linear_sum_assignment(problem, maximize=maximize)
        except ValueError:  # infeasible, or invalid entries: the caller's checks say which
            continue
        index[b, rows] = cols
    return torch.from_numpy(index).to(cost.device)
