"""The configuration's schema: every key of a run, its type and its range, as dataclasses,
and the rules between keys.

A preset, a YAML file and every `key=value` override are checked against it before
anything is built: one `ConfigError` names the key, the value and what is allowed, or the
keys that do not fit together (`RULES`, and timm's ViT built from model.arch and
model.vit_kwargs on the meta device). A configuration the schema accepts builds a model and
trains. The configuration itself stays a plain dict (what the presets, checkpoints and the
model read); `check_config` returns a copy with ints widened to floats where a float is due.

A key with a default may be left out; every default is the value of every preset (the
public code's recipe), except in `base_release`, which sets the released configuration's
values where the other presets keep the paper's reading (the learning rate's scaling and
schedule, the decay groups, the photometric draws and the blur's scaling). A run saved
before a key existed did what `config.BEFORE_THE_KEY` says, which for four keys is the
earlier recipe, not the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Union

from stellar_kernels.localization import MAX_TRITON_K

from ..cli import DEVICE_HELP, is_device_name
from ..errors import ConfigError, reason

# A field's range: (test, words for the message).
POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
AT_LEAST_ONE = (lambda v: v >= 1, ">= 1")
FRACTION = (lambda v: 0 < v < 1, "in (0, 1)")
PROBABILITY = (lambda v: 0 <= v <= 1, "in [0, 1]")
MOMENTUM = (lambda v: 0 <= v <= 1, "in [0, 1]")
SCALE_RANGE = (lambda v: 0 < v[0] <= v[1] <= 1, "[low, high], 0 < low <= high <= 1")
ORDERED_POSITIVE = (lambda v: 0 < v[0] <= v[1], "[low, high], 0 < low <= high")
BETAS = (lambda v: all(0 <= b < 1 for b in v), "each in [0, 1)")
HUE = (lambda v: 0 <= v <= 0.5, "in [0, 0.5]")


def _is_timm_vit(name: str) -> bool:
    import timm

    return timm.is_model(name) and name.startswith(("vit_", "deit", "eva"))


ARCH = (_is_timm_vit, "naming a timm ViT (vit_tiny_patch16_224, vit_base_patch16_224, ...)")
DEVICE = (is_device_name, f"({DEVICE_HELP})")


def key(default: Any = dataclasses.MISSING, range: tuple | None = None, **kw) -> Any:
    if isinstance(default, (dict, list)):
        kw["default_factory"] = lambda d=default: type(d)(d)
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return field(metadata={"range": range}, **kw)


Weight = float | bool  # a loss weight; true/false switch the term at its default weight
Pair = tuple[float, float]


@dataclass(kw_only=True)
class DecoderConfig:
    dim: int = key(range=AT_LEAST_ONE)
    depth: int = key(range=AT_LEAST_ONE)
    num_heads: int = key(range=AT_LEAST_ONE)
    mlp_dim: int = key(range=AT_LEAST_ONE)
    fourier_scale: float = key(range=POSITIVE)


@dataclass(kw_only=True)
class HeadConfig:
    hidden_dim: int = key(range=AT_LEAST_ONE)
    bottleneck_dim: int = key(range=AT_LEAST_ONE)
    num_prototypes: int = key(range=AT_LEAST_ONE)
    # false: plain prototypes, as the public code (sharper logits); true: cosine logits
    normalize_prototypes: bool = key(False)


@dataclass(kw_only=True)
class ModelConfig:
    arch: str = key(range=ARCH)
    img_size: int = key(range=AT_LEAST_ONE)
    patch_size: int = key(range=AT_LEAST_ONE)
    num_tokens: int = key(range=AT_LEAST_ONE)
    drop_path: float = key(range=(lambda v: 0 <= v < 1, "in [0, 1)"))
    grad_checkpointing: bool = key()
    vit_kwargs: dict = key()  # passed to timm's VisionTransformer as they are
    spatial_temperature: float = key(range=POSITIVE)
    decoder: DecoderConfig = key()
    head: HeadConfig = key()
    # pixels: the decoder predicts each patch's pixels (MSE, loss.recon); vq: its code of a
    # frozen MaskGIT-VQGAN tokenizer read from vq_checkpoint (cross-entropy, loss.recon_vq)
    recon_target: Literal["pixels", "vq"] = key("pixels")
    # needed when a run with the vq target starts (`train.check_start_files`), not to check
    # or print the configuration: a preset may name the target without the local file
    vq_checkpoint: str | None = key(None)


@dataclass(kw_only=True)
class TeacherConfig:
    mode: Literal["ema", "none", "auto"] = key()
    momentum: float = key(range=MOMENTUM)
    momentum_end: float = key(range=MOMENTUM)
    ema_steps: int | None = key(range=NON_NEGATIVE)
    ema_mask_ratio: float | None = key(range=FRACTION)


@dataclass(kw_only=True)
class LossConfig:
    recon: Weight = key(range=NON_NEGATIVE)
    recon_vq: Weight = key(0.05, range=NON_NEGATIVE)  # the VQ-code cross-entropy's weight
    cluster: Weight = key(range=NON_NEGATIVE)
    align: Weight = key(range=NON_NEGATIVE)
    cls: Weight = key(range=NON_NEGATIVE)
    koleo: Weight = key(range=NON_NEGATIVE)
    sk_temperature: float = key(range=POSITIVE)
    sk_iters: int = key(range=AT_LEAST_ONE)
    # added to every column and row sum of Sinkhorn-Knopp (the public code's 1e-8); 0 gives
    # SwAV's exact normalization
    sk_eps: float = key(1e-8, range=NON_NEGATIVE)
    pred_temperature: float = key(range=POSITIVE)
    matcher: Literal["sinkhorn", "hungarian", "none"] = key()
    match_eps: float = key(range=POSITIVE)
    match_iters: int = key(range=AT_LEAST_ONE)
    match_rounding: Literal["argmax", "permutation", "hungarian"] = key()
    # per_group: the CLS term sums the means over the global view, the masked views and the
    # local crops, KoLeo sums global and masked (the public code); pooled: one mean over all
    views: Literal["per_group", "pooled"] = key("per_group")


@dataclass(kw_only=True)
class DataConfig:
    source: str = key()
    num_images: int = key(range=AT_LEAST_ONE)
    image_size: int = key(range=AT_LEAST_ONE)
    global_size: int = key(range=AT_LEAST_ONE)
    local_size: int = key(range=AT_LEAST_ONE)
    global_scale: Pair = key(range=SCALE_RANGE)
    local_scale: Pair = key(range=SCALE_RANGE)
    num_masked_views: int = key(range=NON_NEGATIVE)
    num_local_crops: int = key(range=NON_NEGATIVE)
    mask_ratio: float = key(range=FRACTION)
    # crops: each masked view its own global-scale crop (the public code); copies: masked
    # copies of the first global view
    masked_views: Literal["crops", "copies"] = key("crops")
    # mixed: random masks, a share data.focal_prob of them biased towards a random centre
    # with sigma drawn from data.mask_sigma_range (the public code); focal: every view
    # Gaussian-focal with sigma data.mask_sigma
    masking: Literal["mixed", "focal"] = key("mixed")
    focal_prob: float = key(0.5, range=PROBABILITY)
    mask_sigma_range: Pair = key([0.1, 0.5], range=ORDERED_POSITIVE)
    mask_sigma: float = key(range=POSITIVE)
    jitter_prob: float = key(range=PROBABILITY)
    brightness: float = key(range=NON_NEGATIVE)
    contrast: float = key(range=NON_NEGATIVE)
    saturation: float = key(range=NON_NEGATIVE)
    hue: float = key(range=HUE)
    grayscale_prob: float = key(range=PROBABILITY)
    blur_prob: float = key(range=PROBABILITY)
    blur_sigma: Pair = key(range=ORDERED_POSITIVE)
    # true: blur_sigma is in pixels of a 224-pixel view and scales with the view's size
    # (0.04-0.86 px on a 96-pixel crop); false: pixels at every size (the released code)
    blur_sigma_scaled: bool = key(True)
    # image: jitter, greyscale and blur drawn for each image; batch: one draw for all the
    # images of a call (the masked views, the local crops), as the released code's
    # transforms on a stacked tensor
    photometric_draw: Literal["image", "batch"] = key("image")
    num_workers: int = key(range=NON_NEGATIVE)


@dataclass(kw_only=True)
class TrainConfig:
    device: str = key(range=DEVICE)
    batch_size: int = key(range=AT_LEAST_ONE)
    total_steps: int = key(range=AT_LEAST_ONE)
    warmup_steps: int = key(range=NON_NEGATIVE)
    base_lr: float = key(range=POSITIVE)
    # batch: the rate is base_lr x global batch / lr_batch_ref (MAE's convention, the paper's
    # "base learning rate"); none: base_lr as it is (the released configuration)
    lr_scaling: Literal["batch", "none"] = key("batch")
    lr_batch_ref: int = key(range=AT_LEAST_ONE)
    # cosine: linear warm-up over warmup_steps, then cosine to min_lr; constant: the rate
    # throughout, warmup_steps and min_lr unused (the released configuration has no scheduler)
    lr_schedule: Literal["cosine", "constant"] = key("cosine")
    min_lr: float = key(range=NON_NEGATIVE)
    weight_decay: float = key(range=NON_NEGATIVE)
    # exempt: no decay on 1-D parameters, the position embedding, the CLS token, the latent
    # queries and the prototypes; all: one group, decay on every parameter (the released code)
    weight_decay_groups: Literal["exempt", "all"] = key("exempt")
    betas: Pair = key(range=BETAS)
    clip_grad: float = key(range=POSITIVE)
    amp: Literal["bf16", "none"] = key()
    log_every: int = key(range=AT_LEAST_ONE)
    ckpt_every: int = key(range=AT_LEAST_ONE)
    progress: bool = key()
    tensorboard: bool = key(False)  # TensorBoard event files beside metrics.jsonl
    compile: bool = key(False)  # torch.compile the encoders and the decoder


@dataclass(kw_only=True)
class Config:
    seed: int = key(range=NON_NEGATIVE)
    kernels: Literal["torch", "triton"] | None = key()
    init: str | None = key()
    # true: a new run stops unless init names a file (the recipe starts the encoder from an
    # MAE checkpoint); checked when training starts: the configuration prints without the file
    init_required: bool = key(False)
    model: ModelConfig = key()
    teacher: TeacherConfig = key()
    loss: LossConfig = key()
    data: DataConfig = key()
    train: TrainConfig = key()


# ----------------------------------------------------------------------------- checking


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        words = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    if origin is tuple:
        return "a list of two numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind, "a mapping" if kind is dict else str(kind)
    )


def _expected(kind: Any, allowed: tuple | None) -> str:
    """What a key takes, in words: "an integer >= 1", "a number >= 0, or true or false"."""
    union = typing.get_origin(kind) in (Union, types.UnionType)
    args = typing.get_args(kind) if union else (kind,)
    main, *rest = [a for a in args if a is not type(None)]
    words = _describe(main) + (f" {allowed[1]}" if allowed else "")
    extras = [_describe(a) for a in rest] + (["null"] if type(None) in args else [])
    return words + "".join(f", or {e}" for e in extras)


def _convert(kind: Any, value: Any) -> tuple[bool, Any]:
    """(fits, value as the schema keeps it)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return value in args, value
    if origin in (Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                if value is None:
                    return True, None
                continue
            fits, converted = _convert(arg, value)
            if fits:
                return True, converted
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, value
        items = [_convert(a, v) for a, v in zip(args, value)]
        return all(ok for ok, _ in items), [v for _, v in items]
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value), float(value) if number else value
    if kind is str:
        return isinstance(value, str), value
    if kind is dict:
        return isinstance(value, dict), value
    raise TypeError(f"schema type {kind!r} is not handled")


