"""Presets (YAML under stellar/configs) and key=value overrides.

A preset holds every hyper-parameter of a run. `key=value` overrides any of
them by dotted path (model.num_tokens=8, loss.koleo=0, data.global_scale=[0.5,1]);
values are parsed as YAML. An unknown key is an error, except under the
open mapping model.vit_kwargs. `validate` checks every value against the schema
(`schema.py`: type and range of each key, and the settings against each other).
"""

from __future__ import annotations

import copy
import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .schema import ConfigError, all_keys, check_config

_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

PRESETS = ("tiny", "base", "large", "huge", "base_random_prior", "base_release")
OPEN_KEYS = ("model.vit_kwargs",)
# Keys that may differ between a run and its resumption: they do not change the result.
RESUME_EXEMPT = (
    "kernels",
    "init",
    "init_required",  # only decides whether a new run may start without init
    "data.num_workers",
    "data.source",
    "train.device",
    "train.log_every",
    "train.ckpt_every",
    "train.progress",
    "train.tensorboard",
    "train.compile",
)
# What a run saved before a key existed did (every key with a schema default was added after
# the first presets, so each is here): resuming compares its checkpoint's configuration,
# which lacks the key, with these values. For the four keys of the public recipe they are the
# earlier recipe, not the schema's defaults (the public recipe's), so that such a run resumes
# only as it trained (set the key to this value to resume it).
BEFORE_THE_KEY: dict[str, Any] = {
    "model.head.normalize_prototypes": True,
    "model.recon_target": "pixels",
    "model.vq_checkpoint": None,
    "loss.recon_vq": 0.05,
    "loss.sk_eps": 1e-8,  # stellar_kernels.sinkhorn_knopp's default then
    "loss.views": "pooled",
    "data.masked_views": "copies",
    "data.masking": "focal",
    "data.focal_prob": 0.5,
    "data.mask_sigma_range": [0.1, 0.5],
    "train.tensorboard": False,
    "train.compile": False,
    # Issue 27: the released configuration's readings became keys; runs from before them
    # trained with the paper's reading, which every preset but base_release keeps.
    "init_required": False,
    "data.blur_sigma_scaled": True,
    "data.photometric_draw": "image",
    "train.lr_scaling": "batch",
    "train.lr_schedule": "cosine",
    "train.weight_decay_groups": "exempt",
}


def preset_path(name: str) -> Path:
    return Path(str(resources.files("stellar") / "configs" / f"{name}.yaml"))


def load_preset(name: str) -> dict:
    """The configuration of a preset name (`PRESETS`) or of a YAML file path."""
    path = Path(name)
    if name in PRESETS:
        path = preset_path(name)
    elif not path.is_file():
        raise ConfigError(f"unknown preset {name!r}: choose one of {PRESETS} or a YAML file")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not a readable YAML file ({err})") from err
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a mapping of configuration keys")
    return cfg


def _all_keys(cfg: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict):
            out += _all_keys(v, key + ".")
    return out


def set_key(cfg: dict, dotted: str, value: Any) -> None:
    """Sets cfg[a][b][c] = value for dotted = "a.b.c"; the key must exist (or sit under OPEN_KEYS)."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        parent = ".".join(parts[:i])
        last = i == len(parts) - 1
        if part not in node and parent not in OPEN_KEYS and path not in all_keys():
            close = difflib.get_close_matches(dotted, _all_keys(cfg), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown configuration key {dotted!r}{hint}")
        if last:
            node[part] = value
        else:
            if node.get(part) is None and (parent in OPEN_KEYS or path in all_keys()):
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"{path!r} is a value, not a section (in {dotted!r})")
            node = node[part]


def get_key(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """A copy of cfg with each "key=value" applied (value parsed as YAML)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        try:
            value = parse_value(text)
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{key.strip()}: {text!r} is not a YAML value ({problem})") from err
        set_key(cfg, key.strip(), value)
    return cfg


def parse_value(text: str) -> Any:
    """An override's value as YAML, except that "1e-2" is a float (YAML 1.1 wants "1.0e-2")."""
    if not text.strip():
        return None
    return _exponent_floats(yaml.safe_load(text))


def _exponent_floats(value: Any) -> Any:
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_exponent_floats(v) for v in value]
    return value


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in OPEN_KEYS:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differences(old: dict, new: dict, exempt: tuple[str, ...] = RESUME_EXEMPT) -> list[str]:
    """Lines "key: old -> new" for the keys whose values differ (ignoring `exempt`)."""
    a, b = flatten(old), flatten(new)
    for key, value in BEFORE_THE_KEY.items():  # a key newer than `old`: what `old` did
        a.setdefault(key, value)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key in exempt:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def validate(cfg: dict) -> None:
    """Checks every value against the schema, and the settings against each other (widening
    ints to floats in place, a true/false loss weight to the term's default weight or 0);
    ConfigError names the keys."""
    checked = check_config(cfg)
    cfg.clear()
    cfg.update(checked)
    loss = cfg["loss"]
    weights = {"recon": 10.0, "recon_vq": 0.05, "koleo": 0.1}
    for name in ("recon", "recon_vq", "cluster", "align", "cls", "koleo"):
        if isinstance(loss[name], bool):  # true/false: the term at its default weight, or off
            loss[name] = float(loss[name]) * weights.get(name, 1.0)
