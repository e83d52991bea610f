"""Linear probing of frozen features (paper appendix A.2).

LayerNorm + one linear layer on frozen image-level features, trained with
AdamW. The learning rate is picked on 10% of the training split held out for
validation, then the probe is trained again on the whole training split with
that rate and scored on the evaluation split.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.augment import crop_view
from ..data.loader import derive_seed
from .features import PAPER_BATCH

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def train_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lr: float,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Module:
    """A LayerNorm + Linear classifier trained with AdamW (cosine schedule) on (x, y)."""
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    probe = nn.Sequential(nn.LayerNorm(x.shape[1]), nn.Linear(x.shape[1], num_classes))
    torch.random.set_rng_state(torch_state)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(x)
    steps = epochs * max(1, -(-n // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            loss = loss_fn(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


@torch.no_grad()
def accuracy(probe: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (probe(x).argmax(1) == y).float().mean().item()


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int | None = None,
    lrs=DEFAULT_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """{"top1", "lr", "sweep": {lr: held-out accuracy}, "num_train", "num_val"}."""
    train_x, val_x = train_x.float(), val_x.float()
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max())) + 1
    n = len(train_x)
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = max(1, n // 10)
    hold, fit = torch.as_tensor(perm[:n_hold]), torch.as_tensor(perm[n_hold:])
    sweep = {}
    for lr in lrs:
        probe = train_probe(
            train_x[fit], train_y[fit], num_classes, lr, epochs, batch_size, seed=seed
        )
        sweep[float(lr)] = accuracy(probe, train_x[hold], train_y[hold])
    best = max(sweep, key=lambda k: (sweep[k], -abs(np.log(k / 1e-2))))
    probe = train_probe(train_x, train_y, num_classes, best, epochs, batch_size, seed=seed)
    return {
        "top1": accuracy(probe, val_x, val_y),
        "train_top1": accuracy(probe, train_x, train_y),
        "lr": best,
        "sweep": {str(k): v for k, v in sweep.items()},
        "num_train": int(n),
        "num_val": int(len(val_x)),
        "num_classes": int(num_classes),
    }


def evaluate_linear(
    model,
    data,
    features: str = "sparse",
    batch_size: int = 64,
    lrs=DEFAULT_LRS,
    epochs: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """`linear_probe` of `model`'s frozen `features` on an EvalData's train/val split."""
    from .features import extract_splits

    tr, va, n_cls = extract_splits(model, data, features, batch_size, progress)
    res = linear_probe(
        tr[features], tr["labels"], va[features], va["labels"], n_cls, lrs, epochs, seed=seed
    )
    res["features"] = features
    return res


# ---------------------------------------------------------------------------- augmented views

AUGMENT_SCALE = (0.2, 1.0)
AUGMENT_LR = 1e-3
AUGMENT_EPOCHS = 30


class AugmentedViews(torch.utils.data.Dataset):
    """The public probe's views of an EvalImages split: for training a random resized crop
    (scale 0.2-1) with a flip, new every epoch; for evaluation the shorter side resized to
    size * 256/224 and a centre crop (resize 256 / crop 224 at 224)."""

    def __init__(self, images, size: int, train: bool, seed: int = 0) -> None:
        self.images, self.size, self.train, self.seed = images, size, train, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict | None:
        j = self.images.indices[i]
        try:
            img, label = self.images.base.load(j, self.size)
        except (OSError, ValueError):
            return None  # unreadable: skipped, as the frozen probe skips it
        if self.train:
            rng = np.random.default_rng(derive_seed(self.seed, 11, self.epoch, j))
            view = crop_view(img, rng, self.size, AUGMENT_SCALE)
        else:
            short = round(self.size * 256 / 224)
            scale = short / min(img.width, img.height)
            img = img.resize(
                (max(short, round(img.width * scale)), max(short, round(img.height * scale))),
                Image.BICUBIC,
            )
            left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
            view = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return {"image": view.float() / 255.0, "label": label, "index": j}


def evaluate_linear_augmented(
    model,
    data,
    features: str = "sparse",
    batch_size: int = 64,
    lr: float = AUGMENT_LR,
    epochs: int = AUGMENT_EPOCHS,
    seed: int = 0,
    progress: bool = True,
    probe_batch: int = PAPER_BATCH,
) -> dict:
    """The public code's linear probe: LayerNorm + Linear on the frozen model's pooled
    `features`, AdamW (lr, weight decay 1e-4, no schedule), trained on augmented views drawn
    anew every epoch (`AugmentedViews`), scored on centre crops of the evaluation split.

    As its trainer: `probe_batch` images per step (2048, or the training images where fewer,
    or less where CUDA runs out of memory: see `ProbeBatch`), the gradient norm clipped to 5,
    bf16 autocast on CUDA. `batch_size` is the images per forward pass of the frozen model."""
    from tqdm import tqdm

    from .features import (
        PAPER_CLIP,
        ProbeBatch,
        bf16_autocast,
        collate,
        encode_in_passes,
        extract,
        load_items,
        loader_pool,
        pool_features,
    )

    device = next(model.parameters()).device
    size = data.train.size
    train = AugmentedViews(data.train, size, train=True, seed=seed)
    fit = ProbeBatch(probe_batch, len(train), batch_size)
    with bf16_autocast(device):
        val = fit.retry(
            lambda: extract(
                model,
                AugmentedViews(data.val, size, False),
                (features,),
                fit.pass_size,
                "val",
                progress,
            )
        )
    num_classes = max(len(data.classes), int(val["labels"].max()) + 1)
    dim = val[features].shape[1]
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    probe = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes)).to(device)
    torch.random.set_rng_state(torch_state)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)

    def step(order: list[int], pos: int, pool) -> int:
        """One optimizer step on the images from order[pos]; how many it took (`fit.size`
        is read here, so that a retry after running out of memory takes fewer)."""
        indices = order[pos : pos + fit.size]
        batch = collate(load_items(train, indices, pool))
        if batch is None:  # every image of the batch unreadable
            return len(indices)
        x = encode_in_passes(
            model, batch["image"], fit.pass_size, lambda out: {"x": pool_features(out, features)}
        )["x"]
        with bf16_autocast(device):
            logits = probe(x)
        loss = loss_fn(logits.float(), batch["label"].long().to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), PAPER_CLIP)
        opt.step()
        return len(indices)

    with loader_pool() as pool:
        for epoch in tqdm(range(epochs), desc="augmented probe", leave=False, disable=not progress):
            train.epoch = epoch
            order = torch.randperm(len(train), generator=gen).tolist()
            pos = 0
            while pos < len(order):
                pos += fit.retry(partial(step, order, pos, pool))
    probe.eval()
    with torch.no_grad(), bf16_autocast(device):
        pred = probe(val[features].to(device)).argmax(1).cpu()
    return {
        "top1": 100.0 * (pred == val["labels"]).float().mean().item(),
        "lr": float(lr),
        "epochs": int(epochs),
        "protocol": "augmented views every epoch (random resized crop 0.2-1 + flip), "
        f"batch {fit.size}, gradient clipping {PAPER_CLIP:g}",
        **fit.describe(),
        "grad_clip": PAPER_CLIP,
        "autocast": "bf16" if device.type == "cuda" else "none",
        "features": features,
        "num_train": len(train),
        "num_val": int(len(val["labels"])),
        "num_classes": int(num_classes),
    }
