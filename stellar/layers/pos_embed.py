"""2-D random-Fourier positional encoding of the decoder (Tancik et al., 2020).

A fixed Gaussian matrix G (2, dim/2) maps each patch centre p in [-1, 1]^2 to
[sin(2 pi p G), cos(2 pi p G)]; coordinates are normalized by the grid size, so
one encoding serves every image size. Each position's vector has norm
sqrt(dim / 2).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def grid_coords(
    grid_h: int, grid_w: int, device: torch.device | None = None, dtype=torch.float32
) -> torch.Tensor:
    """(h*w, 2) patch-centre coordinates (y, x) in [-1, 1], row-major."""
    ys = (torch.arange(grid_h, device=device, dtype=dtype) + 0.5) / grid_h * 2 - 1
    xs = (torch.arange(grid_w, device=device, dtype=dtype) + 0.5) / grid_w * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)


class RandomFourierPosEmbed(nn.Module):
    """Random-Fourier features of the patch grid, (1, h*w, dim).

    Args:
        dim: output dimension (even).
        scale: standard deviation of the Gaussian frequencies (cycles per unit
            of the [-1, 1] coordinate range).
    """

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"RandomFourierPosEmbed: dim must be even, got {dim}")
        self.dim = dim
        self.scale = scale
        # A buffer, saved with the model: the encoding is part of the trained decoder.
        self.register_buffer("freqs", torch.randn(2, dim // 2) * scale)

    def forward(self, grid_h: int, grid_w: int) -> torch.Tensor:
        coords = grid_coords(grid_h, grid_w, self.freqs.device)
        proj = 2 * math.pi * coords @ self.freqs.float()
        return torch.cat([proj.sin(), proj.cos()], dim=-1).unsqueeze(0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}"


def token_grid(n: int, grid_size: tuple[int, int] | None, what: str = "tokens") -> tuple[int, int]:
    """The (h, w) grid that n row-major tokens lie on: `grid_size`, checked, or the square."""
    if grid_size is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} {what} are not a square grid; pass grid_size=(h, w)")
        return side, side
    h, w = grid_size
    if h * w != n:
        raise ValueError(f"grid_size {tuple(grid_size)} does not hold {n} {what}")
    return h, w
