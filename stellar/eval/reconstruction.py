"""Reconstruction quality: the decoder's output against the image (MSE, PSNR, SSIM).

SSIM: per channel, 11x11 Gaussian window (sigma 1.5) over the valid region,
C1 = (0.01)^2, C2 = (0.03)^2 for images in [0, 1]; averaged over channels
and pixels. PSNR per image with a peak of 1, averaged over images.

A model trained with the VQ target is scored on its decoded codes: the most likely code of
each patch through the MaskGIT-VQGAN tokenizer, resized to the input; beside PSNR and
SSIM, `code_accuracy` (the share of patches whose most likely code is the tokenizer's own)
and `tokenizer_psnr` / `tokenizer_ssim` (the tokenizer's own codes decoded: the ceiling).
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
    vq = getattr(model, "recon_target", "pixels") == "vq"
    sums = dict.fromkeys(
        ("mse", "psnr", "ssim", "code_accuracy", "tokenizer_psnr", "tokenizer_ssim"), 0.0
    )
    n = 0
    for batch in batches(dataset, batch_size, "reconstruction", progress):
        img = batch["image"].to(device)
        if vq:
            grid = model.encoder.grid_size(img.shape[-2], img.shape[-1])
            predicted = model.decode(model.encode(img)["lowrank"], grid).argmax(-1)
            codes = model.vq_targets(img, grid)
            rec = model.decode_codes(predicted, grid, img.shape[-2:])
            ceiling = model.decode_codes(codes, grid, img.shape[-2:])
            sums["code_accuracy"] += (predicted == codes).float().mean(1).sum().item()
            sums["tokenizer_psnr"] += psnr(ceiling, img).sum().item()
            sums["tokenizer_ssim"] += ssim(ceiling, img).sum().item()
        else:
            rec = model.reconstruct(img)
        sums["mse"] += mse(rec, img).sum().item()
        sums["psnr"] += psnr(rec, img).sum().item()
        sums["ssim"] += ssim(rec, img).sum().item()
        n += len(img)
    keys = list(sums) if vq else ["mse", "psnr", "ssim"]
    out = {k: sums[k] / n for k in keys}
    out["num_images"] = n
    out["target"] = "vq" if vq else "pixels"
    out["psnr_of_mean_mse"] = 10 * math.log10(1.0 / max(out["mse"], 1e-10))
    return out
