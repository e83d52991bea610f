"""The embedded scenes, image folders (corrupt files skipped), multi-crop views, data order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter1d

from stellar.data import (
    CLASSES,
    ImageFolderDataset,
    MultiCropDataset,
    ShapesDataset,
    StepBatchSampler,
    gaussian_blur,
    photometric,
    render_scene,
)

# ------------------------------------------------------------------------- shapes


def test_scenes_are_deterministic_per_seed():
    a, b = render_scene(3, 7, 48), render_scene(3, 7, 48)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(render_scene(3, 8, 48)["image"], a["image"])
    assert not np.array_equal(render_scene(4, 7, 48)["image"], a["image"])


def test_scene_label_masks_and_segmentation():
    labels = []
    for i in range(60):
        s = render_scene(0, i, 48)
        masks, classes = s["masks"], s["classes"]
        assert s["image"].shape == (48, 48, 3) and s["image"].dtype == np.uint8
        assert masks.dtype == bool and masks.shape[1:] == (48, 48) and len(masks) == len(classes)
        assert masks.sum(0).max() <= 1  # visible areas are disjoint
        areas = masks.reshape(len(masks), -1).sum(1)
        assert s["label"] == classes[areas.argmax()]  # the largest visible object
        assert areas.max() > 0.06 * 48 * 48  # the labelled object is large
        expected = np.zeros((48, 48), np.int64)
        for m, c in zip(masks, classes):
            expected[m] = c + 1
        np.testing.assert_array_equal(s["segmentation"], expected)
        labels.append(s["label"])
    assert set(labels) == set(range(len(CLASSES)))  # every class occurs


def test_label_is_visible_in_the_image():
    """The labelled object differs from the background: its pixels are not the scene's average."""
    s = render_scene(1, 0, 64)
    big = s["masks"][s["classes"] == s["label"]].any(0)
    img = s["image"].astype(float)
    assert np.abs(img[big].mean(0) - img[~big].mean(0)).max() > 10


def _interior_steps(scene: dict) -> tuple[float, float]:
    """Mean brightness change between horizontal and between vertical neighbours on the
    dominant object, away from its edge."""
    m = scene["masks"][0]
    inner = m.copy()
    for axis in (0, 1):
        for shift in (-2, 2):
            inner &= np.roll(m, shift, axis=axis)
    v = scene["image"].astype(float).mean(-1)
    along_x = np.abs(np.diff(v, axis=1))[inner[:, 1:] & inner[:, :-1]].mean()
    along_y = np.abs(np.diff(v, axis=0))[inner[1:] & inner[:-1]].mean()
    return along_x, along_y


def test_each_class_has_its_own_upright_surface_pattern():
    seen = {}
    for i in range(200):
        s = render_scene(2, i, 96)
        c = int(s["classes"][0])
        if c not in seen and s["masks"][0].sum() > 0.08 * 96 * 96:
            seen[c] = _interior_steps(s)
    assert set(seen) == set(range(len(CLASSES)))
    steps = {CLASSES[c]: v for c, v in seen.items()}
    x, y = steps["circle"]
    assert x < 3 and y < 6  # plain (a soft vertical shade)
    x, y = steps["square"]
    assert y > 5 * x  # horizontal stripes
    x, y = steps["ring"]
    assert x > 5 * y  # vertical stripes
    for name in ("triangle", "cross"):  # dots, checks: both directions
        x, y = steps[name]
        assert min(x, y) > 5 and 0.5 < x / y < 2


def test_shapes_dataset_items():
    ds = ShapesDataset(num_images=5, size=32, seed=1, max_objects=3)
    item = ds[2]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["masks"].shape == (3, 32, 32) and item["classes"].shape == (3,)
    n = int((item["classes"] >= 0).sum())
    assert not item["masks"][n:].any() and (item["classes"][n:] == -1).all()
    assert item["label"] == render_scene(1, 2, 32, 3)["label"]
    img, label = ds.load(2)
    assert img.size == (32, 32) and label == item["label"]
    with pytest.raises(IndexError):
        ds[5]


