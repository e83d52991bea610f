"""The MaskGIT-VQGAN image tokenizer: the VQ reconstruction target of STELLAR's main recipe.

A convolutional encoder maps an image (B, 3, H, W) in [0, 1] (no normalization) to a
(B, 256, H/16, W/16) grid, each cell is replaced by the index of its nearest codebook
vector (1024 entries of 256, Euclidean distance), and a convolutional decoder maps the
codebook vectors back to the image. The architecture is VQGAN's without its non-local
layers:

- five resolution levels with channel multipliers (1, 1, 2, 2, 4) of 128 channels, two
  residual blocks per level; the encoder average-pools by 2 after every level but the
  last (16x in all), the decoder upsamples (nearest neighbour, then a 3x3 convolution)
  before every level but the first;
- a residual block is GroupNorm (32 groups, eps 1e-6), SiLU, 3x3 convolution, twice
  (no biases). Where it changes the channel count, its 1x1 shortcut convolution maps the
  block's own output, not its input, and the input is dropped: the released weights were
  trained that way, so it is kept;
- every convolution pads "same" (stride 1, odd kernels: symmetric zero padding).

Parameter names follow the released checkpoint (`maskgit-vqgan-imagenet-f16-256.bin`, a
`torch.save`d state dict): `encoder.*`, `decoder.*` and `quantize.embedding.weight`, so
`MaskGITVQGAN.from_file` loads it strictly. The module is frozen and in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..layers import token_grid

PATCH = 16
"""Image pixels per code along each side (four 2x poolings)."""
CODEBOOK_SIZE = 1024
"""Entries of the released tokenizer's codebook."""


def _conv(cin: int, cout: int, kernel: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = _conv(cin, cout, 3, bias=False)
        self.norm2 = _norm(cout)
        self.conv2 = _conv(cout, cout, 3, bias=False)
        # Applied to the block's output where the channel count changes (module docstring).
        self.nin_shortcut = _conv(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(h))


class Level(nn.Module):
    """The residual blocks of one resolution, then the change of resolution (if any)."""

    def __init__(self, cin: int, cout: int, blocks: int, resample: str | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResidualBlock(cin if i == 0 else cout, cout) for i in range(blocks)
        )
        self.resample = resample
        if resample == "up":
            self.upsample_conv = _conv(cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.resample == "down":
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
        elif self.resample == "up":
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class VQEncoder(nn.Module):
    def __init__(self, hidden: int, mult: tuple[int, ...], blocks: int, z_channels: int) -> None:
        super().__init__()
        widths = [hidden * m for m in mult]
        self.conv_in = _conv(3, hidden, 3, bias=False)
        last = len(mult) - 1
        self.down = nn.ModuleList(
            Level(
                hidden if i == 0 else widths[i - 1],
                widths[i],
                blocks,
                None if i == last else "down",
            )
            for i in range(len(mult))
        )
        self.mid = nn.ModuleList(ResidualBlock(widths[-1], widths[-1]) for _ in range(blocks))
        self.norm_out = _norm(widths[-1])
        self.conv_out = _conv(widths[-1], z_channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)
        for level in self.down:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VQDecoder(nn.Module):
    def __init__(self, hidden: int, mult: tuple[int, ...], blocks: int, z_channels: int) -> None:
        super().__init__()
        widths = [hidden * m for m in mult]
        last = len(mult) - 1
        self.conv_in = _conv(z_channels, widths[-1], 3)
        self.mid = nn.ModuleList(ResidualBlock(widths[-1], widths[-1]) for _ in range(blocks))
        # up[i] works at level i's resolution; they run from the coarsest (last) to the finest.
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, last)], widths[i], blocks, None if i == 0 else "up")
            for i in range(len(mult))
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = _conv(widths[0], 3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Codebook(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / size, 1.0 / size)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest entry (Euclidean) for each vector of z (M, dim): (M,) int64.

        ||z - e||^2 is formed as ||z||^2 + ||e||^2 - 2 z.e, the form the released tokenizer
        was run with, so that near ties round the same way."""
        e = self.embedding.weight
        dist = torch.addmm(
            z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None, :], z, e.t(), alpha=-2.0
        )
        return dist.argmin(dim=1)


class MaskGITVQGAN(nn.Module):
    """The MaskGIT-VQGAN tokenizer (module docstring); `from_file` loads released weights.

    Args:
        hidden_channels, channel_mult, num_res_blocks, z_channels, codebook_size: the
            architecture; the defaults are the released tokenizer's.
    """

    def __init__(
        self,
        hidden_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        codebook_size: int = CODEBOOK_SIZE,
    ) -> None:
        super().__init__()
        if len(channel_mult) != 5:
            raise ValueError(f"channel_mult: five levels (16x downsampling), got {channel_mult}")
        args = (hidden_channels, tuple(channel_mult), num_res_blocks, z_channels)
        self.encoder = VQEncoder(*args)
        self.decoder = VQDecoder(*args)
        self.quantize = Codebook(codebook_size, z_channels)
        self.codebook_size = codebook_size
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> MaskGITVQGAN:
        """Stays in eval mode: the tokenizer is frozen (a parent's .train() leaves it so)."""
        return super().train(False)

    @classmethod
    def from_file(cls, path: str | Path, **architecture) -> MaskGITVQGAN:
        """The tokenizer with the weights of a local `torch.save`d state dict, loaded
        strictly; CheckpointError names every missing, unexpected or mis-shaped key."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"VQ tokenizer checkpoint {path}: no such file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and EOF errors of a damaged file
            raise CheckpointError(f"VQ tokenizer checkpoint {path}: not readable ({err})") from err
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise CheckpointError(
                f"VQ tokenizer checkpoint {path}: not a state dict of tensors (the released "
                "maskgit-vqgan-imagenet-f16-256.bin is one)"
            )
        model = cls(**architecture)
        expected = model.state_dict()
        problems = []
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shaped = sorted(
            f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
            for k in set(expected) & set(state)
            if state[k].shape != expected[k].shape
        )
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", shaped),
        ):
            if keys:
                shown = ", ".join(keys[:6]) + (
                    f", ... ({len(keys)} in all)" if len(keys) > 6 else ""
                )
                problems.append(f"{what} keys: {shown}")
        if problems:
            raise CheckpointError(
                f"VQ tokenizer checkpoint {path} does not fit MaskGIT-VQGAN: " + "; ".join(problems)
            )
        model.load_state_dict(state, strict=True)
        return model

    @staticmethod
    def _check(images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = (
                tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            )
            raise ValueError(f"images: expected (B, 3, H, W), got {shape}")
        if images.shape[-1] % PATCH or images.shape[-2] % PATCH:
            raise ValueError(
                f"images: H and W must be multiples of {PATCH}, got {tuple(images.shape[-2:])}"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Codes (B, H/16 * W/16) int64, row-major, of images (B, 3, H, W) in [0, 1]."""
        self._check(images)
        z = self.encoder(images.to(self.quantize.embedding.weight.dtype))
        b, c, h, w = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, c)).view(b, h * w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Images (B, 3, 16 h, 16 w) clamped to [0, 1] from codes (B, h * w) laid out
        row-major on `grid_size` = (h, w) (default: square)."""
        if codes.dim() != 2 or codes.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"codes: expected (B, L) integers, got {codes.dtype} {tuple(codes.shape)}"
            )
        b, n = codes.shape
        h, w = token_grid(n, grid_size, "codes")
        z = self.quantize.embedding(codes.long()).view(b, h, w, -1).permute(0, 3, 1, 2)
        return self.decoder(z).clamp(0.0, 1.0)
