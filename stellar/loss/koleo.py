"""KoLeo regularizer (Sablayrolles et al., 2018; paper eq. 11) on each image's sparse tokens.

For every set of K L2-normalized tokens, each token's distance to its nearest
neighbour in the same set d_k; the loss is -mean(log(d_k + eps)) over tokens
and sets. It grows as tokens of one image collapse onto each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(tokens: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo of token sets (S, K, D), K >= 2, averaged over all S*K tokens, float32."""
    if tokens.dim() != 3 or tokens.shape[1] < 2:
        raise ValueError(f"koleo_loss needs token sets (S, K >= 2, D), got {tuple(tokens.shape)}")
    x = F.normalize(tokens.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.transpose(1, 2)
        eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        nearest = dots.masked_fill(eye, -3.0).argmax(dim=-1)  # max cosine = min distance
    neighbours = x.gather(1, nearest.unsqueeze(-1).expand_as(x))
    dist = F.pairwise_distance(x, neighbours, p=2, eps=eps)
    return -torch.log(dist + eps).mean()
