"""Semantic segmentation probe (paper Table 2): BatchNorm + linear head on frozen patch features.

Two heads are trained on the frozen model, each a BatchNorm and a linear layer applied to
every patch: one on the dense patch features D, one on the low-rank features A·S (what the
sparse tokens and their localization span). Their patch logits are upsampled (bilinear) to
the image and trained with per-pixel cross-entropy (AdamW); each is scored by the mean IoU
over the classes of the evaluation split.

Data:
- the embedded scenes: their segmentation maps, background as class 0 and object class c
  as c + 1;
- a folder `ROOT` laid out as `ROOT/images/NAME.(png|jpg|jpeg)` with a label map
  `ROOT/labels/NAME.png` each (one channel, the class index per pixel, 255 = ignore),
  split 80/20 with the evaluation seed unless a second folder is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..errors import DataError

IGNORE = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _square(image: Image.Image, size: int, resample) -> Image.Image:
    """Shorter side to `size`, then the centre square (the same box for image and labels)."""
    scale = size / min(image.width, image.height)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), resample)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


class SegmentationImages(Dataset):
    """Items {"image": (3, S, S) float in [0, 1], "target": (S, S) int64, IGNORE = no label}."""

    def __init__(self, pairs: list, size: int, num_classes: int, class_names: list) -> None:
        self.pairs, self.size = pairs, size
        self.num_classes, self.class_names = num_classes, class_names

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        image, labels = self.pairs[i]()
        image = _square(image.convert("RGB"), self.size, Image.BICUBIC)
        labels = _square(labels, self.size, Image.NEAREST)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return {
            "image": x.float() / 255.0,
            "target": torch.from_numpy(np.asarray(labels).astype(np.int64)),
        }


def scene_splits(num_images: int, size: int, seed: int) -> tuple[SegmentationImages, ...]:
    from ..data.shapes import CLASSES, ShapesDataset
    from .features import EVAL_SCENE_SEED, split_indices

    base = ShapesDataset(num_images, size=round(1.5 * size), seed=EVAL_SCENE_SEED, with_masks=True)

    def loader(j: int):
        def load():
            item = base[j]
            image = Image.fromarray(
                (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            )
            return image, Image.fromarray(item["segmentation"].numpy().astype(np.uint8))

        return load

    names = ["background", *CLASSES]
    tr, va = split_indices(len(base), seed)
    return tuple(
        SegmentationImages([loader(j) for j in idx], size, len(names), names) for idx in (tr, va)
    )


def _folder_pairs(root: Path) -> list[tuple[Path, Path]]:
    images, labels = root / "images", root / "labels"
    if not images.is_dir() or not labels.is_dir():
        raise FileNotFoundError(
            2, "a segmentation folder needs images/ and labels/ (NAME.png label maps)", str(root)
        )
    pairs = []
    for path in sorted(images.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            label = labels / f"{path.stem}.png"
            if not label.is_file():
                raise FileNotFoundError(2, f"no label map for {path.name}", str(label))
            pairs.append((path, label))
    if not pairs:
        raise DataError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return pairs


def folder_splits(root, size: int, seed: int, val_root=None) -> tuple[SegmentationImages, ...]:
    from .features import split_indices

    pairs = _folder_pairs(Path(root))
    if val_root is not None:
        train, val = pairs, _folder_pairs(Path(val_root))
    else:
        tr, va = split_indices(len(pairs), seed)
        train, val = [pairs[i] for i in tr], [pairs[i] for i in va]
    top = 0
    for _, label in train + val:
        values = np.unique(np.asarray(Image.open(label)))
        values = values[values != IGNORE]
        top = max(top, int(values.max()) + 1 if len(values) else 0)
    names = [f"class {c}" for c in range(top)]

    def loader(pair):
        return lambda: (Image.open(pair[0]), Image.open(pair[1]))

    return tuple(
        SegmentationImages([loader(p) for p in split], size, top, names) for split in (train, val)
    )


# ----------------------------------------------------------------------------- probe


@torch.no_grad()
def patch_features(model, dataset: SegmentationImages, batch_size: int, progress: bool):
    """Frozen (dense (M, h, w, D), lowrank (M, h, w, D), targets (M, S, S)) of a split."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    dense, lowrank, targets = [], [], []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="patch features", leave=False, disable=not progress):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        images = torch.stack([it["image"] for it in items]).to(device)
        out = model.encode(images)
        h, w = model.encoder.grid_size(*images.shape[-2:])
        dense.append(out["dense"].float().cpu().unflatten(1, (h, w)))
        lowrank.append(out["lowrank"].float().cpu().unflatten(1, (h, w)))
        targets.append(torch.stack([it["target"] for it in items]))
    return torch.cat(dense), torch.cat(lowrank), torch.cat(targets)


