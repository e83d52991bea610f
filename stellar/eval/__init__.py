"""Evaluation and probing of the factorized representation (the stellar-eval CLI)."""

from .cli import main

__all__ = ["main"]
