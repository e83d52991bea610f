"""The public code's probe protocols: `segmentation --protocol paper` on a folder in ADE20K's
layout, and `linear --augment`'s batch, gradient clipping and out-of-memory fallback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stellar.eval import cli
from stellar.eval import features as eval_features
from stellar.eval import segmentation as seg
from stellar.models.stellar import Stellar
from stellar.testing import mini_config
from stellar.train.checkpoint import save_weights

COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)  # ADE labels 1-3


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory) -> Path:
    cfg = mini_config()  # 32-pixel images, 8-pixel patches: a 4 x 4 grid
    torch.manual_seed(123)
    model = Stellar.from_config(cfg["model"])
    path = tmp_path_factory.mktemp("run")
    save_weights(path / "model.safetensors", model, cfg, 0)
    return path


def _ade_labels(h: int, w: int, i: int) -> np.ndarray:
    """ADE20K's convention: 0 no label, 1..3 classes; blocks large enough to survive crops."""
    labels = np.ones((h, w), np.uint8)
    labels[h // 4 : 3 * h // 4, w // 5 : w // 2] = 2
    labels[: h // 3, w // 2 + i % 3 :] = 3
    labels[-4:] = 0  # unlabelled rows
    return labels


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory) -> Path:
    """6 training and 3 validation images of 40-62 pixels, jpg images and png label maps."""
    root = tmp_path_factory.mktemp("ADEChallengeData2016")
    rng = np.random.default_rng(0)
    for split, n in (("training", 6), ("validation", 3)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            h, w = 40 + 4 * i, 62 - 3 * i
            labels = _ade_labels(h, w, i)
            image = np.where(labels[..., None] > 0, COLOURS[np.maximum(labels, 1) - 1], 0).astype(
                np.int16
            )
            image += rng.integers(-8, 9, image.shape, dtype=np.int16)  # unlabelled rows: dark
            image = image.clip(0, 255).astype(np.uint8)
            name = f"ADE_{split}_{i:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(labels).save(root / "annotations" / split / f"{name}.png")
    return root


# ---------------------------------------------------------------------------- ADE20K's layout


def test_ade20k_layout_fits_on_training_scores_on_validation_with_label_0_ignored(ade_root):
    train, val = seg.folder_splits(ade_root, 32, seed=0)
    assert (len(train), len(val)) == (6, 3)
    assert train.num_classes == val.num_classes == 3  # the largest label found
    assert train.class_names == ["class 1", "class 2", "class 3"]  # the values in the files
    for split, data in (("training", train), ("validation", val)):
        for i in range(len(data)):
            raw = np.asarray(
                Image.open(ade_root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
            )
            _, labels = data.load(i)
            want = np.where(raw == 0, seg.IGNORE, raw.astype(np.int64) - 1)
            np.testing.assert_array_equal(np.asarray(labels), want)
    item = train[0]
    assert item["image"].shape == (3, 32, 32)
    assert set(item["target"].unique().tolist()) <= {0, 1, 2, seg.IGNORE}


def test_ade20k_layout_with_a_missing_split_is_one_line(mini_run, ade_root, tmp_path, capsys):
    root = tmp_path / "ade"
    (root / "images" / "training").mkdir(parents=True)
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    args = ["segmentation", "--checkpoint", str(mini_run), "--output-dir", str(tmp_path / "o")]
    assert cli.main([*args, "--data", str(root), "--protocol", "paper"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "missing annotations/validation/" in err[0]
    assert not (tmp_path / "o" / "segmentation.json").exists()
    # ADE20K's layout brings its own validation split
    assert cli.main([*args, "--data", str(ade_root), "--val-data", str(ade_root)]) == 2
    assert "has its own validation split" in capsys.readouterr().err


def test_a_bad_protocol_is_one_line_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(
            ["segmentation", "--random-init", "--output-dir", str(tmp_path), "--protocol", "x"]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.startswith("stellar-eval: error:")]
    assert len(lines) == 1 and "argument --protocol" in lines[0]


# ---------------------------------------------------------------------------- paper protocol


def _loss_reference(logits: np.ndarray, target: np.ndarray, ignore: int) -> float:
    """Cross-entropy over the labelled pixels + (1 - mean over all classes of the soft Dice
    (2 I + 1) / (P + T + 1)), in float64 with explicit loops."""
    b, c, h, w = logits.shape
    ce, n = 0.0, 0
    inter, p_sum, t_sum = np.zeros(c), np.zeros(c), np.zeros(c)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                if t == ignore:
                    continue
                z = logits[i, :, y, x]
                p = np.exp(z - z.max())
                p /= p.sum()
                ce -= np.log(p[t])
                n += 1
                p_sum += p
                t_sum[t] += 1
                inter[t] += p[t]
    dice = (2 * inter + 1.0) / (p_sum + t_sum + 1.0)
    return ce / n + (1.0 - dice.mean())


def test_cross_entropy_plus_dice_matches_a_float64_reference(rng_seed):
    g = torch.Generator().manual_seed(rng_seed)
    logits = torch.randn(3, 5, 4, 6, generator=g) * 2
    target = torch.randint(0, 4, (3, 4, 6), generator=g)  # class 4 absent: still in the mean
    target[0, :2] = seg.IGNORE
    target[2, :, 3:] = seg.IGNORE
    want = _loss_reference(logits.double().numpy(), target.numpy(), seg.IGNORE)
    assert seg.segmentation_loss(logits, target).item() == pytest.approx(want, rel=1e-5)
    # Ignored pixels carry no gradient, whatever their logits.
    logits.requires_grad_(True)
    seg.segmentation_loss(logits, target).backward()
    assert logits.grad[0, :, :2].abs().max() == 0 and logits.grad[1].abs().max() > 0
    unlabelled = torch.full_like(target, seg.IGNORE)
    assert seg.segmentation_loss(logits, unlabelled).item() == 0.0  # not NaN


def test_labels_are_downsampled_to_the_patch_grid_nearest():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 7, (2, 32, 24), generator=g)
    target[0, :9] = seg.IGNORE
    # nearest at an integer factor takes each patch's top-left pixel
    torch.testing.assert_close(seg.labels_at_grid(target, (4, 3)), target[:, ::8, ::8])


def test_crops_and_flips_are_drawn_anew_every_epoch_and_fit_the_labels(ade_root):
    train, _ = seg.folder_splits(ade_root, 32, seed=0)
    views = seg.CropViews(train, seed=0)
    w, h = 62, 40  # training image 0
    boxes, flips = [], []
    for epoch in range(12):
        views.epoch = epoch
        box, flip = views.box(0, w, h)
        boxes.append(box)
        flips.append(flip)
        area = (box[2] - box[0]) * (box[3] - box[1]) / (w * h)
        assert 0.25 - 0.05 <= area <= 1.0 and box[0] >= 0 and box[1] >= 0
        assert box[2] <= w and box[3] <= h
        assert 3 / 4 - 0.1 <= (box[2] - box[0]) / (box[3] - box[1]) <= 4 / 3 + 0.1
    assert len(set(boxes)) >= 10 and any(flips) and not all(flips)
    views.epoch = 3
    first = views[0]
    assert torch.equal(first["image"], views[0]["image"])  # seeded by (seed, epoch, item)
    views.epoch = 4
    assert not torch.equal(first["image"], views[0]["image"])
    # The image and its labels get the same crop and flip: wherever the crop's colour is one
    # of the class colours, the label there is that class (the classes sit asymmetrically,
    # so a flip of one and not the other would break this).
    agree, total = np.zeros(3), np.zeros(3)
    for epoch in range(6):
        views.epoch = epoch
        for i in range(len(views)):
            item = views[i]
            pixels = (item["image"] * 255).permute(1, 2, 0).numpy()
            target = item["target"].numpy()
            for c, colour in enumerate(COLOURS):
                near = np.abs(pixels - colour).max(-1) < 30
                agree[c] += (target[near] == c).sum()
                total[c] += near.sum()
    assert total.min() > 500 and (agree / total).min() > 0.97


def test_paper_protocol_scores_at_the_patch_grid(mini_run, ade_root, monkeypatch):
    from stellar.eval.features import load_model

    shapes = []
    real = seg.intersection_union

    def spy(pred, target, num_classes):
        shapes.append((tuple(pred.shape), tuple(target.shape)))
        return real(pred, target, num_classes)

    monkeypatch.setattr(seg, "intersection_union", spy)
    train, val = seg.folder_splits(ade_root, 32, seed=0)
    model = load_model(mini_run)
    res = seg.evaluate_segmentation_paper(model, train, val, 2, epochs=1, progress=False)
    # 3 validation images in passes of 2, both heads: logits and labels at the 4 x 4 grid
    assert sorted(shapes) == sorted([((2, 4, 4), (2, 4, 4))] * 2 + [((1, 4, 4), (1, 4, 4))] * 2)
    assert res["scored_at"] == "patch grid 4x4" and res["encoder_pass"] == 2
    assert res["batch_size"] == 6 and "the training images" in res["batch_note"]


@pytest.mark.parametrize("protocol", ["fast", "paper"])
def test_both_protocols_on_a_folder_in_ade20k_layout(
    protocol, mini_run, ade_root, tmp_path, monkeypatch, capsys
):
    clips = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        clips.append(float(max_norm))
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    out = tmp_path / protocol
    argv = ["segmentation", "--checkpoint", str(mini_run), "--data", str(ade_root)]
    argv += ["--output-dir", str(out), "--protocol", protocol, "--seg-epochs", "2"]
    assert cli.main([*argv, "--no-progress"]) == 0
    res = json.loads((out / "segmentation.json").read_text())
    assert res["protocol"] == protocol and res["epochs"] == 2
    assert 0 <= res["miou"] <= 100 and 0 <= res["miou_lowrank"] <= 100
    assert (res["num_train"], res["num_val"]) == (6, 3)
    assert list(res["iou_per_class"]) == ["class 1", "class 2", "class 3"]
    assert (out / "segmentation.png").stat().st_size > 1000
    if protocol == "paper":
        assert res["lr"] == 1e-4 and res["grad_clip"] == 5.0 and res["batch_size"] == 6
        assert res["autocast"] == "none"  # bf16 on CUDA only
        assert clips == [5.0] * 4  # one step an epoch, two heads
        assert "batch_size    6" in capsys.readouterr().out
    else:
        assert res["lr"] == 1e-3 and clips == []


# ---------------------------------------------------------------------------- linear --augment


def test_augmented_linear_probe_states_its_batch_and_clips(mini_run, tmp_path, monkeypatch, capsys):
    clips = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        clips.append(float(max_norm))
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    out = tmp_path / "aug"
    argv = ["linear", "--augment", "--checkpoint", str(mini_run), "--output-dir", str(out)]
    argv += ["--num-images", "20", "--epochs", "2", "--no-progress", "--batch-size", "8"]
    assert cli.main(argv) == 0
    res = json.loads((out / "linear.json").read_text())
    # 16 training images: fewer than 2048, so one step of all of them an epoch
    assert res["batch_size"] == 16 and res["encoder_pass"] == 8 and clips == [5.0, 5.0]
    assert res["grad_clip"] == 5.0 and res["autocast"] == "none" and "batch 16" in res["protocol"]
    assert "batch_size    16" in capsys.readouterr().out


def test_augmented_linear_probe_halves_on_cuda_out_of_memory(mini_run, monkeypatch):
    from stellar.eval.features import build_data, load_model
    from stellar.eval.linear import evaluate_linear_augmented

    real = eval_features.encode_in_passes
    calls = []

    def flaky(model, images, pass_size, select):
        calls.append((len(images), pass_size))
        # out of memory until a pass is one image, and once more: then the batch halves
        if pass_size > 1 or len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, images, pass_size, select)

    monkeypatch.setattr(eval_features, "encode_in_passes", flaky)
    data = build_data("shapes", 32, num_images=10, seed=0)
    res = evaluate_linear_augmented(load_model(mini_run), data, batch_size=4, epochs=1)
    # passes 4 -> 2 -> 1, then the 8-image batch -> 4, retried from the same image on
    assert calls == [(8, 4), (8, 2), (8, 1), (4, 1), (4, 1)]
    assert res["batch_size"] == 4 and res["encoder_pass"] == 1
    assert res["batch_note"] == "2048 wanted; 4 fit in CUDA memory"


def test_probe_batch_halves_the_pass_then_the_batch():
    fit = eval_features.ProbeBatch(2048, 5000, 4)
    assert (fit.size, fit.pass_size) == (2048, 4) and "batch_note" not in fit.describe()
    assert fit.shrink() and fit.shrink() and (fit.size, fit.pass_size) == (2048, 1)
    assert fit.shrink() and (fit.size, fit.pass_size) == (1024, 1)
    small = eval_features.ProbeBatch(1, 1, 1)
    assert not small.shrink()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        small.retry(lambda: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")))
