"""MaskGIT-VQGAN tokenizer (stellar.models.vq) and training with the VQ reconstruction target.

The tokenizer is checked against the released checkpoint's key set and shapes, a literal list
in tests/data; its forward against a functional float64 implementation of
that architecture; its codes against brute-force nearest neighbours. Training uses a
randomly initialized tokenizer saved in the released format.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import stellar
from stellar.errors import CheckpointError
from stellar.models.vq import MaskGITVQGAN
from stellar.testing import MINI_OVERRIDES
from stellar.train.train import main

MULT = (1, 1, 2, 2, 4)


RELEASED_KEYS = Path(__file__).parent / "data" / "maskgit_vqgan_imagenet_f16_256_keys.json"
"""Every key of maskgit-vqgan-imagenet-f16-256.bin with its shape, as the public PyTorch port
that loads the file strictly (bytedance/1d-tokenizer's PretrainedTokenizer) declares them."""


@pytest.fixture(scope="module")
def released_file(tmp_path_factory):
    """A randomly initialized tokenizer in the released format (a torch.save'd state dict)."""
    torch.manual_seed(0)
    model = MaskGITVQGAN()
    for p in model.parameters():
        p.data.normal_(0, 0.05)  # larger than the init, so that codes vary between patches
    path = tmp_path_factory.mktemp("vq") / "maskgit-vqgan-imagenet-f16-256.bin"
    torch.save(model.state_dict(), path)
    return path


def test_keys_and_shapes_are_the_released_checkpoints():
    released = {k: tuple(shape) for k, shape in json.loads(RELEASED_KEYS.read_text()).items()}
    got = {k: tuple(v.shape) for k, v in MaskGITVQGAN().state_dict().items()}
    assert list(got) == list(released)  # the same keys in the same order
    assert got == released


def test_strict_round_trip_frozen_and_in_eval_mode(released_file):
    state = torch.load(released_file, weights_only=True)
    model = MaskGITVQGAN.from_file(released_file)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    model.train()  # a parent's .train() leaves the frozen tokenizer in eval mode
    assert not model.training


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_a_wrong_key_set_names_the_keys(tmp_path, released_file, fault):
    state = torch.load(released_file, weights_only=True)
    if fault == "missing":
        del state["decoder.up.3.upsample_conv.bias"]
        name = "decoder.up.3.upsample_conv.bias"
    elif fault == "unexpected":
        state["encoder.extra.weight"] = torch.zeros(1)
        name = "encoder.extra.weight"
    else:
        state["quantize.embedding.weight"] = torch.zeros(512, 256)
        name = "quantize.embedding.weight (512, 256) (expected (1024, 256))"
    path = tmp_path / "bad.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="keys") as err:
        MaskGITVQGAN.from_file(path)
    assert name in str(err.value)


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        MaskGITVQGAN.from_file(tmp_path / "absent.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not readable"):
        MaskGITVQGAN.from_file(tmp_path / "junk.bin")
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="not a state dict"):
        MaskGITVQGAN.from_file(tmp_path / "list.bin")


# ----------------------------------------------------------------------------- the forward


def reference_forward(state: dict, images: torch.Tensor, hidden: int, blocks: int = 2):
    """Encoder, nearest codes and decoder in float64, written from the architecture with
    torch.nn.functional only (no module of stellar.models.vq)."""
    sd = {k: v.double() for k, v in state.items()}
    widths = [hidden * m for m in MULT]

    def conv(x, name, k):
        return F.conv2d(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), padding=k // 2)

    def gn(x, name):
        return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def res(x, name):
        h = conv(F.silu(gn(x, f"{name}.norm1")), f"{name}.conv1", 3)
        h = conv(F.silu(gn(h, f"{name}.norm2")), f"{name}.conv2", 3)
        return h + (
            conv(h, f"{name}.nin_shortcut", 1) if f"{name}.nin_shortcut.weight" in sd else x
        )

    x = conv(images.double(), "encoder.conv_in", 3)
    for i in range(len(widths)):
        for j in range(blocks):
            x = res(x, f"encoder.down.{i}.block.{j}")
        if i != len(widths) - 1:
            x = F.avg_pool2d(x, 2)
    for j in range(blocks):
        x = res(x, f"encoder.mid.{j}")
    z = conv(F.silu(gn(x, "encoder.norm_out")), "encoder.conv_out", 1)
    b, c, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)
    codes = torch.cdist(flat, sd["quantize.embedding.weight"]).argmin(1).view(b, h * w)
    q = sd["quantize.embedding.weight"][codes].view(b, h, w, c).permute(0, 3, 1, 2)
    x = conv(q, "decoder.conv_in", 3)
    for j in range(blocks):
        x = res(x, f"decoder.mid.{j}")
    for i in reversed(range(len(widths))):
        for j in range(blocks):
            x = res(x, f"decoder.up.{i}.block.{j}")
        if i != 0:
            x = conv(
                F.interpolate(x, scale_factor=2.0, mode="nearest"),
                f"decoder.up.{i}.upsample_conv",
                3,
            )
    out = conv(F.silu(gn(x, "decoder.norm_out")), "decoder.conv_out", 3)
    return codes, out.clamp(0, 1)


