"""Input rules shared by every operator: clear errors that name the argument and the shapes."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    x: object,
    ndims: tuple[int, ...],
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> torch.Tensor:
    """A tensor of one of the allowed ranks and dtypes, or a TypeError/ValueError saying why not."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have a floating dtype ({names}), got {x.dtype}")
    return x


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all inputs must be on one device, got {seen}")
    return next(iter(devices.values()))


def check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_iterations(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_not_nan(name: str, x: torch.Tensor) -> None:
    """Host-synchronizing NaN scan; callers skip it with validate=False.

    A max reduction propagates NaN, so the scan needs no input-sized boolean mask.
    """
    if x.numel() and torch.isnan(x.amax()):
        raise ValueError(f"{name} contains NaN (shape {tuple(x.shape)})")


def check_rows_fit(name: str, shape: torch.Size | tuple[int, ...]) -> None:
    q, t = shape[-2], shape[-1]
    if q > t:
        raise ValueError(f"{name} must have Q <= T (rows <= columns), got shape {tuple(shape)}")
