"""Low-rank approximated reconstruction (paper eq. 3): MSE against the [0, 1] image, or the
cross-entropy of the decoder's code logits against a VQ tokenizer's codes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(pred: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the decoder output and the image, in float32."""
    if pred.shape != images.shape:
        raise ValueError(
            f"reconstruction {tuple(pred.shape)} and image {tuple(images.shape)} differ in shape"
        )
    return F.mse_loss(pred.float(), images.float())


def code_cross_entropy(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of code logits (B, N, C) against a tokenizer's codes (B, N), in float32."""
    if logits.shape[:2] != codes.shape:
        raise ValueError(
            f"code logits {tuple(logits.shape)} and codes {tuple(codes.shape)} differ in (B, N)"
        )
    return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
