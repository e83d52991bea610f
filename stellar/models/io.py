"""Loading a trained STELLAR model from a run directory, a checkpoint or a safetensors export."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, reason
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
    config, state = read_run_file(path)
    try:
        model = Stellar.from_config(config["model"], kernels=kernels)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: does not fit a STELLAR model ({reason(err)})") from err
    return model.to(device).eval()


def read_run_file(path: Path) -> tuple[dict, dict]:
    """(configuration, student weights) from a checkpoint.pt or a model.safetensors."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({reason(err)})"
            ) from err
        if "config" not in meta:
            raise CheckpointError(
                f"{path}: no 'config' in the safetensors metadata (not a STELLAR export)"
            )
        try:
            config = json.loads(meta["config"])
        except ValueError as err:
            raise CheckpointError(
                f"{path}: its 'config' metadata is not JSON ({reason(err)})"
            ) from err
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and EOF errors of a damaged or foreign file
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({reason(err)})"
            ) from err
        if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
            raise CheckpointError(f"{path}: not a STELLAR checkpoint (no 'config' and 'model')")
        config, state = ckpt["config"], ckpt["model"]
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path}: its configuration has no 'model' section")
    return config, state
