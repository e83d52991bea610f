"""Procedurally generated multi-object scenes: the embedded data set, no download needed.

Each scene holds 1 to `max_objects` objects of CLASSES in random colours,
sizes, rotations and positions on a textured background (stripes,
checkerboard or smooth waves). A class is a shape with its own upright
surface pattern: plain circles, squares with horizontal stripes, dotted
triangles, checked crosses and rings with vertical stripes. The colour carries no class
information. The first object is the large "dominant" one; the others are
smaller and drawn on top of it. Scene i of seed s is a pure function of (s, i).

Per scene: the image, its label (the class of the object with the largest
visible area, learnable from the image), one visible-area mask per object
(occlusion applied, masks are disjoint) with the object's class, and a
segmentation map (0 background, c + 1 for class c).
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

CLASSES = ("circle", "square", "triangle", "cross", "ring")


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")  # y, x in [0, 1]


def _shape_mask(
    kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float
) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    name = CLASSES[kind]
    if name == "circle":
        return u * u + v * v <= r * r
    if name == "square":
        s = r * 0.85
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if name == "triangle":
        # Equilateral triangle with circumradius 1.3 r (an area like the other shapes').
        r = 1.3 * r
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            t = angle + math.pi / 2 + k * 2 * math.pi / 3
            inside &= (dx * math.cos(t) + dy * math.sin(t)) >= -r / 2
        return inside
    if name == "cross":
        w = r / 3
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if name == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(kind)


PATTERN_PERIOD = 0.085  # of the image side: ~5 pixels at 64, below the 8-pixel patch


def _surface(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float) -> np.ndarray:
    """The class's surface pattern in [0, 1], upright (the shapes rotate, their patterns do not)."""
    u, v = (xx - cx) / PATTERN_PERIOD, (yy - cy) / PATTERN_PERIOD
    name = CLASSES[kind]
    if name == "circle":  # plain
        return np.ones_like(u)
    if name == "square":  # horizontal stripes
        return (np.sin(2 * math.pi * v) > 0).astype(np.float32)
    if name == "triangle":  # dots
        fu, fv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
        return (fu * fu + fv * fv > 0.09).astype(np.float32)
    if name == "cross":  # checks
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    if name == "ring":  # vertical stripes
        return (np.sin(2 * math.pi * u) > 0).astype(np.float32)
    raise ValueError(kind)


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]):
    h = rng.uniform(0, 1)
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val)), np.float32)


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    a = _colour(rng, (0.0, 0.4), (0.25, 0.75))
    b = _colour(rng, (0.0, 0.4), (0.25, 0.75))
    kind = rng.integers(3)
    if kind == 0:  # stripes
        t = rng.uniform(0, math.pi)
        f = rng.uniform(3, 10)
        w = 0.5 + 0.5 * np.sin(2 * math.pi * f * (xx * math.cos(t) + yy * math.sin(t)))
    elif kind == 1:  # checkerboard
        n = rng.integers(3, 9)
        w = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
        w = 0.25 + 0.5 * w
    else:  # smooth waves
        w = np.zeros_like(xx)
        for _ in range(3):
            t = rng.uniform(0, 2 * math.pi)
            f = rng.uniform(1, 4)
            w += np.sin(2 * math.pi * f * (xx * math.cos(t) + yy * math.sin(t)) + rng.uniform(0, 6))
        w = 0.5 + w / 6
    img = a[:, None, None] * w[None] + b[:, None, None] * (1 - w[None])
    img += rng.normal(0, 0.03, size=img.shape).astype(np.float32)  # fine grain
    return img


def render_scene(
    seed: int, index: int, size: int = 64, max_objects: int = 4
) -> dict[str, np.ndarray | int]:
    """One scene: image (H, W, 3) uint8, label, masks (M, H, W) bool, classes (M,), segmentation."""
    rng = np.random.default_rng([seed, index])
    yy, xx = _coords(size)
    img = _background(rng, yy, xx)
    n_obj = int(rng.integers(1, max_objects + 1))
    owner = np.full((size, size), -1, dtype=np.int64)  # which object is visible at each pixel
    classes = rng.integers(len(CLASSES), size=n_obj)
    for k in range(n_obj):
        if k == 0:  # the dominant object
            r = rng.uniform(0.24, 0.34)
            cy, cx = rng.uniform(0.3, 0.7, size=2)
        else:
            r = rng.uniform(0.07, 0.14)
            cy, cx = rng.uniform(r, 1 - r, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        mask = _shape_mask(int(classes[k]), yy, xx, cy, cx, r, angle)
        colour = _colour(rng, (0.6, 1.0), (0.6, 1.0))
        shade = 1.0 - 0.25 * (yy - cy) / max(r, 1e-3)  # a soft vertical gradient
        shade = np.clip(shade, 0.6, 1.3) * (0.2 + 0.8 * _surface(int(classes[k]), yy, xx, cy, cx))
        fill = colour[:, None, None] * shade[None]
        img = np.where(mask[None], fill, img)
        owner[mask] = k
    masks = np.stack([owner == k for k in range(n_obj)])
    areas = masks.reshape(n_obj, -1).sum(1)
    label = int(classes[int(areas.argmax())])
    segmentation = np.where(owner >= 0, classes[np.maximum(owner, 0)] + 1, 0)
    image = (np.clip(img, 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    return {
        "image": image,
        "label": label,
        "masks": masks,
        "classes": classes.astype(np.int64),
        "segmentation": segmentation.astype(np.int64),
    }


class ShapesDataset(Dataset):
    """`num_images` deterministic scenes of `size` x `size` pixels.

    Item i is {"image": (3, H, W) float32 in [0, 1], "label": int} and, with
    `with_masks`, also "masks" (max_objects, H, W) bool (padded with empty
    masks), "classes" (max_objects,) int64 (padded with -1) and
    "segmentation" (H, W) int64. `load(i)` gives (PIL image, label).
    """

    classes = CLASSES

    def __init__(
        self,
        num_images: int = 10000,
        size: int = 64,
        seed: int = 0,
        max_objects: int = 4,
        with_masks: bool = True,
    ) -> None:
        self.num_images = num_images
        self.size = size
        self.seed = seed
        self.max_objects = max_objects
        self.with_masks = with_masks

    def __len__(self) -> int:
        return self.num_images

    def scene(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        return render_scene(self.seed, index, self.size, self.max_objects)

    def load(self, index: int, min_size: int | None = None) -> tuple[Image.Image, int]:
        """(PIL image, label) of scene `index` (the multi-crop pipeline's interface)."""
        s = self.scene(index)
        return Image.fromarray(s["image"]), int(s["label"])

    def __getitem__(self, index: int) -> dict:
        s = self.scene(index)
        out = {
            "image": torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 255.0,
            "label": s["label"],
        }
        if self.with_masks:
            m = self.max_objects
            masks = np.zeros((m, self.size, self.size), dtype=bool)
            classes = np.full(m, -1, dtype=np.int64)
            masks[: len(s["masks"])] = s["masks"]
            classes[: len(s["classes"])] = s["classes"]
            out["masks"] = torch.from_numpy(masks)
            out["classes"] = torch.from_numpy(classes)
            out["segmentation"] = torch.from_numpy(s["segmentation"])
        return out
