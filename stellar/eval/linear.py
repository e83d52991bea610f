"""Linear probing of frozen features (paper appendix A.2).

LayerNorm + one linear layer on frozen image-level features, trained with
AdamW. The learning rate is picked on 10% of the training split held out for
validation, then the probe is trained again on the whole training split with
that rate and scored on the evaluation split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

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
