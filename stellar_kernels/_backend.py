"""Choice of implementation: the `backend=` argument, else STELLAR_KERNELS_BACKEND, else the fastest.

An explicit `backend=` is a demand: if it cannot serve the input, the call raises a
ValueError saying why. `backend=None` chooses: the environment variable's backend when
the operator has it and it can serve the input, else the device's default, else the
operator's fallbacks (listed in each docstring).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ._triton import HAS_TRITON

ENV_VAR = "STELLAR_KERNELS_BACKEND"
BACKENDS = ("torch", "triton", "cpp", "cuda", "scipy")
"""Every backend name some operator implements (the values STELLAR_KERNELS_BACKEND takes)."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def environment_backend() -> str | None:
    """STELLAR_KERNELS_BACKEND, checked: None when unset or empty."""
    value = os.environ.get(ENV_VAR) or None
    if value is not None and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; valid values: {BACKENDS}")
    return value


def _triton_reason(device: torch.device) -> str | None:
    if not HAS_TRITON:
        return "the triton package is not installed"
    if device.type != "cuda" and not triton_interpreting():
        return (
            f"Triton kernels run on CUDA tensors, got a {device.type} tensor (on the CPU only "
            "under TRITON_INTERPRET=1, set before triton is imported); use backend='torch'"
        )
    return None


def resolve_backend(
    op: str,
    backend: str | None,
    device: torch.device,
    available: tuple[str, ...],
    default_cuda: str,
    default_cpu: str,
    cannot_serve: Callable[[str], str | None] = lambda impl: None,
    fallbacks: tuple[str, ...] = ("torch",),
    hint: str = "",
) -> str:
    """Returns the backend to run `op` with on `device`.

    `available` lists the backends the op implements; `cannot_serve(impl)` says why impl
    cannot serve this input (None when it can), beyond the checks common to every op
    (triton installed, a CUDA tensor or the interpreter). `hint` follows the error for a
    backend the op does not implement.
    """

    def reason(impl: str) -> str | None:
        if impl == "triton" and (why := _triton_reason(device)) is not None:
            return why
        return cannot_serve(impl)

    env = environment_backend()
    if backend is not None:
        if backend not in available:
            extra = f" ({hint})" if hint else ""
            raise ValueError(
                f"{op}: backend must be one of {available} or None, got {backend!r}{extra}"
            )
        if (why := reason(backend)) is not None:
            raise ValueError(f"{op}: backend={backend!r} cannot serve this input: {why}")
        return backend
    default = default_cuda if device.type == "cuda" else default_cpu
    candidates = ([env] if env in available else []) + [default, *fallbacks]
    for impl in candidates:
        if reason(impl) is None:
            return impl
    raise ValueError(f"{op}: no backend can serve this input ({reason(candidates[-1])})")
