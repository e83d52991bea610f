"""A minute STELLAR configuration for tests and smoke checks (a training step in well under 1 s)."""

from __future__ import annotations

from .train.config import apply_overrides, load_preset

MINI_OVERRIDES = [
    "model.img_size=32",
    "model.num_tokens=4",
    "model.vit_kwargs={depth: 1}",
    "model.decoder={dim: 32, depth: 1, num_heads: 2, mlp_dim: 64, fourier_scale: 1.0}",
    "model.head={hidden_dim: 64, bottleneck_dim: 32, num_prototypes: 32}",
    "data.image_size=40",
    "data.global_size=32",
    "data.local_size=16",
    "data.num_images=64",
    "train.batch_size=4",
    "train.total_steps=20",
    "train.warmup_steps=2",
    "train.progress=false",
    "train.device=cpu",
]


def mini_config(*overrides: str, teacher: str = "ema") -> dict:
    """The tiny preset shrunk to a 1-block ViT on 32-pixel images, with `overrides` applied."""
    cfg = apply_overrides(load_preset("tiny"), MINI_OVERRIDES + list(overrides))
    cfg["teacher"]["mode"] = teacher
    return cfg


def mini_model_kwargs() -> dict:
    return dict(mini_config()["model"])
