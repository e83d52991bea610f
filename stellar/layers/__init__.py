"""Building blocks of the STELLAR model: positional encodings and patch masking."""

from .masking import focal_mask, keep_count, mixed_mask
from .pos_embed import RandomFourierPosEmbed

__all__ = ["RandomFourierPosEmbed", "focal_mask", "keep_count", "mixed_mask"]
