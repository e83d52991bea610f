"""STELLAR: sparse semantic tokens and a localization matrix, learned self-supervised."""

from stellar_kernels._version import __version__


def load(path, device="cpu", kernels=None):
    """An eval-mode STELLAR model from a run directory, a checkpoint or a .safetensors export."""
    from .models.io import load as _load

    return _load(path, device=device, kernels=kernels)


__all__ = ["__version__", "load"]
