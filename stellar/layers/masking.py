"""Patch masking of the masked global views.

A masked view keeps round(N * (1 - ratio)) of its N patches (at least one).
Two generators, chosen by `data.masking`:

- `mixed_mask` (the public code's): each view is, with probability `focal_prob`,
  biased towards a random centre cell: every patch draws a uniform score, the
  Gaussian exp(-d^2 / 2 sigma^2) around the centre (sigma drawn per view from
  `sigma_range`, a fraction of the grid's side) is subtracted, and the patches
  with the lowest scores stay visible; the other views are plain random masks.
- `focal_mask`: every view is Gaussian-focal with one fixed sigma, its kept patches
  drawn without replacement with probability proportional to the Gaussian
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


def mixed_mask(
    batch: int,
    grid_h: int,
    grid_w: int,
    ratio: float,
    focal_prob: float = 0.5,
    sigma_range: tuple[float, float] = (0.1, 0.5),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Indices of the kept patches, (batch, n_keep) int64, sorted ascending: random masks,
    a share `focal_prob` of them biased towards a random centre (see the module docstring)."""
    n = grid_h * grid_w
    keep = keep_count(n, ratio)
    score = torch.rand(batch, n, generator=generator)
    rows = torch.arange(grid_h, dtype=torch.float32).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float32).repeat(grid_h)
    centre_r = torch.randint(grid_h, (batch, 1), generator=generator).float()
    centre_c = torch.randint(grid_w, (batch, 1), generator=generator).float()
    lo, hi = sigma_range
    sigma = lo + (hi - lo) * torch.rand(batch, 1, generator=generator)
    # Distances in units of the grid's side, so that sigma is a fraction of it on any grid.
    d2 = ((rows - centre_r) / grid_h) ** 2 + ((cols - centre_c) / grid_w) ** 2
    focal = torch.rand(batch, 1, generator=generator) < focal_prob
    score = score - focal * torch.exp(-d2 / (2 * sigma**2))
    idx = score.topk(keep, dim=1, largest=False).indices
    return idx.sort(dim=1).values.to(device)