# ------------------------------------------------------------------------- folders


def _write_images(folder, names, size=(20, 16)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (10 * i, 100, 200)).save(folder / name)


def test_flat_folder(tmp_path):
    _write_images(tmp_path, ["a.png", "b.jpg", "c.JPEG"])
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 3 and ds.classes == []
    img, label = ds.load(0)
    assert img.mode == "RGB" and img.size == (20, 16) and label == -1
    assert ds[1]["image"].shape == (3, 16, 20)


def test_class_subfolders(tmp_path):
    _write_images(tmp_path / "dog", ["1.png", "2.png"])
    _write_images(tmp_path / "cat" / "nested", ["3.png"])
    (tmp_path / "empty").mkdir()
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert sorted(label for _, label in ds.samples) == [0, 1, 1]


def test_corrupt_image_is_skipped_with_one_warning(tmp_path, capfd):
    _write_images(tmp_path, ["a.png", "c.png"])
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = Image.open(tmp_path / "a.png")
    good.save(tmp_path / "d.jpg")
    (tmp_path / "d.jpg").write_bytes((tmp_path / "d.jpg").read_bytes()[:40])  # truncated
    ds = ImageFolderDataset(tmp_path, warn_dir=tmp_path / "warned")
    names = [p.rsplit("/", 1)[1] for p, _ in ds.samples]
    assert names == ["a.png", "b.png", "c.png", "d.jpg"]
    for _ in range(2):
        for i in range(len(ds)):
            img, _ = ds.load(i)
            assert img.size == (20, 16)
    # A second instance (another worker or rank) sharing warn_dir stays quiet too.
    ImageFolderDataset(tmp_path, warn_dir=tmp_path / "warned").load(1)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert "b.png" in err[0] and "d.jpg" in err[1]
    assert all(line.startswith("warning: skipping unreadable image") for line in err)


