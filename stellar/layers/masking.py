"""Gaussian-focal patch masking of the masked global views.

A masked view keeps round(N * (1 - ratio)) of its N patches (at least one).
The kept patches are drawn without replacement with probability proportional
to a Gaussian centred on a random focal point of the grid, so that what
remains visible is a blob around the focus plus some scattered patches
(Gumbel top-k sampling of the log-weights).
"""

from __future__ import annotations

import torch

from .pos_embed import grid_coords


def keep_count(num_patches: int, ratio: float) -> int:
    """How many patches a view masked at `ratio` keeps."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return max(1, min(num_patches, round(num_patches * (1.0 - ratio))))


def focal_mask(
    batch: int,
    grid_h: int,
    grid_w: int,
    ratio: float,
    sigma: float = 0.25,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Indices of the kept patches, (batch, n_keep) int64, sorted ascending.

    Args:
        batch: number of masked views.
        grid_h, grid_w: patch grid of the views.
        ratio: fraction of patches masked (0.8 keeps 20%).
        sigma: standard deviation of the focal Gaussian, in units of the grid's
            side ([-1, 1] coordinates span 2); sigma <= 0 gives uniform masking.
        generator: a CPU generator, for reproducible masks.
    """
    n = grid_h * grid_w
    keep = keep_count(n, ratio)
    coords = grid_coords(grid_h, grid_w)  # (n, 2) in [-1, 1]
    focus = torch.rand(batch, 1, 2, generator=generator) * 2 - 1
    if sigma > 0:
        log_w = -((coords.unsqueeze(0) - focus) ** 2).sum(-1) / (2 * (2 * sigma) ** 2)
    else:
        log_w = torch.zeros(batch, n)
    u = torch.rand(batch, n, generator=generator).clamp_(1e-20, 1.0)
    gumbel = -torch.log(-torch.log(u))
    idx = (log_w + gumbel).topk(keep, dim=1).indices
    return idx.sort(dim=1).values.to(device)
