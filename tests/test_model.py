"""Shapes and contracts of the STELLAR model's modules, against independent computations."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import stellar
from stellar.layers import RandomFourierPosEmbed, focal_mask, keep_count, mixed_mask
from stellar.models import ClusteringHead, PixelDecoder, SparseViTEncoder, Stellar, load_vit_weights
from stellar.testing import mini_model_kwargs
from stellar.train.checkpoint import save_weights

D_TINY = 192


@pytest.fixture(scope="module")
def model() -> Stellar:
    torch.manual_seed(0)
    return Stellar(**mini_model_kwargs()).eval()


# ------------------------------------------------------------------------- layers


@pytest.mark.parametrize("dim,h,w", [(32, 4, 4), (64, 3, 5)])
def test_fourier_encoding_matches_float64_and_has_unit_pairs(dim, h, w):
    torch.manual_seed(1)
    pe = RandomFourierPosEmbed(dim, scale=2.0)
    out = pe(h, w)
    assert out.shape == (1, h * w, dim)
    # Independent float64 computation: patch centres in [-1, 1], 2 pi p G.
    g = pe.freqs.double()
    ys = [(i + 0.5) / h * 2 - 1 for i in range(h)]
    xs = [(j + 0.5) / w * 2 - 1 for j in range(w)]
    coords = torch.tensor([[y, x] for y in ys for x in xs], dtype=torch.float64)
    proj = 2 * math.pi * coords @ g
    ref = torch.cat([proj.sin(), proj.cos()], dim=-1)
    torch.testing.assert_close(out[0].double(), ref, atol=1e-5, rtol=0)
    # sin^2 + cos^2 = 1 per frequency: every position has norm sqrt(dim / 2).
    torch.testing.assert_close(out[0].norm(dim=-1), torch.full((h * w,), math.sqrt(dim / 2)))
    assert pe.freqs.std().item() == pytest.approx(2.0, rel=0.5)  # the scale is honoured
    # Positions are distinguishable.
    assert torch.cdist(out[0], out[0]).add(torch.eye(h * w) * 1e3).min() > 1e-3


def test_fourier_encoding_is_a_saved_buffer():
    pe = RandomFourierPosEmbed(16)
    assert "freqs" in pe.state_dict()


@pytest.mark.parametrize(
    "n,ratio,expected", [(64, 0.8, 13), (196, 0.8, 39), (16, 0.6, 6), (4, 0.99, 1)]
)
def test_keep_count(n, ratio, expected):
    assert keep_count(n, ratio) == expected


def test_focal_mask_ratio_and_indices():
    g = torch.Generator().manual_seed(0)
    keep = focal_mask(50, 14, 14, 0.8, 0.25, generator=g)
    assert keep.shape == (50, 39) and keep.dtype == torch.int64
    assert (keep[:, 1:] > keep[:, :-1]).all()  # sorted, no repeats
    assert keep.min() >= 0 and keep.max() < 196
    again = focal_mask(50, 14, 14, 0.8, 0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


def test_focal_mask_concentrates_kept_patches():
    """With a focal bias the kept patches lie closer together than with uniform masking."""

    def spread(sigma):
        keep = focal_mask(200, 16, 16, 0.8, sigma, generator=torch.Generator().manual_seed(3))
        yx = torch.stack([keep // 16, keep % 16], dim=-1).float()
        return torch.cdist(yx, yx).mean().item()

    assert spread(0.15) < 0.7 * spread(0.0)


@pytest.mark.parametrize("grid", [(14, 14), (9, 13)])
def test_mixed_mask_ratio_and_indices(grid, rng_seed):
    h, w = grid
    keep = mixed_mask(40, h, w, 0.8, 0.5, (0.1, 0.5), torch.Generator().manual_seed(rng_seed))
    assert keep.shape == (40, keep_count(h * w, 0.8)) and keep.dtype == torch.int64
    assert (keep[:, 1:] > keep[:, :-1]).all() and keep.min() >= 0 and keep.max() < h * w


def _densest_window(keep: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per view, the most kept patches in any 3x3 window of the grid, (batch,)."""
    grid = torch.zeros(keep.shape[0], h * w).scatter_(1, keep, 1.0).view(-1, 1, h, w)
    return torch.nn.functional.conv2d(grid, torch.ones(1, 1, 3, 3)).amax(dim=(1, 2, 3))


