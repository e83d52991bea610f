"""The STELLAR objectives: reconstruction, clustering, set alignment, KoLeo."""

from .alignment import MATCHERS, gather_targets, match_to_targets
from .clustering import cluster_cross_entropy, sinkhorn_targets
from .koleo import koleo_loss
from .reconstruction import code_cross_entropy, reconstruction_loss

__all__ = [
    "MATCHERS",
    "cluster_cross_entropy",
    "code_cross_entropy",
    "gather_targets",
    "koleo_loss",
    "match_to_targets",
    "reconstruction_loss",
    "sinkhorn_targets",
]
