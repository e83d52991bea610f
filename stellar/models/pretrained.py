"""Initializing the encoder's ViT from MAE-pretrained weights in a local file.

Accepts a timm ViT state dict or an original MAE checkpoint ({"model": ...},
with the MAE decoder's keys, which are ignored), as .pth/.pt (loaded with
weights_only=True) or .safetensors. The position embedding is resampled to
the model's patch grid and the patch embedding to its patch size when they
differ. Anything else that does not fit raises ValueError listing the
missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

from ..errors import CheckpointError, reason

WRAPPER_KEYS = ("model", "state_dict", "module", "encoder")
STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.vit.", "encoder.", "vit.")
# Keys of an MAE checkpoint that are not part of the ViT encoder.
IGNORED_PREFIXES = ("decoder", "mask_token", "head.", "fc_norm.", "head_drop.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint file, unwrapped from {"model": ...} and similar."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init: no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, EOF or safetensors errors of a damaged file
        raise CheckpointError(
            f"--init: {path} is not a readable checkpoint ({reason(err)})"
        ) from err
    for _ in range(3):
        if not isinstance(state, dict):
            break
        wrapped = [k for k in WRAPPER_KEYS if isinstance(state.get(k), dict)]
        if not wrapped or any(isinstance(v, torch.Tensor) for v in state.values()):
            break
        state = state[wrapped[0]]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--init: {path} does not hold a state dict of tensors")
    return state


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _ranges(numbers: list[int]) -> str:
    numbers = sorted(set(numbers))
    parts, start = [], numbers[0]
    for a, b in zip(numbers, numbers[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


def _summary(keys: list[str]) -> str:
    """Every key, with block numbers folded: blocks.{0-11}.attn.qkv.weight."""
    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for key in keys:
        head, _, rest = key.partition(" ")
        parts = head.split(".")
        idx = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if idx is None or rest:
            pattern, number = key, None
        else:
            pattern = ".".join(parts[:idx] + ["{}"] + parts[idx + 1 :])
            number = int(parts[idx])
        if pattern not in groups:
            groups[pattern] = []
            order.append(pattern)
        if number is not None:
            groups[pattern].append(number)
    out = []
    for p in order:
        numbers = sorted(set(groups[p]))
        if not numbers:
            out.append(p)
        elif len(numbers) == 1:
            out.append(p.replace("{}", str(numbers[0])))
        else:
            out.append(p.replace("{}", "{" + _ranges(numbers) + "}"))
    return ", ".join(out)


def load_vit_weights(vit: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Loads MAE/timm ViT weights from `path` into `vit` (a timm VisionTransformer).

    Returns {"ignored": [...]} (the MAE decoder's and classifier keys that were
    skipped). Raises ValueError naming every missing, unexpected and
    mis-shaped key when the file does not fit the architecture.
    """
    raw = read_state_dict(path)
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in raw.items():
        key = _strip(key)
        if key.startswith(IGNORED_PREFIXES):
            ignored.append(key)
            continue
        state[key] = value
    if "norm.weight" not in state and "fc_norm.weight" in raw:
        # A fine-tuned MAE with global pooling keeps its final norm as fc_norm.
        state["norm.weight"], state["norm.bias"] = raw["fc_norm.weight"], raw["fc_norm.bias"]
    own = vit.state_dict()
    if (
        "pos_embed" in state
        and "pos_embed" in own
        and state["pos_embed"].shape != own["pos_embed"].shape
    ):
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        n_old = state["pos_embed"].shape[1] - prefix
        side = int(round(n_old**0.5))
        if side * side == n_old and state["pos_embed"].shape[2] == own["pos_embed"].shape[2]:
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"].float(),
                new_size=list(vit.patch_embed.grid_size),
                old_size=[side, side],
                num_prefix_tokens=prefix,
                verbose=False,
            ).to(own["pos_embed"].dtype)
    key = "patch_embed.proj.weight"
    if key in state and key in own and state[key].shape != own[key].shape:
        old, new = state[key], own[key]
        if old.shape[:2] == new.shape[:2]:
            state[key] = resample_patch_embed(old.float(), list(new.shape[-2:])).to(new.dtype)
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mis_shaped = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    )
    if missing or unexpected or mis_shaped:
        lines = [f"--init: {path} does not fit the encoder's ViT:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_summary(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_summary(unexpected)}")
        if mis_shaped:
            lines.append(f"  keys with another shape ({len(mis_shaped)}): {_summary(mis_shaped)}")
        lines.append("  (check model.arch, model.patch_size and model.vit_kwargs against the file)")
        raise CheckpointError("\n".join(lines))
    vit.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return {"ignored": ignored}
