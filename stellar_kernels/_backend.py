"""Choice of implementation: the `backend=` argument, else STELLAR_KERNELS_BACKEND, else the fastest."""

from __future__ import annotations

import os

import torch

ENV_VAR = "STELLAR_KERNELS_BACKEND"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(
    op: str,
    backend: str | None,
    device: torch.device,
    available: tuple[str, ...],
    default_cuda: str,
    default_cpu: str,
) -> str:
    """Returns the backend to run `op` with on `device`.

    `available` lists the backends implemented for this op. An explicit
    `backend` must be one of them; the environment variable only applies when
    the op implements what it names.
    """
    if backend is None:
        env = os.environ.get(ENV_VAR)
        if env and env in available:
            backend = env
        else:
            backend = default_cuda if device.type == "cuda" else default_cpu
    elif backend not in available:
        raise ValueError(f"{op}: backend must be one of {available} or None, got {backend!r}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"{op}: backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
            "(set before triton is imported); use backend='torch' on the CPU"
        )
    return backend