def test_folder_with_only_corrupt_images_raises(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(RuntimeError, match="none of the 1 image files"):
        ds.load(0)
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing")


# ------------------------------------------------------------------------- multi-crop


def test_multicrop_views():
    ds = MultiCropDataset(ShapesDataset(10, 48), global_size=32, local_size=16, num_local=3)
    item = ds[(4, 123)]
    assert item["global"].shape == (2, 3, 32, 32) and item["global"].dtype == torch.uint8
    assert item["local"].shape == (3, 3, 16, 16)
    again = ds[(4, 123)]
    assert torch.equal(item["global"], again["global"]) and torch.equal(
        item["local"], again["local"]
    )
    other = ds[(4, 124)]
    assert not torch.equal(item["global"], other["global"])
    assert not torch.equal(item["global"][0], item["global"][1])


def test_step_batch_sampler_shards_and_resumes():
    world, b = 3, 4
    samplers = [StepBatchSampler(50, b, seed=5, rank=r, world_size=world) for r in range(world)]
    assert samplers[0].steps_per_epoch == 4
    for step in (0, 3, 4, 9):
        batches = [s.batch(step) for s in samplers]
        idx = [i for batch in batches for i, _ in batch]
        assert len(idx) == world * b and len(set(idx)) == world * b  # disjoint shards
    # One epoch visits distinct items.
    epoch = [i for step in range(4) for s in samplers for i, _ in s.batch(step)]
    assert len(set(epoch)) == len(epoch) == 48
    # Starting at step 6 yields exactly what steps 6, 7 of a fresh sampler yield.
    fresh = iter(StepBatchSampler(50, b, seed=5, rank=1, world_size=world))
    for _ in range(6):
        next(fresh)
    resumed = iter(StepBatchSampler(50, b, seed=5, rank=1, world_size=world, start_step=6))
    assert next(resumed) == next(fresh) and next(resumed) == next(fresh)


def test_sampler_repeats_a_small_data_set():
    s = StepBatchSampler(3, 4)
    assert len(s.batch(0)) == 4 and set(i for i, _ in s.batch(0)) <= {0, 1, 2}


# ------------------------------------------------------------------------- photometric


def test_gaussian_blur_matches_scipy():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 20, 24, dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    out = gaussian_blur(x, sigma)
    radius = 3  # ceil(3 * max sigma)
    for i, s in enumerate(sigma.tolist()):
        if s == 0:
            torch.testing.assert_close(out[i], x[i])
            continue
        ref = x[i].numpy()
        for axis in (1, 2):
            ref = gaussian_filter1d(ref, s, axis=axis, mode="mirror", truncate=radius / s)
        np.testing.assert_allclose(out[i].numpy(), ref, atol=1e-10)


def test_photometric_range_determinism_and_identity():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    a = photometric(x, torch.Generator().manual_seed(1))
    b = photometric(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)
    same = photometric(
        x, torch.Generator().manual_seed(1), jitter_prob=0, grayscale_prob=0, blur_prob=0
    )
    torch.testing.assert_close(same, x)
    gray = photometric(x, torch.Generator(), jitter_prob=0, grayscale_prob=1, blur_prob=0)
    torch.testing.assert_close(gray[:, 0], gray[:, 1])
    ref = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(gray[:, 2], ref)


def test_a_batch_draw_changes_every_image_alike():
    """draw="batch": one jitter, greyscale and blur draw for all the images (the released
    code's transforms on a stacked tensor); draw="image": each image its own."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16).expand(8, -1, -1, -1).contiguous()
    for seed in range(4):
        out = photometric(x, torch.Generator().manual_seed(seed), hue=0.5, draw="batch")
        assert all(torch.equal(out[0], out[i]) for i in range(8)), seed
    out = photometric(x, torch.Generator().manual_seed(0), hue=0.5, draw="image")
    assert not all(torch.equal(out[0], out[i]) for i in range(8))
    # Distinct images: greyscale for all of them or for none.
    x = torch.rand(8, 3, 16, 16)
    grey = []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        out = photometric(x, g, jitter_prob=0, grayscale_prob=0.5, blur_prob=0, draw="batch")
        flat = [bool(torch.equal(out[i, 0], out[i, 1])) for i in range(8)]
        assert len(set(flat)) == 1, (seed, flat)
        grey.append(flat[0])
    assert any(grey) and not all(grey)


def test_blur_sigma_in_pixels_at_every_size_unless_scaled():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    only_blur = dict(jitter_prob=0, grayscale_prob=0, blur_prob=1, blur_sigma=(1.5, 1.5))
    g = torch.Generator
    unscaled = photometric(x, g().manual_seed(0), blur_sigma_scaled=False, **only_blur)
    torch.testing.assert_close(unscaled, gaussian_blur(x, torch.full((2,), 1.5)))
    scaled = photometric(x, g().manual_seed(0), **only_blur)
    torch.testing.assert_close(scaled, gaussian_blur(x, torch.full((2,), 1.5 * 32 / 224)))


def test_hue_rotation_keeps_luma_and_turns_full_circle():
    from stellar.data.augment import _rotate_hue

    torch.manual_seed(0)
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64)
    luma = lambda t: 0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]  # noqa: E731
    half = _rotate_hue(x, torch.full((4,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(luma(half), luma(x))
    assert not torch.allclose(half, x)
    torch.testing.assert_close(_rotate_hue(half, torch.full((4,), 0.5, dtype=torch.float64)), x)
    torch.testing.assert_close(_rotate_hue(x, torch.zeros(4, dtype=torch.float64)), x)


@pytest.mark.parametrize(
    "masked_views,views,crops", [("crops", 3, 3), ("crops", 1, 2), ("copies", 3, 2)]
)
def test_loader_draws_a_global_crop_per_masked_view(masked_views, views, crops):
    from stellar.data import build_loader
    from stellar.testing import mini_config

    cfg = mini_config(f"data.masked_views={masked_views}", f"data.num_masked_views={views}")
    batch = next(iter(build_loader(cfg["data"], 2, seed=0)))
    assert batch["global"].shape[:2] == (2, crops)
    if crops > 2:  # independent draws, not copies
        assert not torch.equal(batch["global"][:, 0], batch["global"][:, 2])
