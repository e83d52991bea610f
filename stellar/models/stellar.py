"""The STELLAR model: encoder with latent queries, factorized latent, decoder, clustering heads.

    model = Stellar(arch="vit_base_patch16_224", num_tokens=16)
    out = model.encode(images)        # images (B, 3, H, W) in [0, 1]
    out["sparse"]   (B, K, D)  the sparse semantic tokens S ("what")
    out["spatial"]  (B, N, K)  the localization matrix A ("where"), rows sum to 1
    out["cls"]      (B, 1, D)  the class token
    out["dense"]    (B, N, D)  the ViT's patch tokens
    out["lowrank"]  (B, N, D)  A @ S, the low-rank feature map the decoder reads
    images = model.reconstruct(images)  # or model.reconstruct(out), in [0, 1]

ImageNet normalization happens inside the model. A model trained with the VQ target
(recon_target="vq") predicts MaskGIT-VQGAN codes; `reconstruct` decodes the most likely
code of each patch through that tokenizer (loaded from vq_checkpoint on first use).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import stellar_kernels as sk

from ..errors import ConfigError
from ..layers import token_grid
from .decoder import PixelDecoder
from .encoder import EncoderOutput, SparseViTEncoder
from .heads import ClusteringHead
from .vq import CODEBOOK_SIZE, MaskGITVQGAN
from .vq import PATCH as VQ_PATCH

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
        recon_target: "pixels" (the decoder predicts each patch's pixels) or "vq" (its code
            among the 1024 of a MaskGIT-VQGAN tokenizer).
        vq_checkpoint: the tokenizer's file (recon_target="vq"), read by `reconstruct`.
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
        recon_target: str = "pixels",
        vq_checkpoint: str | None = None,
        kernels: str | None = None,
    ) -> None:
        super().__init__()
        if recon_target not in ("pixels", "vq"):
            raise ValueError(f"recon_target: 'pixels' or 'vq', got {recon_target!r}")
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
                "recon_target": recon_target,
                "vq_checkpoint": vq_checkpoint,
            }
        )
        self.recon_target = recon_target
        self._tokenizer: list[MaskGITVQGAN] = []  # a list: kept out of the module's state
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
        codes = CODEBOOK_SIZE if recon_target == "vq" else None
        self.decoder = PixelDecoder(dim, self.patch_size, **self.config["decoder"], num_codes=codes)
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
        """Decoder output: (B, 3, H, W), not clamped (the training target is the [0, 1]
        image), or with the VQ target code logits (B, N, 1024)."""
        return self.decoder(lowrank, grid_size)

    # ------------------------------------------------------------------ the VQ target

    @property
    def tokenizer(self) -> MaskGITVQGAN:
        """The VQ tokenizer of a recon_target="vq" model, read from vq_checkpoint on first use."""
        if self.recon_target != "vq":
            raise ValueError("this model reconstructs pixels; it has no VQ tokenizer")
        if not self._tokenizer:
            path = self.config["vq_checkpoint"]
            if not path:  # a preset may name the vq target without the file (base_release)
                raise ConfigError(
                    "model.vq_checkpoint names no file, and the vq target's tokenizer is read "
                    "from it: model.vq_checkpoint=FILE (maskgit-vqgan-imagenet-f16-256.bin)"
                )
            self._tokenizer.append(MaskGITVQGAN.from_file(path))
        return self._tokenizer[0]

    def set_tokenizer(self, tokenizer: MaskGITVQGAN) -> None:
        """Uses `tokenizer` (e.g. the training's own instance) instead of reading the file."""
        self._tokenizer[:] = [tokenizer]

    def vq_targets(self, images: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """The tokenizer's codes (B, h * w) of images for a patch grid (h, w): the image is
        resized (bicubic) to 16 h x 16 w first where the grids differ (patch size not 16)."""
        tok = self.tokenizer.to(images.device)
        size = (grid_size[0] * VQ_PATCH, grid_size[1] * VQ_PATCH)
        x = images.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        with torch.autocast(images.device.type, enabled=False):  # argmin distances in float32
            return tok.encode(x)

    def decode_codes(self, codes: torch.Tensor, grid_size: tuple[int, int], size) -> torch.Tensor:
        """Images (B, 3, *size) in [0, 1] from codes (B, N) through the tokenizer, resized
        to `size` where it differs."""
        tok = self.tokenizer.to(codes.device)
        with torch.autocast(codes.device.type, enabled=False):
            images = tok.decode(codes, grid_size)
        if tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=tuple(size), mode="bicubic", align_corners=False)
        return images.clamp(0.0, 1.0)

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
        if self.recon_target == "vq":
            grid_size = token_grid(x["lowrank"].shape[1], grid_size)
            size = (grid_size[0] * self.patch_size, grid_size[1] * self.patch_size)
            codes = self.decode(x["lowrank"], grid_size).argmax(-1)  # the most likely code
            return self.decode_codes(codes, grid_size, size)
        return self.decode(x["lowrank"], grid_size).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encode(images)


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor (B, 3, H, W) in [0, 1], got {tuple(images.shape)} "
            f"{images.dtype}"
        )
