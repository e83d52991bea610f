"""Experiment 2 (paper sec. 5.1, Fig. 2b): semantic stability under random resized crops.

For each image and each crop scale (fraction of the image area, 0.5 to 1.0),
a random crop of that area (aspect ratio 3/4 to 4/3, random position, fixed
seed) is resized to the model's input size; the cosine distance between its
pooled features (mean-pooled sparse tokens by default) and those of the
uncropped image is averaged over images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .features import batches, pool_features

DEFAULT_SCALES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def crop_box(rng: np.random.Generator, h: int, w: int, scale: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop with area scale * h * w."""
    for _ in range(10):
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch = round(math.sqrt(scale * h * w / ratio))
        cw = round(math.sqrt(scale * h * w * ratio))
        if 0 < ch <= h and 0 < cw <= w:
            break
    else:
        ch = cw = round(math.sqrt(scale * h * w))
        ch, cw = min(ch, h), min(cw, w)
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return top, left, ch, cw


@torch.no_grad()
def evaluate_robustness(
    model,
    dataset,
    scales=DEFAULT_SCALES,
    features: str = "sparse",
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    device = next(model.parameters()).device
    size = int(model.config["img_size"])
    rng = np.random.default_rng(seed)
    dists: dict[float, list] = {float(s): [] for s in scales}
    for batch in batches(dataset, batch_size, "robustness", progress):
        images = batch["image"].to(device)
        ref = pool_features(
            model.encode(F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)),
            features,
        ).float()
        for s in scales:
            crops = []
            for img in images:
                t, left, ch, cw = crop_box(rng, img.shape[-2], img.shape[-1], float(s))
                crops.append(
                    F.interpolate(
                        img[None, :, t : t + ch, left : left + cw],
                        size=(size, size),
                        mode="bilinear",
                        antialias=True,
                    )[0]
                )
            feat = pool_features(model.encode(torch.stack(crops).clamp(0, 1)), features).float()
            dists[float(s)].extend((1 - F.cosine_similarity(ref, feat, dim=1)).tolist())
    values = [float(np.mean(dists[float(s)])) for s in scales]
    return {
        "scales": [float(s) for s in scales],
        "cosine_distance": values,
        "cosine_distance_std": [float(np.std(dists[float(s)])) for s in scales],
        "mean_cosine_distance": float(np.mean(values)),
        "features": features,
        "num_images": len(dists[float(scales[0])]),
    }


def plot_robustness(results: dict, path) -> str:
    """Fig. 2(b): cosine distance from the uncropped image against the crop scale, per model."""
    from .visualize import line_plot

    x = next(iter(results.values()))["scales"]
    series = {label: res["cosine_distance"] for label, res in results.items()}
    line_plot(path, x, series, "crop scale", "cosine distance", "Exp. 2: crop robustness")
    return str(path)
