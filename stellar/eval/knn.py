"""Weighted cosine k-NN classification of frozen features (the DINO protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
) -> torch.Tensor:
    """Predicted labels (Q,): the k most cosine-similar training features vote with exp(sim / T)."""
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    preds = []
    for s in range(0, len(query_x), chunk):
        q = F.normalize(query_x[s : s + chunk].float(), dim=1)
        sim = q @ train.T
        top, idx = sim.topk(k, dim=1)
        weights = (top / temperature).exp()
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_y[idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_eval(train_x, train_y, val_x, val_y, num_classes=None, k=20, temperature=0.07) -> dict:
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max())) + 1
    pred = knn_predict(train_x, train_y, val_x, num_classes, k, temperature)
    return {
        "top1": 100.0 * (pred == val_y).float().mean().item(),
        "k": int(min(k, len(train_x))),
        "temperature": temperature,
        "num_train": int(len(train_x)),
        "num_val": int(len(val_x)),
    }
