"""Online clustering head: MLP predictor, L2-normalized bottleneck, prototypes.

logits = normalize(MLP(x)) @ prototypes.T, which the SK temperature (0.06) and the
prediction temperature (0.12) divide. As in the public code (and CAPI) the prototypes
are not normalized, so their norms (about sqrt(bottleneck_dim) at initialization) sharpen
the logits; `normalize_prototypes=True` makes the logits cosine similarities in [-1, 1].
One head serves the sparse tokens, another the CLS token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClusteringHead(nn.Module):
    """2-layer MLP (hidden `hidden_dim`) to `bottleneck_dim`, then `num_prototypes` prototypes.

    The prototypes are a bias-free Linear, its rows L2-normalized in the forward pass
    only with `normalize_prototypes`.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_prototypes: int = 16384,
        normalize_prototypes: bool = True,
    ) -> None:
        super().__init__()
        self.normalize_prototypes = normalize_prototypes
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)
        )
        self.prototypes = nn.Linear(bottleneck_dim, num_prototypes, bias=False)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.prototypes.weight)

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.out_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalized bottleneck features (..., bottleneck_dim)."""
        return F.normalize(self.mlp(x), dim=-1, eps=1e-7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (..., P): x's normalized embedding dotted with the prototypes."""
        z = self.embed(x)
        w = self.prototypes.weight
        if self.normalize_prototypes:
            w = F.normalize(w, dim=-1, eps=1e-7)
        return F.linear(z, w.to(z.dtype))
