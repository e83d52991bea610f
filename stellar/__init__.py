"""STELLAR: sparse semantic tokens and a localization matrix, learned self-supervised."""

__version__ = "0.1.0"