@pytest.mark.parametrize("size", [(32, 48), (16, 16)])
def test_encode_decode_match_a_float64_reference(size):
    torch.manual_seed(1)
    model = MaskGITVQGAN(hidden_channels=32, z_channels=16, codebook_size=64)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    images = torch.rand(2, 3, *size)
    want_codes, want_images = reference_forward(model.state_dict(), images, hidden=32)
    codes = model.encode(images)
    h, w = size[0] // 16, size[1] // 16
    assert codes.dtype == torch.int64 and codes.shape == (2, h * w)
    assert torch.equal(codes, want_codes)
    decoded = model.decode(codes, (h, w))
    assert decoded.shape == (2, 3, *size)
    assert decoded.min() >= 0 and decoded.max() <= 1
    torch.testing.assert_close(decoded.double(), want_images, rtol=1e-4, atol=1e-5)


def test_input_checks():
    model = MaskGITVQGAN(hidden_channels=32, z_channels=16, codebook_size=8)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode(torch.rand(1, 3, 20, 32))
    with pytest.raises(ValueError, match="images"):
        model.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="square grid"):
        model.decode(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="codes"):
        model.decode(torch.zeros(1, 4))


# ----------------------------------------------------------------------------- training


def test_the_tiny_presets_grid_is_resized_to_16_pixels_per_code(released_file):
    """Patch 8 on 64 pixels is an 8 x 8 grid: the tokenizer sees the image at 128 pixels."""
    from stellar.models import Stellar
    from stellar.train.train import load_config

    cfg = load_config("tiny", ["model.recon_target=vq", f"model.vq_checkpoint={released_file}"])
    model = Stellar.from_config(cfg["model"])
    seen = []
    tokenizer = model.tokenizer
    original = tokenizer.encode
    tokenizer.encode = lambda x: seen.append(tuple(x.shape)) or original(x)
    images = torch.rand(2, 3, 64, 64)
    codes = model.vq_targets(images, (8, 8))
    assert seen == [(2, 3, 128, 128)] and codes.shape == (2, 64)
    want = original(F.interpolate(images, size=(128, 128), mode="bicubic", align_corners=False))
    assert torch.equal(codes, want)
    assert model.decode(torch.randn(2, 64, model.embed_dim), (8, 8)).shape == (2, 64, 1024)


def test_training_with_the_vq_target(tmp_path, released_file, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--output-dir", str(out), "--max-steps", "10"]
    vq = ["model.recon_target=vq", f"model.vq_checkpoint={released_file}"]
    assert main(argv + MINI_OVERRIDES + vq + ["train.base_lr=0.02"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    recon = [r["loss_recon_vq"] for r in rows]
    assert "loss_recon" not in rows[0]
    assert sum(recon[-3:]) / 3 < sum(recon[:3]) / 3 - 0.5, recon
    # The run's weights hold no tokenizer; the model reads it again from the file.
    model = stellar.load(out)
    assert not any(k.startswith("tokenizer") for k in model.state_dict())
    images = torch.rand(2, 3, 32, 32)
    rebuilt = model.reconstruct(images)
    assert rebuilt.shape == images.shape and rebuilt.min() >= 0 and rebuilt.max() <= 1

    from stellar.eval.reconstruction import evaluate_reconstruction
    from stellar.eval.visualize import plot_reconstructions

    assert plot_reconstructions(model, images, tmp_path / "rec.png").stat().st_size > 0

    data = [{"image": torch.rand(3, 32, 32)} for _ in range(3)]
    res = evaluate_reconstruction(model, data, batch_size=2, progress=False)
    assert res["target"] == "vq" and 0 <= res["code_accuracy"] <= 1
    assert res["tokenizer_psnr"] > 0 and res["num_images"] == 3


def test_a_vq_run_without_a_usable_checkpoint_is_one_line(tmp_path, capsys):
    argv = ["--preset", "tiny", "--output-dir", str(tmp_path / "run"), *MINI_OVERRIDES]
    assert main(argv + ["model.recon_target=vq"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.vq_checkpoint" in err[0]
    assert main(argv + ["model.recon_target=vq", f"model.vq_checkpoint={tmp_path / 'no.bin'}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]
