"""Building blocks of the STELLAR model: positional encodings and patch masking."""

from .masking import focal_mask, keep_count, mixed_mask
from .pos_embed import RandomFourierPosEmbed, token_grid

__all__ = ["RandomFourierPosEmbed", "focal_mask", "keep_count", "mixed_mask", "token_grid"]