def test_mixed_mask_biases_a_share_of_the_views(rng_seed):
    """focal_prob 0: uniform masks (every patch kept about equally often); 1: each view keeps
    a dense blob around its centre; 0.5: about half of the views do."""
    g = torch.Generator().manual_seed(rng_seed)
    n, side = 4000, 16
    uniform = mixed_mask(n, side, side, 0.8, 0.0, (0.1, 0.5), g)
    counts = torch.bincount(uniform.flatten(), minlength=side * side).float()
    expected = n * uniform.shape[1] / (side * side)
    assert (counts - expected).abs().max() < 6 * expected**0.5  # binomial spread
    dense = 8  # of 9: a blob (uniform masks keeping 20% reach it about never)
    blob = lambda keep: (_densest_window(keep, side, side) >= dense).float().mean().item()  # noqa: E731
    assert blob(uniform) < 0.01
    every = blob(mixed_mask(n, side, side, 0.8, 1.0, (0.1, 0.1), g))
    assert every > 0.7  # not all: a centre on the border has no full window around it
    half = blob(mixed_mask(n, side, side, 0.8, 0.5, (0.1, 0.1), g))
    assert abs(half - every / 2) < 0.05, (half, every)


@pytest.mark.parametrize("normalize", [True, False])
def test_clustering_head_prototypes(normalize, rng_seed):
    """Logits are the normalized embedding dotted with the prototypes, normalized or not."""
    from stellar.models.heads import ClusteringHead

    head = ClusteringHead(12, 16, 8, 10, normalize_prototypes=normalize).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    z = head.mlp(x)
    z = z / z.norm(dim=-1, keepdim=True)
    wt = head.prototypes.weight
    if normalize:
        wt = wt / wt.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(head(x), z @ wt.T)
    if not normalize:  # sharper than cosines: some logit magnitude above 1
        assert head(x).abs().max() > 1


# ------------------------------------------------------------------------- modules


@pytest.mark.parametrize("size", [32, 48])
def test_encoder_shapes_and_variable_size(size):
    enc = SparseViTEncoder("vit_tiny_patch16_224", 32, 8, num_tokens=5, vit_kwargs={"depth": 1})
    x = torch.randn(2, 3, size, size)
    out = enc(x)
    n = (size // 8) ** 2
    assert out.cls.shape == (2, 1, D_TINY)
    assert out.dense.shape == (2, n, D_TINY)
    assert out.sparse.shape == (2, 5, D_TINY)


def test_encoder_masked_view_keeps_listed_patches():
    torch.manual_seed(0)
    enc = SparseViTEncoder("vit_tiny_patch16_224", 32, 8, num_tokens=3, vit_kwargs={"depth": 1})
    x = torch.randn(2, 3, 32, 32)
    keep_all = torch.arange(16).expand(2, 16)
    full, same = enc(x), enc(x, keep_all)
    torch.testing.assert_close(full.sparse, same.sparse)
    torch.testing.assert_close(full.dense, same.dense)
    keep = torch.tensor([[0, 5, 9], [1, 2, 15]])
    part = enc(x, keep)
    assert part.dense.shape == (2, 3, D_TINY) and part.sparse.shape == (2, 3, D_TINY)
    assert not torch.allclose(part.sparse, full.sparse)


def test_encoder_rejects_size_not_multiple_of_patch():
    enc = SparseViTEncoder("vit_tiny_patch16_224", 32, 8, num_tokens=3, vit_kwargs={"depth": 1})
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc(torch.randn(1, 3, 30, 32))


@pytest.mark.parametrize("grid", [(4, 4), (2, 3)])
def test_decoder_shapes(grid):
    dec = PixelDecoder(48, patch_size=8, dim=32, depth=1, num_heads=2, mlp_dim=64)
    h, w = grid
    out = dec(torch.randn(3, h * w, 48), grid if h != w else None)
    assert out.shape == (3, 3, h * 8, w * 8)
    with pytest.raises(ValueError):
        dec(torch.randn(3, 6, 48))  # not a square grid and no grid_size


def test_decoder_default_is_the_papers():
    dec = PixelDecoder(768, patch_size=16)
    assert len(dec.blocks) == 6 and dec.embed.out_features == 512
    assert dec.blocks[0].attn.num_heads == 8 and dec.blocks[0].mlp.fc1.out_features == 2048
    assert dec.pixel_head.kernel_size == (16, 16) and dec.pixel_head.stride == (16, 16)


def test_clustering_head():
    head = ClusteringHead(48, hidden_dim=64, bottleneck_dim=16, num_prototypes=40)
    x = torch.randn(2, 5, 48)
    logits = head(x)
    assert logits.shape == (2, 5, 40)
    assert head.prototypes.bias is None and head.num_prototypes == 40
    # Cosine similarities: bounded by 1, and equal to the normalized dot product.
    z = torch.nn.functional.normalize(head.mlp(x).double(), dim=-1)
    p = torch.nn.functional.normalize(head.prototypes.weight.double(), dim=-1)
    torch.testing.assert_close(logits.double(), z @ p.T, atol=1e-5, rtol=0)
    assert logits.abs().max() <= 1 + 1e-5


# ------------------------------------------------------------------------- STELLAR


def test_encode_contract(model):
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model.encode(x)
    k, n, d = 4, 16, D_TINY
    assert set(out) == {"sparse", "spatial", "cls", "dense", "lowrank"}
    assert out["sparse"].shape == (2, k, d)
    assert out["spatial"].shape == (2, n, k)
    assert out["cls"].shape == (2, 1, d)
    assert out["dense"].shape == (2, n, d)
    assert out["lowrank"].shape == (2, n, d)
    torch.testing.assert_close(out["spatial"].sum(-1), torch.ones(2, n))
    # Independent float64 computation of eq. 14 and eq. 1 from the encoder's outputs.
    dense = model.proj_dense(out["dense"]).double()
    sparse = model.proj_sparse(out["sparse"]).double()
    cos = torch.nn.functional.normalize(dense, dim=-1) @ torch.nn.functional.normalize(
        sparse, dim=-1
    ).transpose(1, 2)
    spatial = torch.softmax(cos / 0.06, dim=-1)
    torch.testing.assert_close(out["spatial"].double(), spatial, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        out["lowrank"].double(), spatial @ out["sparse"].double(), atol=1e-4, rtol=1e-4
    )


def test_encode_normalizes_with_imagenet_statistics(model):
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model.encode(x)["sparse"]
        direct = model.encoder((x - mean) / std).sparse
    torch.testing.assert_close(ours, direct)


def test_encode_rejects_bad_images(model):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.rand(3, 32, 32))


