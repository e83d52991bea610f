"""Loading of the compiled extension stellar_kernels._C (built by pip install)."""

from __future__ import annotations

import functools
import types


@functools.cache
def load_extension() -> types.ModuleType:
    try:
        from . import _C
    except ImportError as err:
        raise RuntimeError(
            "stellar_kernels._C is not built: run `pip install -e . --no-build-isolation` "
            f"in the repository ({err})"
        ) from err
    return _C


@functools.cache
def cuda_extension_built() -> bool:
    """Whether the installed extension holds the CUDA kernels (fixed at build time)."""
    import torch

    load_extension()
    return bool(torch.ops.stellar_ext.cuda_built())
