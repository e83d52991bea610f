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


SK_FLAGS = (
    "NaN, +inf, or a score beyond half of float32's range (float64's for float64 scores), "
    "where s - max would overflow",
    "a row with no finite score",
    "a column with no finite score",
)
"""What each entry of sinkhorn_knopp's (3,) flag vector reports (1 when present)."""


def sk_accumulator(dtype: torch.dtype) -> torch.dtype:
    """Sinkhorn-Knopp computes and returns float64 for float64 scores, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sk_score_limit(dtype: torch.dtype) -> float:
    """The largest |score| Sinkhorn-Knopp takes: s - column max must not overflow."""
    return torch.finfo(sk_accumulator(dtype)).max / 2


def sk_score_flags(scores: torch.Tensor) -> torch.Tensor:
    """(2,) float32: a score that is NaN, +inf or beyond sk_score_limit; a row whose scores
    are all -inf."""
    if scores.numel() == 0:
        return torch.zeros(2, dtype=torch.float32, device=scores.device)
    magnitude = scores.abs().masked_fill_(scores == -INF, 0).amax()  # NaN propagates
    too_big = ~(magnitude <= sk_score_limit(scores.dtype))
    return torch.stack([too_big, (scores.amax(dim=1) == -INF).any()]).float()


def sk_flags(col_max: torch.Tensor, score_flags: torch.Tensor) -> torch.Tensor:
    """The (3,) flags of SK_FLAGS from the all-reduced column max and the score flags.

    A column's max is -inf when no row of any rank has a finite score there. When every
    column's is, there is no row at all (or every row is flagged already): an empty
    problem is not an error.
    """
    empty = col_max == -INF
    column = (empty.any() & ~empty.all()).to(score_flags.dtype)
    return torch.cat([score_flags, column.view(1)])


def sk_column_max(
    scores: torch.Tensor, acc: torch.dtype, group: object | None, flag: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(column max (P,) in `acc`, flags (3,)) over every rank's rows, in one all-reduce.

    The score flags travel with the column max, so every rank learns them; every rank
    runs the same collectives whatever its row count (zero rows included).
    """
    n, p = scores.shape
    stats = torch.empty(p + 2, dtype=acc, device=scores.device)
    stats[:p] = scores.amax(dim=0) if n else -INF  # amax of no rows would raise
    stats[p:] = sk_score_flags(scores) if flag else 0.0
    if group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    col_max = stats[:p]
    return col_max, sk_flags(col_max, stats[p:]) if flag else stats[p:].new_zeros(3)


def all_reduced_sum(x: torch.Tensor, group: object | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


@torch.no_grad()
def sinkhorn_knopp_zero_iterations(
    scores: torch.Tensor, group: object | None, flag: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, flags) with q = N exp(s) / sum(exp(s)), the sum over every entry of all ranks'
    rows and N their count: what SwAV's form returns after no iteration."""
    acc = sk_accumulator(scores.dtype)
    col_max, flags = sk_column_max(scores, acc, group, flag)
    # The global max as the shift (0 when no column has a finite score: nothing to scale).
    top = col_max.amax() if col_max.numel() else col_max.new_zeros(())
    q = scores.to(acc) - torch.where(top == -INF, 0.0, top)
    q.exp_()
    totals = all_reduced_sum(torch.stack([q.sum(), q.new_tensor(float(q.shape[0]))]), group)
    return q.mul_(totals[1] / totals[0]), flags


@torch.no_grad()
def sinkhorn_knopp_reference(
    scores: torch.Tensor,
    n_iters: int,
    scale: float,
    eps: float,
    group: object | None,
    flag: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager SK on one N x P buffer (the output, float32, or float64 for float64 scores).

    Returns (q, flags): flags (3,) as in SK_FLAGS, computed only with `flag` (else 0).

    eps > 0 is the form of the public STELLAR code: q = exp(s - column max) normalized in
    place, eps added to every sum; a row whose entries all underflow ends near zero.
    eps = 0 is SwAV's normalization exactly: the buffer holds log q, each row step but
    the last subtracts the row's max and then the log of its sum, and the last is a
    softmax over the row, so
    every row sums to 1 whatever the scores. Column sums need no such care: the column
    step leaves each column with unit mass, so after the row step a column still holds at
    least 1/P of it (scale 1).
    """
    if n_iters == 0:
        return sinkhorn_knopp_zero_iterations(scores, group, flag)
    acc = sk_accumulator(scores.dtype)
    col_max, flags = sk_column_max(scores, acc, group, flag)
    q = scores.to(acc) - col_max  # the output buffer; every later step is in place
    if q.shape[1] == 0:  # no prototypes (on every rank: P is the same everywhere)
        return q, flags
    if eps > 0:
        q.exp_()
        for _ in range(n_iters):
            col_sum = all_reduced_sum(q.sum(dim=0), group)
            q.div_(col_sum.add_(eps).pow_(scale))
            q.div_(q.sum(dim=1, keepdim=True).add_(eps))
        return q, flags
    for it in range(n_iters):
        col_sum = all_reduced_sum(q.exp().sum(dim=0), group)
        q.sub_(col_sum.log_().mul_(scale))
        if it < n_iters - 1:
            # The row's max first, then the log of the sum: a log-sum-exp subtracted at once
            # would lose its log term against a huge row offset, leaving the row unnormalized.
            q.sub_(q.amax(dim=1, keepdim=True))
            q.sub_(q.exp().sum(dim=1, keepdim=True).log_())
    # The last row step divides by the sum itself (a softmax): exp of a rounded log-sum-exp
    # would be off by an ulp of the row's offset, 1e-5 at an offset of 100.
    return torch.softmax(q, dim=1), flags


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
