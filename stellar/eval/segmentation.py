"""Semantic segmentation probe (paper Table 2): BatchNorm + linear head on frozen patch features.

Two heads are trained on the frozen model, each a BatchNorm and a linear layer applied to
every patch: one on the dense patch features D, one on the low-rank features A·S (what the
sparse tokens and their localization span). Each is scored by the mean IoU over the classes
of the evaluation split. Two protocols:

- fast (the default): the features of every image computed once, no augmentation; the
  patch logits upsampled (bilinear) to the image, per-pixel cross-entropy, AdamW 1e-3,
  32 images a step, 20 epochs; mIoU per pixel.
- paper: the public code's probe (configs/eval_seg.yaml and what it names). Every step
  encodes new views: a random resized crop (area 0.25-1, bicubic; labels nearest) and a
  flip; scored on the shorter side resized to size * 256/224 and a centre crop of `size`
  (resize 256 / crop 224 at 224). The logits stay at the patch grid and the labels are
  downsampled (nearest) to it for the loss, cross-entropy + soft Dice (weights 1 and 1),
  and for the mIoU. AdamW 1e-4 (weight decay 1e-4), 2048 images a step, gradient norm
  clipped to 5, bf16 autocast on CUDA, 80 epochs.

Data:
- the embedded scenes: their segmentation maps, background as class 0 and object class c
  as c + 1;
- a folder in ADE20K's layout, `ROOT/images/{training,validation}/NAME.jpg` with label maps
  `ROOT/annotations/{training,validation}/NAME.png`: fit on training, scored on validation;
  label 0 is ignored and labels 1..K are the classes 0..K-1, K the largest label found;
- a folder `ROOT` laid out as `ROOT/images/NAME.(png|jpg|jpeg)` with a label map
  `ROOT/labels/NAME.png` each (one channel, the class index per pixel, 255 = ignore),
  split 80/20 with the evaluation seed unless a second folder is given.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..data.augment import random_resized_box
from ..data.loader import derive_seed
from ..errors import ConfigError, DataError

IGNORE = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PROTOCOLS = ("fast", "paper")
FAST_EPOCHS = 20
# The public code's probe: configs/eval_seg.yaml (lr, epochs), configs/optimizer/adamw.yaml
# (weight decay), src/datasets/ade20k_dataset.py (crop scale, 256/224),
# configs/loss/segmentation_loss.yaml (ce_weight 1, dice_weight 1; the Dice smoothing is
# src/losses/segmentation_loss.py's default).
PAPER_EPOCHS = 80
PAPER_LR = 1e-4
PAPER_WEIGHT_DECAY = 1e-4
PAPER_CROP_SCALE = (0.25, 1.0)
DICE_WEIGHT = 1.0
DICE_SMOOTH = 1.0
ADE20K_SPLITS = ("training", "validation")

Loader = Callable[[], tuple[Image.Image, Image.Image]]


def _square(image: Image.Image, size: int, resample, short: int | None = None) -> Image.Image:
    """Shorter side to `short` (default `size`), then the centre `size` square (the same box
    for image and labels)."""
    short = short or size
    scale = short / min(image.width, image.height)
    w, h = max(short, round(image.width * scale)), max(short, round(image.height * scale))
    image = image.resize((w, h), resample)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _tensors(image: Image.Image, labels: Image.Image) -> dict:
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return {
        "image": x.float() / 255.0,
        "target": torch.from_numpy(np.asarray(labels).astype(np.int64)),
    }


class SegmentationImages(Dataset):
    """Items {"image": (3, S, S) float in [0, 1], "target": (S, S) int64, IGNORE = no label}:
    the shorter side resized to S and the centre square (the fast protocol's view)."""

    def __init__(self, pairs: list[Loader], size: int, num_classes: int, class_names: list):
        self.pairs, self.size = pairs, size
        self.num_classes, self.class_names = num_classes, class_names

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[Image.Image, Image.Image]:
        """(RGB image, label map with the classes 0..K-1 and IGNORE) of item i, full size."""
        image, labels = self.pairs[i]()
        if image.size != labels.size:
            name = getattr(labels, "filename", "") or f"item {i}"
            raise DataError(f"{name}: label map {labels.size} but image {image.size} (w, h)")
        return image.convert("RGB"), labels

    def __getitem__(self, i: int) -> dict:
        image, labels = self.load(i)
        return _tensors(
            _square(image, self.size, Image.BICUBIC), _square(labels, self.size, Image.NEAREST)
        )


class CentreViews(SegmentationImages):
    """The paper protocol's scoring views: the shorter side resized to round(S * 256/224),
    then the centre S square (resize 256 / centre crop 224 at S = 224)."""

    def __getitem__(self, i: int) -> dict:
        image, labels = self.load(i)
        short = round(self.size * 256 / 224)
        return _tensors(
            _square(image, self.size, Image.BICUBIC, short),
            _square(labels, self.size, Image.NEAREST, short),
        )


class CropViews(SegmentationImages):
    """The paper protocol's training views: a random resized crop (area 0.25-1 of the image,
    aspect ratio 3/4-4/3) to S x S, image bicubic and labels nearest, flipped with p = 0.5.
    Drawn from (seed, epoch, item), so every step sees new views and a run repeats."""

    def __init__(self, base: SegmentationImages, seed: int = 0) -> None:
        super().__init__(base.pairs, base.size, base.num_classes, base.class_names)
        self.seed, self.epoch = seed, 0

    def box(self, i: int, width: int, height: int) -> tuple[tuple[int, int, int, int], bool]:
        """((left, top, right, bottom), flipped) of item i's view in this epoch."""
        rng = np.random.default_rng(derive_seed(self.seed, 17, self.epoch, i))
        left, top, w, h = random_resized_box(rng, width, height, PAPER_CROP_SCALE)
        return (left, top, left + w, top + h), bool(rng.uniform() < 0.5)

    def __getitem__(self, i: int) -> dict:
        image, labels = self.load(i)
        box, flip = self.box(i, image.width, image.height)
        image = image.resize((self.size, self.size), Image.BICUBIC, box=box)
        labels = labels.resize((self.size, self.size), Image.NEAREST, box=box)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            labels = labels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _tensors(image, labels)


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


def _image_label_pairs(images: Path, labels: Path) -> list[tuple[Path, Path]]:
    """(image, label map NAME.png) of every image in `images`; DataError where one has none."""
    pairs = []
    for path in sorted(images.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            label = labels / f"{path.stem}.png"
            if not label.is_file():
                raise DataError(f"{label}: no label map for {path.name}")
            pairs.append((path, label))
    if not pairs:
        raise DataError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return pairs


def is_ade20k_layout(root: Path) -> bool:
    """Whether `root` is meant in ADE20K's layout (it has images/training or annotations/);
    `ade20k_pairs` then says what is missing."""
    return (root / "images" / "training").is_dir() or (root / "annotations").is_dir()


def ade20k_pairs(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """{split: [(image, label map)]} of a folder in ADE20K's layout."""
    missing = [
        f"{top}/{split}/"
        for top in ("images", "annotations")
        for split in ADE20K_SPLITS
        if not (root / top / split).is_dir()
    ]
    if missing:
        raise DataError(
            f"{root}: a folder in ADE20K's layout needs images/{{training,validation}}/ and "
            f"annotations/{{training,validation}}/; missing {', '.join(missing)}"
        )
    return {
        split: _image_label_pairs(root / "images" / split, root / "annotations" / split)
        for split in ADE20K_SPLITS
    }


def _folder_pairs(root: Path) -> list[tuple[Path, Path]]:
    images, labels = root / "images", root / "labels"
    if not images.is_dir() or not labels.is_dir():
        raise DataError(
            f"{root}: a segmentation folder needs images/ and labels/ (NAME.png label maps), "
            "or ADE20K's images/{training,validation}/ and annotations/{training,validation}/"
        )
    return _image_label_pairs(images, labels)


def _ade20k_labels(path: Path) -> Image.Image:
    """ADE20K's label map with its convention undone: 0 (no label) -> IGNORE, 1..K -> 0..K-1."""
    with Image.open(path) as img:
        raw = np.asarray(img).astype(np.int32)
    labels = raw - 1
    labels[raw == 0] = IGNORE
    out = Image.fromarray(labels)  # mode "I": resized (nearest) and cropped as the image
    out.filename = str(path)
    return out


def _open_labels(path: Path) -> Image.Image:
    img = Image.open(path)
    img.load()
    return img


def _open_pair(image: Path, labels: Path, read_labels: Callable[[Path], Image.Image]):
    with Image.open(image) as img:
        rgb = img.convert("RGB")
    return rgb, read_labels(labels)


def folder_splits(root, size: int, seed: int, val_root=None) -> tuple[SegmentationImages, ...]:
    """(train, val) of a folder: ADE20K's layout (its training and validation splits, label 0
    ignored and 1..K the classes) or images/ + labels/ (80/20 unless `val_root`)."""
    from .features import split_indices

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(2, "no such folder (--data)", str(root))
    if is_ade20k_layout(root):
        if val_root is not None:
            raise ConfigError(
                "--val-data: a folder in ADE20K's layout has its own validation split"
            )
        pairs = ade20k_pairs(root)
        train, val = pairs["training"], pairs["validation"]
        read, shift = _ade20k_labels, 1
    else:
        pairs = _folder_pairs(root)
        if val_root is not None:
            train, val = pairs, _folder_pairs(Path(val_root))
        else:
            tr, va = split_indices(len(pairs), seed)
            train, val = [pairs[i] for i in tr], [pairs[i] for i in va]
        read, shift = _open_labels, 0
    # The classes are those the label maps hold: ADE20K's 1..K become 0..K-1, an
    # images/labels folder's values other than 255 are the classes themselves.
    top = 0
    for _, label in train + val:
        with Image.open(label) as img:
            values = np.unique(np.asarray(img))
        values = values[values != (0 if shift else IGNORE)]
        top = max(top, int(values.max()) + 1 - shift if len(values) else 0)
    if top == 0:
        raise DataError(f"{root}: no labelled pixel in the label maps")
    if top > IGNORE:  # a class IGNORE or above could not be told from an ignored pixel
        raise DataError(f"{root}: more than {IGNORE} classes in the label maps")
    names = [f"class {c + shift}" for c in range(top)]  # named by the value in the files
    return tuple(
        SegmentationImages([partial(_open_pair, *p, read) for p in split], size, top, names)
        for split in (train, val)
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
    """BatchNorm + Linear on each patch (the public code's BatchNorm2d + 1x1 convolution);
    logits (B, C, h, w) at the patch grid, or upsampled (bilinear) to `size` when given."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, feats: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        b, h, w, d = feats.shape
        logits = self.linear(self.norm(feats.reshape(-1, d))).view(b, h, w, -1)
        logits = logits.permute(0, 3, 1, 2)
        if size is None:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


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
    return iou_from_counts(*intersection_union(pred, target, num_classes))


def iou_from_counts(inter, union) -> tuple[float, list[float | None]]:
    """`mean_iou` of summed per-class (intersection, union) counts."""
    per_class = [100.0 * i / u if u > 0 else None for i, u in zip(inter.tolist(), union.tolist())]
    present = [v for v in per_class if v is not None]
    return (sum(present) / len(present) if present else 0.0), per_class


def evaluate_segmentation(
    model,
    train: SegmentationImages,
    val: SegmentationImages,
    batch_size: int = 64,
    epochs: int = FAST_EPOCHS,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    out_dir=None,
) -> dict:
    """The fast protocol: both heads trained on `train`'s features computed once, scored per
    pixel on `val`; a picture in out_dir when given."""
    tr_dense, tr_low, tr_t = patch_features(model, train, batch_size, progress)
    va_dense, va_low, va_t = patch_features(model, val, batch_size, progress)
    size = tuple(va_t.shape[-2:])
    res: dict = {
        "protocol": "fast",
        "num_train": len(train),
        "num_val": len(val),
        "classes": train.class_names,
        "epochs": int(epochs),
        "lr": float(lr),
    }
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


# ----------------------------------------------------------------------------- paper protocol


def labels_at_grid(target: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Label maps (B, H, W) downsampled (nearest) to the patch grid, as the public code
    resizes its targets to the logits (F.interpolate, mode "nearest")."""
    return F.interpolate(target[:, None].float(), size=grid, mode="nearest")[:, 0].long()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH):
    """1 - the mean over all C classes of the soft Dice (2 sum(p t) + smooth) /
    (sum(p) + sum(t) + smooth), p the softmax of logits (B, C, H, W), t the one-hot target
    (B, H, W), both summed over the batch and the pixels that are not IGNORE."""
    valid = target != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    probs = logits.float().softmax(1) * valid[:, None]
    onehot = F.one_hot(torch.where(valid, target, 0), logits.shape[1]).permute(0, 3, 1, 2)
    onehot = onehot * valid[:, None]
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1.0 - ((2.0 * inter + smooth) / (total + smooth)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper protocol's loss: cross-entropy (IGNORE left out) + DICE_WEIGHT x `dice_loss`,
    on logits and labels of the same size (the patch grid); 0 where no pixel is labelled
    (cross-entropy's mean over no pixel would be NaN)."""
    if not (target != IGNORE).any():
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE)
    return ce + DICE_WEIGHT * dice_loss(logits, target)


def _views_at_grid(model, views: SegmentationImages, indices: list[int], pool, fit) -> tuple:
    """({"": dense, "_lowrank": A·S} each (B, h, w, D), labels (B, h, w) at the patch grid),
    on the model's device, of views[i] for i in indices."""
    from .features import encode_in_passes, load_items

    items = load_items(views, indices, pool)
    images = torch.stack([it["image"] for it in items])
    grid = model.encoder.grid_size(*images.shape[-2:])
    feats = encode_in_passes(
        model, images, fit.pass_size, lambda out: {"": out["dense"], "_lowrank": out["lowrank"]}
    )
    target = labels_at_grid(torch.stack([it["target"] for it in items]), grid)
    feats = {name: f.unflatten(1, grid) for name, f in feats.items()}
    return feats, target.to(feats[""].device)


def evaluate_segmentation_paper(
    model,
    train: SegmentationImages,
    val: SegmentationImages,
    batch_size: int = 64,
    epochs: int = PAPER_EPOCHS,
    lr: float = PAPER_LR,
    seed: int = 0,
    progress: bool = True,
    out_dir=None,
    probe_batch: int | None = None,
) -> dict:
    """The paper protocol (see the module's docstring): both heads trained on new views of
    `train` every step and scored at the patch grid on centre crops of `val`; a picture in
    out_dir when given. `batch_size` is the images per forward pass of the frozen model,
    `probe_batch` the images per step (2048, fewer where there are fewer training images or
    where CUDA runs out of memory: see `ProbeBatch`)."""
    from tqdm import tqdm

    from .features import PAPER_BATCH, PAPER_CLIP, ProbeBatch, bf16_autocast, loader_pool

    device = next(model.parameters()).device
    crops = CropViews(train, seed)
    centres = CentreViews(val.pairs, val.size, val.num_classes, val.class_names)
    fit = ProbeBatch(probe_batch or PAPER_BATCH, len(crops), batch_size)
    dim, num_classes = int(model.embed_dim), train.num_classes
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    heads = {name: SegmentationHead(dim, num_classes).to(device) for name in ("", "_lowrank")}
    torch.random.set_rng_state(state)
    opts = {
        name: torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=PAPER_WEIGHT_DECAY)
        for name, head in heads.items()
    }
    gen = torch.Generator().manual_seed(seed)

    def step(order: list[int], pos: int, pool) -> int:
        """One step of both heads on the views of order[pos:pos + fit.size]; how many it took
        (`fit.size` is read here, so that a retry after running out of memory takes fewer)."""
        indices = order[pos : pos + fit.size]
        feats, target = _views_at_grid(model, crops, indices, pool, fit)
        if not (target != IGNORE).any():  # no labelled patch: nothing to learn from
            return len(indices)
        loss = 0.0
        for name, head in heads.items():
            with bf16_autocast(device):
                logits = head(feats[name])
            loss = loss + segmentation_loss(logits, target)
        # Every gradient before any update, so that a retry after running out of memory
        # never updates a head twice on one batch; the heads share no parameter, so one
        # backward of the sum gives each its own gradient.
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, head in heads.items():
            torch.nn.utils.clip_grad_norm_(head.parameters(), PAPER_CLIP)
            opts[name].step()
        return len(indices)

    def score(pool) -> tuple[dict, dict]:
        counts = {name: [0, 0] for name in heads}
        preds: dict[str, list] = {name: [] for name in heads}
        for start in range(0, len(centres), fit.pass_size):
            indices = list(range(start, min(len(centres), start + fit.pass_size)))
            feats, target = _views_at_grid(model, centres, indices, pool, fit)
            for name, head in heads.items():
                with torch.no_grad(), bf16_autocast(device):
                    pred = head(feats[name]).argmax(1)
                inter, union = intersection_union(pred.cpu(), target.cpu(), num_classes)
                counts[name][0] += inter
                counts[name][1] += union
                preds[name].append(pred.cpu())
        return counts, {name: torch.cat(p) for name, p in preds.items()}

    with loader_pool() as pool:
        for epoch in tqdm(range(epochs), desc="segmentation", leave=False, disable=not progress):
            crops.epoch = epoch
            for head in heads.values():
                head.train()
            order = torch.randperm(len(crops), generator=gen).tolist()
            pos = 0
            while pos < len(order):
                pos += fit.retry(partial(step, order, pos, pool))
        for head in heads.values():
            head.eval()
        counts, preds = fit.retry(partial(score, pool))
    size = train.size
    grid = model.encoder.grid_size(size, size)
    res: dict = {
        "protocol": "paper",
        "num_train": len(train),
        "num_val": len(val),
        "classes": train.class_names,
        "epochs": int(epochs),
        "lr": float(lr),
        **fit.describe(),
        "grad_clip": PAPER_CLIP,
        "autocast": "bf16" if device.type == "cuda" else "none",
        "loss": f"cross-entropy + {DICE_WEIGHT:g} x Dice",
        "views": f"random resized crop {PAPER_CROP_SCALE[0]:g}-{PAPER_CROP_SCALE[1]:g} + flip "
        f"to {size}; scored on resize {round(size * 256 / 224)} / centre crop {size}",
        "scored_at": f"patch grid {grid[0]}x{grid[1]}",
    }
    for name in heads:
        miou, per_class = iou_from_counts(*counts[name])
        res[f"miou{name}"] = miou
        res[f"iou_per_class{name}"] = dict(zip(train.class_names, per_class))
    if out_dir is not None:
        res["figure"] = str(
            plot_segmentation(
                centres, preds[""], Path(out_dir) / "segmentation.png", title="predicted (D, grid)"
            )
        )
    return res


def plot_segmentation(
    val: SegmentationImages,
    pred: torch.Tensor,
    path: Path,
    n: int = 6,
    title: str = "predicted (D)",
) -> Path:
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
        for row, (panel, heading) in enumerate(zip(panels, ("image", "true", title))):
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
                ax.set_title(heading, fontsize=9, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
