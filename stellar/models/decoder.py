"""The pixel decoder: low-rank features (B, N, D) back to the image (B, 3, H, W).

Linear D -> dim, plus a 2-D random-Fourier positional encoding, a few ViT
blocks, LayerNorm, and a transposed convolution with kernel = stride = patch
size that turns each token into its patch of pixels. The paper's decoder is
dim 512, 6 blocks, 8 heads, MLP 2048.

With `num_codes` (the VQ target) the last layer is instead Linear(dim, num_codes): each
token's logits over the codes of a VQ tokenizer (B, N, num_codes).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..layers import RandomFourierPosEmbed, token_grid


class PixelDecoder(nn.Module):
    def __init__(
        self,
        in_dim: int,
        patch_size: int,
        dim: int = 512,
        depth: int = 6,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        fourier_scale: float = 1.0,
        out_chans: int = 3,
        num_codes: int | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed = nn.Linear(in_dim, dim)
        self.pos_embed = RandomFourierPosEmbed(dim, scale=fourier_scale)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio=mlp_dim / dim, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.num_codes = num_codes
        if num_codes is None:
            self.pixel_head = nn.ConvTranspose2d(
                dim, out_chans, kernel_size=patch_size, stride=patch_size
            )
        else:
            self.code_head = nn.Linear(dim, num_codes)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Decodes x (B, N, D) laid out row-major on `grid_size` (default: square) to
        (B, 3, H, W), or with num_codes to code logits (B, N, num_codes)."""
        b, n, _ = x.shape
        h, w = token_grid(n, grid_size)
        x = self.embed(x) + self.pos_embed(h, w).to(x.dtype)
        x = self.blocks(x)
        x = self.norm(x)
        if self.num_codes is not None:
            return self.code_head(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        return self.pixel_head(x)
