"""Evaluation and probing of the factorized representation (the stellar-eval CLI)."""

from .cli import main
from .features import build_data, load_model
from .linear import evaluate_linear

__all__ = ["build_data", "evaluate_linear", "load_model", "main"]
