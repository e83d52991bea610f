"""Loading a trained STELLAR model from a run directory, a checkpoint or a safetensors export."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .stellar import Stellar

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "model.safetensors"


def load(
    path: str | Path, device: str | torch.device = "cpu", kernels: str | None = None
) -> Stellar:
    """An eval-mode Stellar model from `path`.

    `path` is a run directory (its model.safetensors, else its checkpoint.pt),
    a training checkpoint (.pt) or a weights export (.safetensors, whose
    metadata holds the configuration).
    """
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_NAME, CHECKPOINT_NAME):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor {CHECKPOINT_NAME}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path}: no 'config' in the safetensors metadata")
        config = json.loads(meta["config"])
        state = load_file(str(path))
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
            raise ValueError(f"{path} is not a STELLAR checkpoint (no 'config' and 'model')")
        config, state = ckpt["config"], ckpt["model"]
    model = Stellar.from_config(config["model"], kernels=kernels)
    model.load_state_dict(state)
    return model.to(device).eval()
