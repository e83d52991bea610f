"""The version of both packages, stellar and stellar_kernels (one distribution, stellar-ssl)."""

__version__ = "0.2.0"
