"""Reconstruction quality: the decoder's output against the image (MSE, PSNR, SSIM).

SSIM: per channel, 11x11 Gaussian window (sigma 1.5) over the valid region,
C1 = (0.01)^2, C2 = (0.03)^2 for images in [0, 1]; averaged over channels
and pixels. PSNR per image with a peak of 1, averaged over images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .features import batches


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error (B,)."""
    return ((x.float() - y.float()) ** 2).flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Per-image PSNR in dB (B,) for images in [0, 1]."""
    return 10.0 * torch.log10(1.0 / mse(x, y).clamp_min(eps))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(c**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (B,) of images (B, C, H, W) in [0, 1]."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    win = min(window, x.shape[-1], x.shape[-2])
    w = gaussian_window(win, sigma).to(x.device)[None, None].repeat(c, 1, 1, 1)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


@torch.no_grad()
def evaluate_reconstruction(model, dataset, batch_size: int = 64, progress: bool = True) -> dict:
    device = next(model.parameters()).device
    m, p, s, n = 0.0, 0.0, 0.0, 0
    for batch in batches(dataset, batch_size, "reconstruction", progress):
        img = batch["image"].to(device)
        rec = model.reconstruct(img)
        m += mse(rec, img).sum().item()
        p += psnr(rec, img).sum().item()
        s += ssim(rec, img).sum().item()
        n += len(img)
    out = {"mse": m / n, "psnr": p / n, "ssim": s / n, "num_images": n}
    out["psnr_of_mean_mse"] = 10 * math.log10(1.0 / max(out["mse"], 1e-10))
    return out
