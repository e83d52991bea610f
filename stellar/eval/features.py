"""Models, evaluation data and frozen features shared by the stellar-eval tasks.

Data: "shapes" (the embedded scenes, rendered with a seed the training never
used, so every evaluation image is held out) or an image folder with one
subfolder per class. A folder is split 80/20 into train/val with a fixed
seeded permutation unless a separate validation folder is given. Unreadable
files are skipped (one warning each) and left out of the features.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from ..errors import ConfigError, DataError

T = TypeVar("T")

EVAL_SCENE_SEED = 1000  # the training renders scenes with the config's seed (0 by default)
FEATURE_TYPES = ("sparse", "cls", "dense", "concat")


# ---------------------------------------------------------------------------- models


def load_model(
    checkpoint: str | Path | None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    preset: str = "tiny",
):
    """An eval-mode Stellar model.

    `checkpoint` is a run directory, a checkpoint or a .safetensors export. With
    `random_init` the same architecture is built again with fresh weights
    (seeded by `seed`); without a checkpoint the architecture comes from `preset`.
    """
    from ..models.stellar import Stellar

    if checkpoint is not None:
        from .. import load

        model = load(checkpoint, device="cpu")
        config = model.config
    else:
        if not random_init:
            raise ConfigError("--checkpoint is needed unless --random-init is given")
        from ..train.config import load_preset, validate

        # Checked, so that a YAML file's bad or missing keys fail or take their defaults as
        # in training.
        cfg = load_preset(preset)
        validate(cfg)
        config = cfg["model"]
        model = None
    if random_init:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = Stellar.from_config(config)
        torch.random.set_rng_state(gen_state)
    return model.to(device).eval()


def model_image_size(model) -> int:
    return int(model.config["img_size"])


def encoded_image_size(model, requested: int | None) -> int:
    """The side of the images a task encodes: --image-size, else the model's input size;
    ConfigError where the encoder cannot cut it into whole patches."""
    size = requested or model_image_size(model)
    patch = int(model.patch_size)
    if size % patch:
        raise ConfigError(
            f"--image-size {size} is not a multiple of the model's patch size {patch}"
        )
    return size


# ---------------------------------------------------------------------------- data


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (3, size, size): shorter side resized to `size`, then a center crop."""
    h, w = image.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        image = F.interpolate(
            image[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
        )[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        image = image[:, top : top + size, left : left + size]
    return image.clamp(0, 1)


class EvalImages(Dataset):
    """Square images of one size with labels; item i is a dict or None (unreadable file).

    `base` is a ShapesDataset or an ImageFolderDataset; `indices` picks a subset.
    """

    def __init__(self, base, indices, size: int) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.size = size
        self.classes = list(getattr(base, "classes", []))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict | None:
        j = self.indices[i]
        if hasattr(self.base, "read"):  # an image folder
            img = self.base.read(j)
            if img is None:
                return None
            arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
            return {
                "image": resize_square(arr.float() / 255.0, self.size),
                "label": self.base.samples[j][1],
                "index": j,
            }
        item = self.base[j]
        item = dict(item)
        item["image"] = resize_square(item["image"], self.size)
        item["index"] = j
        return item


def split_indices(n: int, seed: int = 0, val_fraction: float = 0.2) -> tuple[list, list]:
    """A fixed, seeded (train, val) split of range(n); val gets round(n * val_fraction) items."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction)) if n > 1 else 0
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


@dataclass
class EvalData:
    train: EvalImages
    val: EvalImages
    classes: list
    name: str


def build_data(
    data: str | Path | None,
    size: int,
    val_data: str | Path | None = None,
    num_images: int = 1000,
    seed: int = 0,
    render_size: int | None = None,
    with_masks: bool = True,
) -> EvalData:
    """Train/val evaluation images at `size` x `size`.

    data: "shapes"/None (embedded scenes: `num_images` of them, 80/20 split) or
    an image folder with class subfolders (80/20 split unless `val_data`).
    """
    if data is None or str(data) == "shapes":
        from ..data.shapes import CLASSES, ShapesDataset

        # Rendered at 1.5x and resized, as the training renders at data.image_size (96 for
        # a 64-pixel model) and resizes its crops.
        base = ShapesDataset(
            num_images,
            size=render_size or max(size, round(1.5 * size)),
            seed=EVAL_SCENE_SEED,
            with_masks=with_masks,
        )
        tr, va = split_indices(len(base), seed)
        return EvalData(
            EvalImages(base, tr, size), EvalImages(base, va, size), list(CLASSES), "shapes"
        )
    from ..data.folder import ImageFolderDataset

    base = ImageFolderDataset(data)
    if val_data is not None:
        vbase = ImageFolderDataset(val_data)
        if vbase.classes != base.classes:
            raise DataError(
                f"--val-data classes {vbase.classes} differ from --data classes {base.classes}"
            )
        train = EvalImages(base, range(len(base)), size)
        val = EvalImages(vbase, range(len(vbase)), size)
    else:
        tr, va = split_indices(len(base), seed)
        train, val = EvalImages(base, tr, size), EvalImages(base, va, size)
    return EvalData(train, val, list(base.classes), str(data))


def collate(items: list) -> dict | None:
    """Stacks the readable items of a batch (None for an all-unreadable batch)."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = torch.stack(vals) if torch.is_tensor(vals[0]) else torch.tensor(vals)
    return out


def batches(dataset: Dataset, batch_size: int = 64, desc: str | None = None, progress=True):
    """Batches (dicts) of the readable items of `dataset`, in order."""
    n = len(dataset)
    it = range(0, n, batch_size)
    if progress and desc:
        it = tqdm(it, desc=desc, total=math.ceil(n / batch_size), leave=False)
    for start in it:
        batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        if batch is not None:
            yield batch


# ---------------------------------------------------------------------------- features


def pool_features(out: dict, kind: str) -> torch.Tensor:
    """Image-level features (B, F) of one encoder output dict."""
    if kind == "sparse":
        return out["sparse"].mean(1)
    if kind == "cls":
        return out["cls"][:, 0]
    if kind == "dense":
        return out["dense"].mean(1)
    if kind == "concat":
        return torch.cat([out["sparse"].mean(1), out["cls"][:, 0]], dim=-1)
    raise ValueError(f"unknown feature type {kind!r}; choose from {', '.join(FEATURE_TYPES)}")


@torch.no_grad()
def extract(
    model,
    dataset: Dataset,
    kinds: tuple[str, ...] = ("sparse",),
    batch_size: int = 64,
    desc: str = "features",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """{"labels": (N,), "index": (N,), kind: (N, F) float32 for each kind} of the readable items."""
    device = next(model.parameters()).device
    feats: dict[str, list] = {k: [] for k in kinds}
    labels, index = [], []
    for batch in batches(dataset, batch_size, desc, progress):
        out = model.encode(batch["image"].to(device))
        for k in kinds:
            feats[k].append(pool_features(out, k).float().cpu())
        labels.append(batch["label"])
        index.append(batch["index"])
    if not labels:
        raise DataError("no readable image in the evaluation data")
    result = {k: torch.cat(v) for k, v in feats.items()}
    result["labels"] = torch.cat(labels).long()
    result["index"] = torch.cat(index).long()
    return result


def extract_splits(
    model, data: EvalData, kind: str = "sparse", batch_size: int = 64, progress: bool = True
) -> tuple[dict, dict, int]:
    """(train features, val features, number of classes) of one feature kind, as `extract` gives."""
    tr = extract(model, data.train, (kind,), batch_size, "train features", progress)
    va = extract(model, data.val, (kind,), batch_size, "val features", progress)
    n_cls = max(len(data.classes), int(max(tr["labels"].max(), va["labels"].max())) + 1)
    return tr, va, n_cls


# ---------------------------------------------------------------------------- paper protocol

# The public code's probes (configs/eval_cls.yaml, configs/eval_seg.yaml) train with batches
# of 2048 images under its trainer's gradient_clip_val 5.0 and bf16-mixed precision
# (configs/trainer/stellar_trainer.yaml).
PAPER_BATCH = 2048
PAPER_CLIP = 5.0


def bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the public trainer's bf16-mixed); float32 elsewhere, where
    bf16 matmuls are slow or missing."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ProbeBatch:
    """A probe's batch: `size` images per optimizer step, encoded by the frozen model in
    passes of `pass_size` images.

    The frozen encoder needs no gradients, so splitting a step's images into passes gives
    the same features as one pass: the step keeps the public code's batch while the memory
    goes with the pass. Where CUDA still runs out of memory, `shrink` halves the pass, then
    the batch, and the batch used is what the result states."""

    def __init__(self, wanted: int, num_items: int, pass_size: int) -> None:
        self.wanted = int(wanted)
        self.size = self.planned = max(1, min(self.wanted, int(num_items)))
        self.pass_size = max(1, min(int(pass_size), self.size))

    def shrink(self) -> bool:
        """Halves the pass, else the batch; False when both are one image already."""
        if self.pass_size > 1:
            self.pass_size //= 2
        elif self.size > 1:
            self.size //= 2
        else:
            return False
        return True

    def retry(self, fn: Callable[[], T]) -> T:
        """fn(), run again with a smaller pass or batch for as long as CUDA runs out of memory
        (fn reads `size` and `pass_size` anew on every call)."""
        while True:
            try:
                return fn()
            except torch.cuda.OutOfMemoryError:
                if not self.shrink():
                    raise
                torch.cuda.empty_cache()

    def describe(self) -> dict:
        """What the result states about the batch."""
        res: dict = {"batch_size": self.size, "encoder_pass": self.pass_size}
        if self.size < self.planned:
            res["batch_note"] = f"{self.wanted} wanted; {self.size} fit in CUDA memory"
        elif self.size < self.wanted:
            res["batch_note"] = f"{self.wanted} wanted; {self.size}, the training images"
        return res


@torch.no_grad()
def encode_in_passes(
    model,
    images: torch.Tensor,
    pass_size: int,
    select: Callable[[dict], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """select(model.encode(...)) of images (B, 3, H, W), computed in passes of `pass_size`
    images under `bf16_autocast`: each tensor concatenated over the passes, as float32 on
    the model's device."""
    device = next(model.parameters()).device
    parts: dict[str, list] = {}
    for start in range(0, len(images), pass_size):
        with bf16_autocast(device):
            out = select(model.encode(images[start : start + pass_size].to(device)))
        for key, value in out.items():
            parts.setdefault(key, []).append(value.float())
    return {key: torch.cat(values) for key, values in parts.items()}


def load_items(dataset: Dataset, indices: list[int], pool: Executor | None = None) -> list:
    """dataset[i] for i in indices; in `pool`'s threads when given (decoding and resizing with
    PIL release the GIL, so a probe that reads new views every step is not held up by it)."""
    if pool is None:
        return [dataset[i] for i in indices]
    return list(pool.map(dataset.__getitem__, indices))


def loader_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
