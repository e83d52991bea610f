"""The token-map picture shows each token's region at any sharpness of A."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stellar.eval.visualize import plot_token_maps, token_maps, token_region, token_threshold


class SoftModel(torch.nn.Module):
    """A stand-in encoder whose A is soft, as early in training: token k takes 0.3 on its own
    column band of an 8 x 8 grid and the rest is spread evenly, so no entry reaches 0.5."""

    def __init__(self, k: int = 8):
        super().__init__()
        self.k = k
        self.encoder = self
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device to read

    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        return h // 8, w // 8

    def encode(self, images: torch.Tensor) -> dict:
        b = images.shape[0]
        h, w = self.grid_size(*images.shape[-2:])
        owner = torch.arange(w).repeat(h) * self.k // w  # the token owning each patch
        spatial = torch.full((b, h * w, self.k), 0.7 / (self.k - 1))
        spatial[:, torch.arange(h * w), owner] = 0.3
        return {"spatial": spatial}


def test_default_threshold_is_twice_the_uniform_share():
    assert token_threshold(None, 8) == pytest.approx(0.25)
    assert token_threshold(None, 16) == pytest.approx(0.125)
    assert token_threshold(0.5, 8) == 0.5


def test_every_token_has_a_region_under_the_default_but_none_at_one_half(tmp_path):
    model = SoftModel()
    images = torch.rand(2, 3, 64, 64)
    maps = token_maps(model, images).numpy()
    assert maps.max() < 0.5
    default = token_threshold(None, model.k)
    for k in range(model.k):
        region = token_region(maps[0, k], default)
        assert 0 < region.mean() < 0.5, (k, region.mean())  # its band, not the whole image
        assert not token_region(maps[0, k], 0.5).any()
    path = plot_token_maps(model, images, tmp_path / "token_maps.png")
    assert path.stat().st_size > 1000
    assert np.isclose(default, 2 / model.k)
