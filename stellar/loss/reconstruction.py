"""Low-rank approximated reconstruction (paper eq. 3): MSE against the [0, 1] image."""

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
