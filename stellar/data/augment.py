"""Multi-crop views: geometric crops in the data loader, photometric changes batched on the device.

Per image the loader produces two global views (scale 0.36-1.0; the first
for the student, the second for the EMA teacher) and L local crops (scale
0.06-0.36), each randomly resized-cropped and flipped, as uint8 tensors.
On the device, `photometric` applies colour jitter, grayscale and Gaussian
blur to a batch at once (used on the masked views, the teacher's view and the
local crops), each image its own draw or (draw="batch") one draw for them all.
Every random choice comes from a generator seeded by (seed, epoch, index) or
(seed, step), so a step's views do not depend on which worker or run produced them.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RATIO = (3 / 4, 4 / 3)


def random_resized_box(
    rng: np.random.Generator, width: int, height: int, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop covering scale[0]-scale[1] of the area, aspect ratio 3/4-4/3."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback: the largest central crop within the ratio range.
    if width / height < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif width / height > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def crop_view(
    img: Image.Image, rng: np.random.Generator, size: int, scale: tuple[float, float]
) -> torch.Tensor:
    """A random resized crop of img, flipped with p = 0.5: (3, size, size) uint8."""
    left, top, w, h = random_resized_box(rng, img.width, img.height, scale)
    view = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    arr = np.asarray(view, dtype=np.uint8)
    if rng.uniform() < 0.5:
        arr = arr[:, ::-1]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class MultiCropDataset(torch.utils.data.Dataset):
    """Wraps a data set with `load(i, min_size) -> (PIL image, label)` into multi-crop samples.

    Items are requested as (index, seed) pairs (see StepBatchSampler); the
    result is {"global": (2, 3, G, G) uint8, "local": (L, 3, l, l) uint8, "label": int}.
    """

    def __init__(
        self,
        base,
        global_size: int,
        local_size: int,
        num_local: int,
        global_scale: tuple[float, float] = (0.36, 1.0),
        local_scale: tuple[float, float] = (0.06, 0.36),
        num_global: int = 2,
    ) -> None:
        self.base = base
        self.global_size = global_size
        self.local_size = local_size
        self.num_local = num_local
        self.num_global = num_global
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        need = global_size / math.sqrt(self.global_scale[0])
        if num_local:
            need = max(need, local_size / math.sqrt(self.local_scale[0]))
        self.min_size = int(math.ceil(need))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        img, label = self.base.load(index, self.min_size)
        rng = np.random.default_rng(seed)
        globals_ = [
            crop_view(img, rng, self.global_size, self.global_scale) for _ in range(self.num_global)
        ]
        out = {"global": torch.stack(globals_), "label": label}
        if self.num_local:
            locals_ = [
                crop_view(img, rng, self.local_size, self.local_scale)
                for _ in range(self.num_local)
            ]
            out["local"] = torch.stack(locals_)
        else:
            out["local"] = torch.zeros(0, 3, self.local_size, self.local_size, dtype=torch.uint8)
        return out


# ---------------------------------------------------------------------- on the device


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


_RGB2YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Hue rotation by `turns` (N,) of a full turn, in YIQ space."""
    rgb2yiq = _RGB2YIQ.to(x.device, x.dtype)
    yiq2rgb = _YIQ2RGB.to(x.device, x.dtype)
    yiq = torch.einsum("ij,njhw->nihw", rgb2yiq, x)
    angle = 2 * math.pi * turns.view(-1, 1, 1)
    c, s = angle.cos(), angle.sin()
    i = yiq[:, 1] * c - yiq[:, 2] * s
    q = yiq[:, 1] * s + yiq[:, 2] * c
    yiq = torch.stack([yiq[:, 0], i, q], dim=1)
    return torch.einsum("ij,njhw->nihw", yiq2rgb, yiq)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur of x (N, C, H, W) with sigma (N,) pixels (0: unchanged)."""
    n, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    radius = min(radius, (min(h, w) - 1) // 2) if min(h, w) > 2 else 0
    if radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-3).view(-1, 1)
    k = torch.exp(-(t**2) / (2 * s**2))
    k = k / k.sum(dim=1, keepdim=True)
    k = torch.where((sigma > 0).view(-1, 1), k, (t == 0).to(x.dtype).expand_as(k))
    k = k.repeat_interleave(c, dim=0)  # (N*C, 2r+1)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(
        F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(n * c, 1, 1, -1), groups=n * c
    )
    y = F.conv2d(
        F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(n * c, 1, -1, 1), groups=n * c
    )
    return y.view(n, c, h, w)


def photometric(
    x: torch.Tensor,
    generator: torch.Generator,
    jitter_prob: float = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    grayscale_prob: float = 0.2,
    blur_prob: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    blur_sigma_scaled: bool = True,
    draw: Literal["image", "batch"] = "image",
) -> torch.Tensor:
    """Colour jitter, grayscale and blur of images x (N, 3, H, W) in [0, 1].

    draw="image": each image its own draw; draw="batch": one draw for all N images, as
    torchvision's transforms give when they run on a stacked tensor (the released code's).
    The random parameters are drawn on the CPU from `generator` (so that the
    result does not depend on the device); blur sigmas are in pixels of a
    224-pixel image and scale with the view size, or with blur_sigma_scaled=False are
    pixels at every size.
    """
    if draw not in ("image", "batch"):
        raise ValueError(f"draw: 'image' or 'batch', got {draw!r}")
    n = x.shape[0]
    g = generator
    draws = n if draw == "image" else 1

    def rand() -> torch.Tensor:
        # (n,) values; under draw="batch" one value repeated, so the rest stays per image
        return torch.rand(draws, generator=g).expand(n)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (rand() * (hi - lo) + lo).to(x.device)

    jitter = (rand() < jitter_prob).to(x.device)
    b = torch.where(jitter, uniform(1 - brightness, 1 + brightness), 1.0).to(x.dtype)
    c = torch.where(jitter, uniform(1 - contrast, 1 + contrast), 1.0).to(x.dtype)
    s = torch.where(jitter, uniform(1 - saturation, 1 + saturation), 1.0).to(x.dtype)
    h = torch.where(jitter, uniform(-hue, hue), 0.0).to(x.dtype)
    gray = (rand() < grayscale_prob).to(x.device)
    blur = (rand() < blur_prob).to(x.device)
    sigma = uniform(*blur_sigma)
    if blur_sigma_scaled:
        sigma = sigma * (x.shape[-1] / 224.0)

    x = (x * b.view(-1, 1, 1, 1)).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c.view(-1, 1, 1, 1) + mean).clamp(0, 1)
    g_ = _gray(x)
    x = ((x - g_) * s.view(-1, 1, 1, 1) + g_).clamp(0, 1)
    if hue > 0:
        x = _rotate_hue(x, h).clamp(0, 1)
    x = torch.where(gray.view(-1, 1, 1, 1), _gray(x), x)
    if blur_prob > 0:
        x = gaussian_blur(x, torch.where(blur, sigma, torch.zeros_like(sigma)))
    return x
