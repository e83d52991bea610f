"""Self-supervised training of STELLAR: presets, the objective, checkpoints, the loop, profiling."""

from .config import apply_overrides, load_preset
from .ssl_meta_arch import StellarSSL, Teacher
from .train import load_config, main, run_training

__all__ = [
    "StellarSSL",
    "Teacher",
    "apply_overrides",
    "load_config",
    "load_preset",
    "main",
    "run_training",
]
