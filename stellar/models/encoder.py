"""The STELLAR encoder: a timm ViT whose blocks also process K learnable latent queries.

The latent queries are appended after the patch tokens and pass through every
block with them; the outputs at their positions are the sparse tokens. The
position embedding is interpolated to the input's patch grid (timm's
``dynamic_img_size``), so any image size that is a multiple of the patch
size works. A masked view keeps only the patch tokens listed in `keep`
(after their position embedding is added), as MAE does.
"""

from __future__ import annotations

from typing import NamedTuple

import timm
import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# timm.create_model's arguments that the encoder sets itself, and the configuration key that
# sets each (None: fixed); model.vit_kwargs may not hold them.
RESERVED_VIT_KWARGS: dict[str, str | None] = {
    "img_size": "model.img_size",
    "patch_size": "model.patch_size",
    "drop_path_rate": "model.drop_path",
    "num_classes": None,
    "dynamic_img_size": None,
    "pretrained": None,
}


class EncoderOutput(NamedTuple):
    cls: torch.Tensor
    """(B, 1, D) the class token after the final norm."""
    dense: torch.Tensor
    """(B, N, D) patch tokens after the final norm (N kept patches for a masked view)."""
    sparse: torch.Tensor
    """(B, K, D) the latent queries' outputs after the final norm."""


def create_vit(
    arch: str,
    img_size: int,
    patch_size: int | None = None,
    drop_path: float = 0.0,
    vit_kwargs: dict | None = None,
) -> nn.Module:
    """The timm model the encoder wraps (on the current default device: the configuration's
    check builds it on the meta device, without memory or initialization time)."""
    kwargs = dict(vit_kwargs or {})
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    return timm.create_model(
        arch,
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        dynamic_img_size=True,
        drop_path_rate=drop_path,
        **kwargs,
    )


def unusable_vit(vit: nn.Module) -> str | None:
    """Why the encoder cannot run `vit` (None when it can): `forward` calls
    VisionTransformer's patch embedding, position embedding and blocks, and reads the class
    token from the first position."""
    if not isinstance(vit, VisionTransformer):
        return f"{type(vit).__name__} is not a timm VisionTransformer"
    if getattr(vit, "cls_token", None) is None:
        return "it has no class token"
    in_chans = getattr(getattr(vit.patch_embed, "proj", None), "in_channels", 3)
    if in_chans != 3:
        return f"it takes {in_chans} input channels, not the 3 of an RGB image"
    return None


class SparseViTEncoder(nn.Module):
    """A timm ViT plus K latent queries.

    Args:
        arch: a timm VisionTransformer name (vit_base_patch16_224, ...).
        img_size: the training image size (the position embedding's native grid).
        patch_size: overrides the architecture's patch size when given.
        num_tokens: K, the number of latent queries (sparse tokens).
        drop_path: stochastic depth rate.
        grad_checkpointing: recompute the blocks in the backward pass (saves memory).
        vit_kwargs: extra keyword arguments of timm.create_model (depth, embed_dim, ...).
    """

    def __init__(
        self,
        arch: str = "vit_base_patch16_224",
        img_size: int = 224,
        patch_size: int | None = None,
        num_tokens: int = 16,
        drop_path: float = 0.0,
        grad_checkpointing: bool = False,
        vit_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.vit = create_vit(arch, img_size, patch_size, drop_path, vit_kwargs)
        if (why := unusable_vit(self.vit)) is not None:
            raise ValueError(f"{arch}: the STELLAR encoder cannot run it: {why}")
        self.embed_dim = self.vit.embed_dim
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.num_tokens = num_tokens
        self.grad_checkpointing = grad_checkpointing
        self.latent_queries = nn.Parameter(torch.zeros(1, num_tokens, self.embed_dim))
        nn.init.trunc_normal_(self.latent_queries, std=0.02)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> EncoderOutput:
        """Encodes normalized images x (B, 3, H, W); `keep` (B, n) lists the patches to keep."""
        self.grid_size(x.shape[-2], x.shape[-1])
        vit = self.vit
        tokens = vit.patch_embed(x)  # (B, h, w, D) with dynamic_img_size
        tokens = vit._pos_embed(tokens)  # prefix tokens + patches, position embedding added
        prefix = tokens[:, : self.num_prefix_tokens]
        patches = tokens[:, self.num_prefix_tokens :]
        if keep is not None:
            patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        n = patches.shape[1]
        queries = self.latent_queries.expand(x.shape[0], -1, -1).to(patches.dtype)
        tokens = torch.cat([prefix, patches, queries], dim=1)
        tokens = vit.norm_pre(tokens)
        if self.grad_checkpointing and torch.is_grad_enabled():
            tokens = checkpoint_seq(vit.blocks, tokens)
        else:
            tokens = vit.blocks(tokens)
        tokens = vit.norm(tokens)
        p = self.num_prefix_tokens
        return EncoderOutput(
            cls=tokens[:, :1],
            dense=tokens[:, p : p + n],
            sparse=tokens[:, p + n :],
        )
