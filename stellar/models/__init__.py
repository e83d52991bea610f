"""The STELLAR model and its parts."""

from .decoder import PixelDecoder
from .encoder import EncoderOutput, SparseViTEncoder
from .heads import ClusteringHead
from .io import load
from .pretrained import load_vit_weights
from .stellar import Stellar

__all__ = [
    "ClusteringHead",
    "EncoderOutput",
    "PixelDecoder",
    "SparseViTEncoder",
    "Stellar",
    "load",
    "load_vit_weights",
]