class SegmentationHead(nn.Module):
    """BatchNorm + Linear on each patch; logits upsampled to the image (bilinear)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, h, w, d = feats.shape
        logits = self.linear(self.norm(feats.reshape(-1, d))).view(b, h, w, -1)
        return F.interpolate(
            logits.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False
        )


def train_head(feats, targets, num_classes, epochs=20, lr=1e-3, batch_size=32, seed=0):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    head = SegmentationHead(feats.shape[-1], num_classes)
    torch.random.set_rng_state(state)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    size = tuple(targets.shape[-2:])
    for _ in range(epochs):
        order = torch.randperm(len(feats), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two images' patches
                continue
            loss = F.cross_entropy(head(feats[idx], size), targets[idx], ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def intersection_union(pred: torch.Tensor, target: torch.Tensor, num_classes: int):
    """Per-class (intersection, union) pixel counts, IGNORE pixels left out."""
    keep = target != IGNORE
    p, t = pred[keep], target[keep]
    inter = torch.bincount(t[p == t], minlength=num_classes)[:num_classes]
    area_p = torch.bincount(p, minlength=num_classes)[:num_classes]
    area_t = torch.bincount(t, minlength=num_classes)[:num_classes]
    return inter, area_p + area_t - inter


@torch.no_grad()
def predict(head, feats, size, batch_size=64) -> torch.Tensor:
    return torch.cat(
        [head(feats[s : s + batch_size], size).argmax(1) for s in range(0, len(feats), batch_size)]
    )


def mean_iou(pred, target, num_classes: int) -> tuple[float, list[float | None]]:
    """(mIoU in percent over the classes present in prediction or target, per-class IoU)."""
    inter, union = intersection_union(pred, target, num_classes)
    per_class = [100.0 * i / u if u > 0 else None for i, u in zip(inter.tolist(), union.tolist())]
    present = [v for v in per_class if v is not None]
    return (sum(present) / len(present) if present else 0.0), per_class


def evaluate_segmentation(
    model, train, val, batch_size=64, epochs=20, lr=1e-3, seed=0, progress=True, out_dir=None
) -> dict:
    """Both heads trained on `train`, scored on `val`; a picture in out_dir when given."""
    tr_dense, tr_low, tr_t = patch_features(model, train, batch_size, progress)
    va_dense, va_low, va_t = patch_features(model, val, batch_size, progress)
    size = tuple(va_t.shape[-2:])
    res: dict = {"num_train": len(train), "num_val": len(val), "classes": train.class_names}
    preds = {}
    for name, tr, va in (("", tr_dense, va_dense), ("_lowrank", tr_low, va_low)):
        head = train_head(tr, tr_t, train.num_classes, epochs, lr, seed=seed)
        preds[name] = predict(head, va, size)
        miou, per_class = mean_iou(preds[name], va_t, train.num_classes)
        res[f"miou{name}"] = miou
        res[f"iou_per_class{name}"] = dict(zip(train.class_names, per_class))
    if out_dir is not None:
        res["figure"] = str(plot_segmentation(val, preds[""], Path(out_dir) / "segmentation.png"))
    return res


def plot_segmentation(val: SegmentationImages, pred: torch.Tensor, path: Path, n: int = 6) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(val))
    fig, axes = plt.subplots(3, n, figsize=(2 * n, 6), squeeze=False)
    cmap = plt.get_cmap("tab20", max(val.num_classes, 2))
    for i in range(n):
        item = val[i]
        target = item["target"].numpy().astype(float)
        target[target == IGNORE] = np.nan
        panels = (item["image"].permute(1, 2, 0).numpy(), target, pred[i].numpy())
        for row, (panel, title) in enumerate(zip(panels, ("image", "true", "predicted (D)"))):
            ax = axes[row, i]
            if row == 0:
                ax.imshow(panel)
            else:
                ax.imshow(
                    panel,
                    cmap=cmap,
                    vmin=0,
                    vmax=max(val.num_classes - 1, 1),
                    interpolation="nearest",
                )
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=9, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
