"""Fast operators for self-supervised vision learning.

Every operator takes CPU and CUDA tensors; ``backend=None`` picks the fastest
implementation for the tensor's device, ``backend="torch"`` the PyTorch
reference, and the environment variable STELLAR_KERNELS_BACKEND the default.
"""

from ._version import __version__
from .hungarian import hungarian_match
from .localization import factorize, localization
from .match_tokens import match_tokens
from .sinkhorn_knopp import sinkhorn_knopp
from .sinkhorn_match import MatchResult, sinkhorn_match

__all__ = [
    "MatchResult",
    "__version__",
    "factorize",
    "hungarian_match",
    "localization",
    "match_tokens",
    "sinkhorn_knopp",
    "sinkhorn_match",
]
