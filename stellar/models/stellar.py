"""The STELLAR model: encoder with latent queries, factorized latent, decoder, clustering heads.

    model = Stellar(arch="vit_base_patch16_224", num_tokens=16)
    out = model.encode(images)        # images (B, 3, H, W) in [0, 1]
    out["sparse"]   (B, K, D)  the sparse semantic tokens S ("what")
    out["spatial"]  (B, N, K)  the localization matrix A ("where"), rows sum to 1
    out["cls"]      (B, 1, D)  the class token
    out["dense"]    (B, N, D)  the ViT's patch tokens
    out["lowrank"]  (B, N, D)  A @ S, the low-rank feature map the decoder reads
    images = model.reconstruct(images)  # or model.reconstruct(out), in [0, 1]

ImageNet normalization happens inside the model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import stellar_kernels as sk

from .decoder import PixelDecoder
from .encoder import EncoderOutput, SparseViTEncoder
from .heads import ClusteringHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_DECODER = {"dim": 512, "depth": 6, "num_heads": 8, "mlp_dim": 2048, "fourier_scale": 1.0}
DEFAULT_HEAD = {"hidden_dim": 2048, "bottleneck_dim": 256, "num_prototypes": 16384}


class Stellar(nn.Module):
    """Encoder (ViT + K latent queries), projections W_d and W_s, decoder, two clustering heads.

    Args:
        arch, img_size, patch_size, num_tokens, drop_path, grad_checkpointing,
            vit_kwargs: the encoder (see SparseViTEncoder).
        spatial_temperature: softmax temperature of the localization matrix.
        decoder: PixelDecoder keyword arguments (dim, depth, num_heads, mlp_dim, fourier_scale).
        head: ClusteringHead keyword arguments of both heads (hidden_dim,
            bottleneck_dim, num_prototypes).
        kernels: stellar_kernels backend for factorize (None: the fastest for the device).
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
        spatial_temperature: float = 0.06,
        decoder: dict | None = None,
        head: dict | None = None,
        kernels: str | None = None,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = copy.deepcopy(
            {
                "arch": arch,
                "img_size": img_size,
                "patch_size": patch_size,
                "num_tokens": num_tokens,
                "drop_path": drop_path,
                "grad_checkpointing": grad_checkpointing,
                "vit_kwargs": dict(vit_kwargs or {}),
                "spatial_temperature": spatial_temperature,
                "decoder": {**DEFAULT_DECODER, **(decoder or {})},
                "head": {**DEFAULT_HEAD, **(head or {})},
            }
        )
        self.kernels = kernels
        self.spatial_temperature = spatial_temperature
        self.encoder = SparseViTEncoder(
            arch, img_size, patch_size, num_tokens, drop_path, grad_checkpointing, vit_kwargs
        )
        dim = self.encoder.embed_dim
        self.embed_dim = dim
        self.patch_size = self.encoder.patch_size
        self.num_tokens = num_tokens
        self.proj_dense = nn.Linear(dim, dim)  # W_d
        self.proj_sparse = nn.Linear(dim, dim)  # W_s
        self.decoder = PixelDecoder(dim, self.patch_size, **self.config["decoder"])
        self.sparse_head = ClusteringHead(dim, **self.config["head"])
        self.cls_head = ClusteringHead(dim, **self.config["head"])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, config: dict, kernels: str | None = None) -> Stellar:
        return cls(**copy.deepcopy(config), kernels=kernels)

    # ------------------------------------------------------------------ pieces

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def features(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> EncoderOutput:
        """Encoder outputs (cls, dense, sparse) of images (B, 3, H, W) in [0, 1]."""
        _check_images(images)
        return self.encoder(self.normalize(images), keep)

    def factorize(
        self, dense: torch.Tensor, sparse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(spatial (B, N, K), lowrank (B, N, D)) from the encoder's dense and sparse tokens."""
        d = self.proj_dense(dense)
        s = self.proj_sparse(sparse)
        if d.dtype != s.dtype:  # autocast may leave one of them in float32
            d, s = d.float(), s.float()
        # validate=False: the training loop guards the loss against NaN/Inf, and the check
        # would cost a host synchronization per forward.
        return sk.factorize(
            d,
            s,
            sparse.to(d.dtype),
            self.spatial_temperature,
            backend=self.kernels,
            validate=False,
        )

    def decode(self, lowrank: torch.Tensor, grid_size: tuple[int, int] | None = None):
        """Decoder output (B, 3, H, W), not clamped (the training target is the [0, 1] image)."""
        return self.decoder(lowrank, grid_size)

    # ------------------------------------------------------------------ public

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The factorized representation of images (B, 3, H, W) in [0, 1].

        Returns a dict with sparse (B, K, D), spatial (B, N, K), cls (B, 1, D),
        dense (B, N, D) and lowrank (B, N, D).
        """
        out = self.features(images)
        spatial, lowrank = self.factorize(out.dense, out.sparse)
        return {
            "sparse": out.sparse,
            "spatial": spatial,
            "cls": out.cls,
            "dense": out.dense,
            "lowrank": lowrank,
        }

    def reconstruct(
        self,
        x: torch.Tensor | dict[str, torch.Tensor],
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] rebuilt from the sparse tokens.

        `x` is either images (B, 3, H, W) in [0, 1] or the dict `encode`
        returned (its `lowrank` is decoded; pass `grid_size` = (h, w) for a
        non-square patch grid).
        """
        if isinstance(x, torch.Tensor):
            grid_size = self.encoder.grid_size(x.shape[-2], x.shape[-1])
            x = self.encode(x)
        return self.decode(x["lowrank"], grid_size).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encode(images)


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor (B, 3, H, W) in [0, 1], got {tuple(images.shape)} "
            f"{images.dtype}"
        )
