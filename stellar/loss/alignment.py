"""Set concepts alignment (paper eq. 7-10): match each view's tokens to the target tokens.

The matcher orders the unordered token sets: "sinkhorn" (entropic OT on the
Euclidean cost, stellar_kernels.match_tokens), "hungarian" (the exact
assignment, stellar_kernels.hungarian_match) or "none" (token k to token k).
The targets of a view's tokens are the target tokens' assignments gathered
by the matching.
"""

from __future__ import annotations

import torch

import stellar_kernels as sk

MATCHERS = ("sinkhorn", "hungarian", "none")


@torch.no_grad()
def match_to_targets(
    pred: torch.Tensor,
    target: torch.Tensor,
    matcher: str = "sinkhorn",
    eps: float = 0.1,
    n_iters: int = 5,
    rounding: str = "argmax",
    backend: str | None = None,
) -> torch.Tensor:
    """Index (B*V, K) of the target token each view token is matched to.

    pred (B*V, K, D): tokens of V views per image (row b*V + v is view v of image b);
    target (B, T, D): the target tokens, K <= T.
    """
    if matcher not in MATCHERS:
        raise ValueError(f"matcher must be one of {MATCHERS}, got {matcher!r}")
    bv, k, _ = pred.shape
    if matcher == "none":
        return torch.arange(k, device=pred.device).expand(bv, k)
    pred, target = pred.detach().float(), target.detach().float()
    if matcher == "sinkhorn":
        # validate=False: the training loop guards the loss against NaN/Inf, and the check
        # would cost a host synchronization per step.
        return sk.match_tokens(
            pred,
            target,
            eps=eps,
            n_iters=n_iters,
            rounding=rounding,
            backend=backend,
            validate=False,
        ).index
    views = bv // target.shape[0]
    cost = torch.cdist(pred, target.repeat_interleave(views, dim=0))
    return sk.hungarian_match(cost, validate=False)


def gather_targets(targets: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """targets (B, T, P) gathered by index (B*V, K): (B*V, K, P), row b*V+v from image b."""
    b, t, p = targets.shape
    views = index.shape[0] // b
    base = torch.arange(b, device=index.device).repeat_interleave(views).unsqueeze(1) * t
    return targets.reshape(b * t, p)[(base + index).reshape(-1)].view(*index.shape, p)