def test_reconstruct(model):
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        rec = model.reconstruct(x)
        again = model.reconstruct(model.encode(x))
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1
    torch.testing.assert_close(rec, again)


def test_load_run_dir_checkpoint_and_safetensors(model, tmp_path):
    cfg = {"model": model.config}
    save_weights(tmp_path / "model.safetensors", model, cfg, step=3)
    torch.save({"config": cfg, "model": model.state_dict(), "step": 3}, tmp_path / "checkpoint.pt")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = model.encode(x)
    for path in (tmp_path, tmp_path / "checkpoint.pt", tmp_path / "model.safetensors"):
        loaded = stellar.load(path)
        assert not loaded.training
        with torch.no_grad():
            out = loaded.encode(x)
        for key in ref:
            torch.testing.assert_close(out[key], ref[key])
    with pytest.raises(FileNotFoundError):
        stellar.load(tmp_path / "nothing")


# ------------------------------------------------------------------------- --init


def _mae_state_dict(depth: int = 1, grid: int = 4, dim: int = D_TINY) -> dict:
    """A synthetic MAE pre-training checkpoint: timm ViT keys plus MAE's decoder keys."""
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=grid * 8,
        patch_size=8,
        depth=depth,
        embed_dim=dim,
    )
    state = {k: torch.randn_like(v) for k, v in vit.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 1, 128)
    state["decoder_embed.weight"] = torch.zeros(128, dim)
    state["decoder_pos_embed"] = torch.zeros(1, 1 + grid * grid, 128)
    state["decoder_blocks.0.attn.qkv.weight"] = torch.zeros(384, 128)
    state["decoder_norm.weight"] = torch.zeros(128)
    state["decoder_pred.weight"] = torch.zeros(3 * 64, 128)
    return {"model": state, "epoch": 799}


def test_init_from_mae_checkpoint(tmp_path):
    ckpt = _mae_state_dict(grid=6)  # trained at 48 px: the position embedding is resampled
    path = tmp_path / "mae.pth"
    torch.save(ckpt, path)
    torch.manual_seed(0)
    m = Stellar(**mini_model_kwargs())
    info = load_vit_weights(m.encoder.vit, path)
    assert "decoder_embed.weight" in info["ignored"] and "mask_token" in info["ignored"]
    own = m.encoder.vit.state_dict()
    for key, value in ckpt["model"].items():
        if key in own and key != "pos_embed":
            torch.testing.assert_close(own[key], value)
    assert own["pos_embed"].shape == (1, 17, D_TINY)
    torch.testing.assert_close(own["cls_token"], ckpt["model"]["cls_token"])
    # The class-token position is kept as it is.
    torch.testing.assert_close(own["pos_embed"][:, 0], ckpt["model"]["pos_embed"][:, 0])


def test_init_with_prefixed_timm_keys_in_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = {f"module.{k}": v for k, v in _mae_state_dict()["model"].items()}
    save_file(state, str(tmp_path / "vit.safetensors"))
    m = Stellar(**mini_model_kwargs())
    load_vit_weights(m.encoder.vit, tmp_path / "vit.safetensors")
    torch.testing.assert_close(m.encoder.vit.norm.weight, state["module.norm.weight"])


def test_init_mismatch_lists_keys(tmp_path):
    bad = _mae_state_dict(depth=2, dim=96)["model"]  # a deeper, narrower ViT
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    m = Stellar(**mini_model_kwargs())
    with pytest.raises(ValueError) as err:
        load_vit_weights(m.encoder.vit, tmp_path / "bad.pth")
    text = str(err.value)
    assert "unexpected keys" in text and "blocks.1.attn.qkv.weight" in text
    assert "extra.weight" in text
    assert "another shape" in text and "cls_token" in text