def _unknown(name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown configuration key {name!r}{hint}")


@functools.cache
def all_keys(schema: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key the schema declares (sections included)."""
    out: list[str] = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += all_keys(hints[f.name], f"{prefix}{f.name}.")
    return tuple(out)


def defaults(schema: type = Config, prefix: str = "") -> dict:
    """{dotted key: default} of the keys that have one (those added after the first presets:
    a configuration written before them means their default)."""
    out = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(defaults(hints[f.name], f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[prefix + f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[prefix + f.name] = f.default_factory()
    return out


def _check_section(schema: type, values: Any, prefix: str) -> dict:
    where = prefix.rstrip(".") or "the configuration"
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for name in values:
        if name not in fields:
            raise _unknown(prefix + str(name), all_keys())
    out = {}
    for name, f in fields.items():
        dotted, kind = prefix + name, hints[name]
        if name not in values:
            if f.default is not dataclasses.MISSING:
                out[name] = f.default
                continue
            if f.default_factory is not dataclasses.MISSING:
                out[name] = f.default_factory()
                continue
            raise ConfigError(f"{dotted} is missing ({_describe(kind)} expected)")
        value = values[name]
        if dataclasses.is_dataclass(kind):
            out[name] = _check_section(kind, value, dotted + ".")
            continue
        fits, converted = _convert(kind, value)
        allowed = f.metadata.get("range")
        if (
            fits
            and allowed is not None
            and converted is not None
            and not isinstance(converted, bool)
        ):
            fits = bool(allowed[0](converted))
        if not fits:
            raise ConfigError(
                f"{dotted}: {value!r} is not allowed; expected {_expected(kind, allowed)}"
            )
        out[name] = converted
    return out


def check_config(cfg: Any) -> dict:
    """A checked copy of `cfg`; ConfigError naming the first key that does not fit, alone
    or with the others (`RULES`, then the encoder's timm ViT)."""
    checked = _check_section(Config, cfg, "")
    check_rules(checked)
    check_vit(checked["model"])
    return checked


# ----------------------------------------------------------------------------- between keys


class Rule(NamedTuple):
    """Values of `keys` that fit together when `holds(*values)`; otherwise the message is
    `says` with {0}, {1}, ... each replaced by "key (value)", and `why` after a colon."""

    keys: tuple[str, ...]
    holds: Callable[..., bool]
    says: str
    why: str


def _weight(value: float | bool) -> bool:
    return bool(value)  # true/false switch a term on at its default weight, or off


# Each rule names the key to change first. Every limit here is one the model or the
# training step would otherwise meet as an exception deep inside (timm's attention, the
# decoder's position encoding, the encoder's patch grid, KoLeo, the Triton kernels).
RULES: tuple[Rule, ...] = (
    Rule(
        ("model.decoder.num_heads", "model.decoder.dim"),
        lambda heads, dim: dim % heads == 0,
        "{0} does not divide {1}",
        "each attention head takes dim / num_heads channels",
    ),
    Rule(
        ("model.decoder.dim",),
        lambda dim: dim % 2 == 0,
        "{0} is odd",
        "the decoder's Fourier position encoding has a sine and a cosine per frequency",
    ),
    Rule(
        ("model.img_size", "model.patch_size"),
        lambda size, patch: size % patch == 0,
        "{0} is not a multiple of {1}",
        "the encoder cuts an image into whole patches (evaluation encodes at model.img_size)",
    ),
    Rule(
        ("data.global_size", "model.patch_size"),
        lambda size, patch: size % patch == 0,
        "{0} is not a multiple of {1}",
        "the encoder cuts a view into whole patches",
    ),
    Rule(
        ("data.local_size", "model.patch_size"),
        lambda size, patch: size % patch == 0,
        "{0} is not a multiple of {1}",
        "the encoder cuts a view into whole patches",
    ),
    Rule(
        ("data.num_masked_views", "loss.align"),
        lambda views, align: views >= 1 or not _weight(align),
        "{0} leaves {1} nothing to align",
        "the alignment term matches the masked views' tokens; set loss.align=0 or "
        "data.num_masked_views >= 1",
    ),
    Rule(
        ("model.num_tokens", "loss.koleo"),
        lambda k, koleo: k >= 2 or not _weight(koleo),
        "{0} is too few for {1}",
        "KoLeo spreads each image's tokens by their nearest neighbour, so it needs 2 or "
        "more; set loss.koleo=0 or model.num_tokens >= 2",
    ),
    Rule(
        ("model.num_tokens", "kernels"),
        lambda k, kernels: kernels != "triton" or k <= MAX_TRITON_K,
        "{0} is more than {1} takes",
        f"the Triton factorize kernel takes K <= {MAX_TRITON_K} tokens; leave kernels null "
        "(the PyTorch path serves larger K) or set kernels=torch",
    ),
    Rule(
        (
            "model.recon_target",
            *(f"loss.{t}" for t in ("recon", "cluster", "align", "cls", "koleo")),
        ),
        lambda target, *weights: target == "vq" or any(map(_weight, weights)),
        "every loss term is switched off: {1}, {2}, {3}, {4}, {5}",
        "nothing to train",
    ),
    Rule(
        (
            "model.recon_target",
            *(f"loss.{t}" for t in ("recon_vq", "cluster", "align", "cls", "koleo")),
        ),
        lambda target, *weights: target != "vq" or any(map(_weight, weights)),
        "every loss term is switched off: {1}, {2}, {3}, {4}, {5} with {0}",
        "nothing to train",
    ),
    Rule(
        ("train.warmup_steps", "train.total_steps", "train.lr_schedule"),
        lambda warmup, total, schedule: schedule == "constant" or warmup <= total,
        "{0} is past {1}",
        "the learning-rate schedule warms up within the run",
    ),
)


def _get(cfg: dict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_rules(cfg: dict, rules: tuple[Rule, ...] = RULES) -> None:
    """ConfigError naming the keys of the first rule that a checked configuration breaks."""
    for rule in rules:
        values = [_get(cfg, k) for k in rule.keys]
        if not rule.holds(*values):
            named = [f"{k} ({v!r})" for k, v in zip(rule.keys, values)]
            raise ConfigError(f"{rule.says.format(*named)}: {rule.why}")


def check_vit(model: dict) -> None:
    """ConfigError naming model.arch and model.vit_kwargs when timm cannot build the encoder's
    ViT from them, or builds one the encoder cannot run."""
    kwargs = model["vit_kwargs"]
    for name in kwargs:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(
                f"model.vit_kwargs: {name!r} is not an argument name (in YAML a colon needs a "
                "space after it: {depth: 4})"
            )
    from ..models.encoder import RESERVED_VIT_KWARGS

    for name in kwargs:
        if name in RESERVED_VIT_KWARGS:
            where = RESERVED_VIT_KWARGS[name]
            how = f"set it with {where}" if where else "the encoder sets it"
            raise ConfigError(f"model.vit_kwargs: {name!r} is not allowed there ({how})")
    args = (model["arch"], model["img_size"], model["patch_size"], model["drop_path"], kwargs)
    # A configuration is checked more than once per run (load_config, run_training).
    if repr(args) not in _VIT_CHECKS:
        _VIT_CHECKS[repr(args)] = _vit_problem(*args)
    problem, cause = _VIT_CHECKS[repr(args)]
    if problem is not None:
        raise ConfigError(
            f"model.arch ({model['arch']!r}) with model.vit_kwargs ({kwargs!r}) does not give "
            f"an encoder: {problem}"
        ) from cause


_VIT_CHECKS: dict[str, tuple[str | None, Exception | None]] = {}


def _vit_problem(
    arch: str, img_size: int, patch_size: int, drop_path: float, vit_kwargs: dict
) -> tuple[str | None, Exception | None]:
    """(why the encoder cannot have this ViT, timm's exception), or (None, None)."""
    import torch

    from ..models.encoder import create_vit, unusable_vit

    args = (arch, img_size, patch_size, drop_path, vit_kwargs)
    try:
        # The meta device allocates and initializes nothing: a ViT-H takes a fraction of a second.
        with torch.device("meta"):
            vit = create_vit(*args)
    except RuntimeError:
        # Some timm versions read values of tensors while building (the drop-path rates), which
        # the meta device refuses with a RuntimeError: the CPU decides. (timm's own checks of
        # its arguments raise AssertionError, TypeError or ValueError.)
        try:
            vit = create_vit(*args)
        except Exception as err:  # timm refusing the user's architecture or its arguments
            return f"timm: {reason(err)}", err
    except Exception as err:
        return f"timm: {reason(err)}", err
    return unusable_vit(vit), None


def describe_key(dotted: str) -> str:
    """What a key takes, in words (for help texts)."""
    schema: type = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(schema)
        if part not in hints:
            raise _unknown(dotted, all_keys())
        if i == len(parts) - 1:
            f = next(f for f in dataclasses.fields(schema) if f.name == part)
            return _expected(hints[part], f.metadata.get("range"))
        schema = hints[part]
    return "a section"
