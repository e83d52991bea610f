"""stellar-eval: metrics against independent references, data splits, model loading, each task."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stellar.eval import cli
from stellar.eval.equivariance import match_permutation, scaled_shifts
from stellar.eval.features import build_data, load_model, split_indices
from stellar.eval.knn import knn_predict
from stellar.eval.linear import linear_probe
from stellar.eval.localization import best_iou, token_regions
from stellar.eval.reconstruction import gaussian_window, psnr, ssim
from stellar.models.stellar import Stellar
from stellar.testing import MINI_OVERRIDES, mini_config
from stellar.train.checkpoint import save_weights


def _save_mini(path, seed=123, *overrides):
    cfg = mini_config(*overrides)
    torch.manual_seed(seed)
    model = Stellar.from_config(cfg["model"])
    path.mkdir(parents=True, exist_ok=True)
    save_weights(path / "model.safetensors", model, cfg, 0)
    return path


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    return _save_mini(tmp_path_factory.mktemp("run"))


# ---------------------------------------------------------------------------- references


def _ssim_numpy(x, y, win=11, sigma=1.5):
    """Direct SSIM: an explicit loop over every valid window position and channel."""
    c = np.arange(win) - (win - 1) / 2
    g = np.exp(-(c**2) / (2 * sigma**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - win + 1):
            for j in range(x.shape[2] - win + 1):
                a = x[ch, i : i + win, j : j + win]
                b = y[ch, i : i + win, j : j + win]
                ma, mb = (w * a).sum(), (w * b).sum()
                va = (w * (a - ma) ** 2).sum()
                vb = (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                vals.append(
                    ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
                )
    return float(np.mean(vals))


def test_psnr_ssim_match_direct_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 18, generator=g)
    y = (x + 0.1 * torch.randn(2, 3, 16, 18, generator=g)).clamp(0, 1)
    for b in range(2):
        xn, yn = x[b].double().numpy(), y[b].double().numpy()
        mse = ((xn - yn) ** 2).mean()
        assert psnr(x, y)[b].item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
        assert ssim(x, y)[b].item() == pytest.approx(_ssim_numpy(xn, yn), abs=1e-5)
    assert ssim(x, x).min().item() == pytest.approx(1.0, abs=1e-6)
    assert gaussian_window().sum().item() == pytest.approx(1.0)


def test_knn_matches_bruteforce_numpy():
    g = np.random.default_rng(0)
    train = g.normal(size=(60, 8)).astype(np.float32)
    labels = g.integers(0, 4, 60)
    query = g.normal(size=(15, 8)).astype(np.float32)
    k, t = 7, 0.07
    expected = []
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    for q in query:
        sims = tn @ (q / np.linalg.norm(q))
        top = np.argsort(-sims)[:k]
        votes = np.zeros(4)
        for i in top:
            votes[labels[i]] += np.exp(sims[i] / t)
        expected.append(votes.argmax())
    got = knn_predict(
        torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(query), 4, k, t
    )
    assert got.tolist() == expected


def test_localization_iou_on_hand_made_masks():
    # 2x2 patch grid on a 4x4 image, K = 3 tokens; the argmax regions are
    # token 0: left column of patches, token 1: top-right patch, token 2: bottom-right patch.
    spatial = torch.tensor([[[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]])
    regions = token_regions(spatial, (2, 2), (4, 4))
    assert regions[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]]
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    masks[0, 0, :, :2] = True  # exactly token 0's region: IoU 1
    masks[0, 1, 0, 2:] = True  # 2 pixels inside token 1's 4: IoU 2/4
    # masks[0, 2] is empty: skipped
    ious = best_iou(regions, masks, 3)
    assert ious == pytest.approx([1.0, 0.5])


def test_linear_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 4
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    res = linear_probe(x[:240], y[:240], x[240:], y[240:], 3, lrs=(1e-2,), epochs=20)
    assert res["top1"] == 100.0
    # labels unrelated to the features cannot be learned beyond chance by much
    y_rand = torch.randint(0, 3, (300,), generator=g)
    res = linear_probe(x[:240], y_rand[:240], x[240:], y_rand[240:], 3, lrs=(1e-2,), epochs=20)
    assert res["top1"] < 60.0


def test_matching_undoes_a_token_permutation():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 6, 8, generator=g) * 3
    perm = torch.stack([torch.randperm(6, generator=g) for _ in range(2)])
    shuffled = torch.gather(s, 1, perm[..., None].expand(-1, -1, 8))
    for matcher in ("sinkhorn", "hungarian"):
        idx = match_permutation(s, shuffled, matcher)
        back = torch.gather(shuffled, 1, idx[..., None].expand(-1, -1, 8))
        torch.testing.assert_close(back, s)


def test_scaled_shifts():
    assert scaled_shifts(224) == [5, 10, 15, 20, 25, 30]
    small = scaled_shifts(96)
    assert small == sorted(set(small)) and max(small) < 20 and min(small) >= 1


# ---------------------------------------------------------------------------- data and models


def test_split_is_deterministic_and_disjoint():
    a = split_indices(101, seed=3)
    assert a == split_indices(101, seed=3)
    train, val = a
    assert len(val) == 20 and sorted(train + val) == list(range(101))
    assert split_indices(101, seed=4) != a
    d1 = build_data("shapes", 32, num_images=30, seed=1)
    d2 = build_data("shapes", 32, num_images=30, seed=1)
    assert d1.val.indices == d2.val.indices and len(d1.train) == 24
    torch.testing.assert_close(d1.val[0]["image"], d2.val[0]["image"])


def test_random_init_really_reinitializes(mini_run):
    trained = load_model(mini_run)
    fresh = load_model(mini_run, random_init=True, seed=0)
    again = load_model(mini_run, random_init=True, seed=0)
    ts, fs, gs = trained.state_dict(), fresh.state_dict(), again.state_dict()
    assert ts.keys() == fs.keys()
    assert all(ts[k].shape == fs[k].shape for k in ts)
    varying = [k for k in ts if ts[k].is_floating_point() and ts[k].numel() > 1 and ts[k].std() > 0]
    differ = [k for k in varying if not torch.equal(ts[k], fs[k])]
    assert varying and len(differ) > 0.9 * len(varying)
    assert all(torch.equal(fs[k], gs[k]) for k in fs)  # seeded
    assert not fresh.training


# ---------------------------------------------------------------------------- the CLI


BASE = ["--num-images", "20", "--epochs", "3", "--no-progress", "--batch-size", "16"]
KEYS = {
    "linear": {"top1"},
    "knn": {"top1"},
    "reconstruction": {"mse", "psnr", "ssim"},
    "equivariance": {"shifts", "semantic_change", "spatial_change"},
    "robustness": {"scales", "cosine_distance"},
    "localization": {"miou", "a_max_mean", "a_max_above_half"},
    "segmentation": {"miou", "miou_lowrank", "iou_per_class", "iou_per_class_lowrank", "protocol"},
    "visualize": {"files"},
}


@pytest.mark.parametrize("task", list(KEYS))
def test_each_task_writes_its_json(task, mini_run, tmp_path):
    out = tmp_path / task
    assert cli.main([task, "--checkpoint", str(mini_run), "--output-dir", str(out), *BASE]) == 0
    res = json.loads((out / f"{task}.json").read_text())
    assert KEYS[task] <= res.keys()
    assert res["random_init"] is False
    if task == "equivariance":
        assert len(res["shifts"]) == len(res["semantic_change"]) == len(res["spatial_change"])
        assert (out / "equivariance.png").stat().st_size > 1000
    if task == "robustness":
        assert len(res["scales"]) == len(res["cosine_distance"])
        assert (out / "robustness.png").stat().st_size > 1000
    if task == "visualize":
        for name in ("token_maps.png", "reconstructions.png", "retrieval.png"):
            assert (out / name).stat().st_size > 1000
    if task in ("linear", "knn"):
        assert 0 <= res["top1"] <= 100 and res["num_train"] == 16 and res["num_val"] == 4
    if task == "localization":  # a softmax over K = 4 tokens: its maximum is in [1/4, 1]
        assert 0.25 - 1e-6 <= res["a_max_mean"] <= 1 and 0 <= res["a_max_above_half"] <= 100
    if task == "segmentation":
        assert 0 <= res["miou"] <= 100 and 0 <= res["miou_lowrank"] <= 100
        assert list(res["iou_per_class"])[0] == "background"
        assert (out / "segmentation.png").stat().st_size > 1000


def test_random_init_flag_changes_the_result(mini_run, tmp_path):
    args = ["reconstruction", "--checkpoint", str(mini_run), *BASE]
    cli.main([*args, "--output-dir", str(tmp_path / "a")])
    cli.main([*args, "--output-dir", str(tmp_path / "b"), "--random-init"])
    a = json.loads((tmp_path / "a" / "reconstruction.json").read_text())
    b = json.loads((tmp_path / "b" / "reconstruction.json").read_text())
    assert b["random_init"] is True and a["mse"] != b["mse"]


def test_labelled_folder_with_an_unreadable_file(mini_run, tmp_path):
    from PIL import Image

    g = np.random.default_rng(0)
    root = tmp_path / "folder"
    for c, colour in (("red", 0), ("blue", 2)):
        (root / c).mkdir(parents=True)
        for i in range(6):
            arr = (g.random((40, 48, 3)) * 60).astype(np.uint8)
            arr[..., colour] += 180
            Image.fromarray(arr).save(root / c / f"{i}.png")
    (root / "red" / "broken.png").write_bytes(b"not a png")
    for task in ("linear", "knn"):
        out = tmp_path / task
        rc = cli.main(
            [
                task,
                "--checkpoint",
                str(mini_run),
                "--data",
                str(root),
                "--output-dir",
                str(out),
                *BASE,
            ]
        )
        assert rc == 0
        res = json.loads((out / f"{task}.json").read_text())
        assert res["num_train"] + res["num_val"] == 12  # the broken file is left out
        assert res["top1"] >= 0


def test_tokens_sweep(tmp_path):
    runs = [_save_mini(tmp_path / f"k{k}", 1, f"model.num_tokens={k}") for k in (2, 4)]
    out = tmp_path / "tok"
    assert cli.main(["tokens", "--runs", *map(str, runs), "--output-dir", str(out), *BASE]) == 0
    res = json.loads((out / "tokens.json").read_text())
    assert res["num_tokens"] == [2, 4] and len(res["linear_top1"]) == 2 and len(res["psnr"]) == 2
    assert (out / "tokens.png").is_file()


def test_ablation_runner_on_a_minute_preset(tmp_path):
    import yaml

    preset = tmp_path / "mini.yaml"
    preset.write_text(yaml.safe_dump(mini_config()))
    out = tmp_path / "abl"
    rc = cli.main(
        [
            "ablation",
            "--preset",
            str(preset),
            "--max-steps",
            "1",
            "--variants",
            "default,a",
            "--output-dir",
            str(out),
            *BASE,
        ]
    )
    assert rc == 0
    res = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in res["variants"]] == ["default", "a"]
    assert res["variants"][1]["psnr"] is None and "linear_top1" in res["variants"][0]
    assert "| a |" in (out / "ablation.md").read_text()


def test_demo_writes_a_report_with_pictures(tmp_path):
    from stellar import demo

    out = tmp_path / "demo"
    rc = demo.main(
        [
            "--output-dir",
            str(out),
            "--max-steps",
            "1",
            "--num-images",
            "20",
            "--no-progress",
            *[o for o in MINI_OVERRIDES if not o.startswith("train.progress")],
        ]
    )
    assert rc == 0
    text = (out / "report.md").read_text()
    import re

    pics = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(pics) >= 4
    for p in pics:
        assert (out / p).stat().st_size > 1000
    assert "random init" in text and "linear top-1" in text


# ---------------------------------------------------------------------------- segmentation


def test_mean_iou_matches_a_direct_count(rng_seed):
    from stellar.eval.segmentation import IGNORE, mean_iou

    g = torch.Generator().manual_seed(rng_seed)
    target = torch.randint(0, 4, (3, 9, 11), generator=g)
    target[0, :2] = IGNORE
    pred = torch.randint(0, 5, (3, 9, 11), generator=g)
    miou, per_class = mean_iou(pred, target, 5)
    t, p = target.numpy(), pred.numpy()
    keep = t != IGNORE
    want = []
    for c in range(5):
        inter = np.sum((p == c) & (t == c) & keep)
        union = np.sum(((p == c) | (t == c)) & keep)
        want.append(100.0 * inter / union if union else None)
    assert per_class == pytest.approx(want)
    assert miou == pytest.approx(np.mean([w for w in want if w is not None]))


def test_segmentation_head_learns_a_linearly_separable_labelling():
    """Patch features that encode the class: the head reaches a high mIoU on new images."""
    from stellar.eval.segmentation import mean_iou, predict, train_head

    g = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 3, (40, 4, 4), generator=g)
    centres = torch.randn(3, 8, generator=g) * 3
    feats = centres[classes] + 0.3 * torch.randn(40, 4, 4, 8, generator=g)
    targets = classes.repeat_interleave(4, 1).repeat_interleave(4, 2)  # 16 x 16 pixels
    head = train_head(feats[:30], targets[:30], 3, epochs=30, lr=1e-2)
    miou, _ = mean_iou(predict(head, feats[30:], (16, 16)), targets[30:], 3)
    assert miou > 80


def _write_segmentation_folder(root, n=12, size=24):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        labels = np.zeros((size, size), np.uint8)
        labels[: size // 2] = 1 + i % 2  # top half class 1 or 2, bottom background
        labels[-2:] = 255  # ignored rows
        image = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        image[labels == 1] += 150
        Image.fromarray(image).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(labels).save(root / "labels" / f"img{i:02d}.png")
    return root


def test_segmentation_on_a_labelled_folder(mini_run, tmp_path):
    from stellar.eval.segmentation import IGNORE, folder_splits

    root = _write_segmentation_folder(tmp_path / "seg")
    train, val = folder_splits(root, 32, seed=0)
    assert len(train) + len(val) == 12 and train.num_classes == 3
    item = train[0]
    assert item["image"].shape == (3, 32, 32) and item["target"].shape == (32, 32)
    assert set(item["target"].unique().tolist()) <= {0, 1, 2, IGNORE}
    out = tmp_path / "out"
    args = ["segmentation", "--checkpoint", str(mini_run), "--output-dir", str(out)]
    assert cli.main([*args, "--data", str(root), "--seg-epochs", "2", "--no-progress"]) == 0
    res = json.loads((out / "segmentation.json").read_text())
    assert res["num_train"] == len(train) and res["num_val"] == len(val)
    assert 0 <= res["miou"] <= 100


def test_segmentation_folder_without_label_maps_is_one_line(mini_run, tmp_path, capsys):
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    args = ["segmentation", "--checkpoint", str(mini_run), "--output-dir", str(tmp_path / "o")]
    assert cli.main([*args, "--data", str(root)]) == 1
    assert "needs images/ and labels/" in capsys.readouterr().err


def test_augmented_linear_probe_draws_new_views_every_epoch(mini_run, tmp_path):
    from stellar.eval.linear import AugmentedViews

    data = build_data("shapes", 32, num_images=10, seed=0)
    views = AugmentedViews(data.train, 32, train=True)
    first = views[0]["image"]
    views.epoch = 1
    assert first.shape == (3, 32, 32) and not torch.equal(first, views[0]["image"])
    views.epoch = 0
    assert torch.equal(first, views[0]["image"])  # seeded per epoch and image
    centre = AugmentedViews(data.val, 32, train=False)
    assert torch.equal(centre[0]["image"], centre[0]["image"])
    out = tmp_path / "aug"
    args = ["linear", "--augment", "--checkpoint", str(mini_run), "--output-dir", str(out)]
    assert cli.main([*args, *BASE]) == 0
    res = json.loads((out / "linear.json").read_text())
    assert res["protocol"].startswith("augmented") and res["epochs"] == 3
    assert 0 <= res["top1"] <= 100 and res["num_train"] == 16 and res["num_val"] == 4
