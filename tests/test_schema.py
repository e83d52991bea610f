"""What the schema accepts builds a model and trains; what it refuses is one line naming the
keys; a key left out takes the public recipe's value, and a run saved before a key existed
resumes only as it trained."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import timm
import torch
import yaml

from stellar.models.encoder import SparseViTEncoder
from stellar.testing import MINI_OVERRIDES
from stellar.train import config, schema
from stellar.train.config import (
    PRESETS,
    apply_overrides,
    differences,
    get_key,
    load_preset,
    validate,
)
from stellar.train.schema import ConfigError
from stellar.train.train import load_config, main, run_training

QUICK = [*MINI_OVERRIDES, "train.progress=false"]


def one_stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stellar-train: error: "), err
    return err[0]


# ----------------------------------------------------------------------------- between keys


def test_the_issues_case_from_the_command_line(tmp_path):
    """The command as a user types it: exit code 2, one line naming the key, no traceback
    (timm's AssertionError before), no run directory."""
    out = tmp_path / "R"
    run = subprocess.run(
        [sys.executable, "-m", "stellar.train", "--preset", "tiny", "--output-dir", str(out)]
        + ["model.decoder.num_heads=7"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and "model.decoder.num_heads (7)" in lines[0], run.stderr
    assert not out.exists()


# Each rule of the schema, broken on the small configuration: (overrides, the keys named).
BROKEN = [
    (["model.decoder.num_heads=3"], ["model.decoder.num_heads (3)", "model.decoder.dim (32)"]),
    (
        ["model.decoder={dim: 33, depth: 1, num_heads: 1, mlp_dim: 64, fourier_scale: 1.0}"],
        ["model.decoder.dim (33)"],
    ),
    (["model.img_size=36"], ["model.img_size (36)", "model.patch_size (8)"]),
    (["model.img_size=4"], ["model.img_size (4)", "model.patch_size (8)"]),
    (["data.local_size=12"], ["data.local_size (12)", "model.patch_size (8)"]),
    (["data.global_size=36"], ["data.global_size (36)", "model.patch_size (8)"]),
    (["data.num_masked_views=0"], ["data.num_masked_views (0)", "loss.align (1.0)"]),
    (["model.num_tokens=1"], ["model.num_tokens (1)", "loss.koleo (0.1)"]),
    (["kernels=triton", "model.num_tokens=65"], ["model.num_tokens (65)", "kernels ('triton')"]),
    (
        ["loss.recon=0", "loss.cluster=0", "loss.align=0", "loss.cls=0", "loss.koleo=0"],
        ["every loss term is switched off", "loss.recon (0", "loss.koleo (0"],
    ),
    (["train.warmup_steps=21"], ["train.warmup_steps (21)", "train.total_steps (20)"]),
    # timm's ViT from model.arch and model.vit_kwargs
    (["model.vit_kwargs={depth: 1, embed_dim: 100}"], ["model.arch", "model.vit_kwargs"]),
    (["model.vit_kwargs={depth: 1, num_heads: 5}"], ["model.arch", "model.vit_kwargs"]),
    (["model.vit_kwargs={depth: 1, foo: 1}"], ["model.vit_kwargs", "'foo'"]),
    (["model.vit_kwargs={depth: 1, class_token: false}"], ["model.arch", "model.vit_kwargs"]),
    (["model.vit_kwargs={depth: 1, in_chans: 1}"], ["model.vit_kwargs", "input channels"]),
    (["model.arch=vit_base_patch16_gap_224"], ["model.arch", "no class token"]),
    (["model.arch=eva02_tiny_patch14_224"], ["model.arch", "not a timm VisionTransformer"]),
    (["model.vit_kwargs={depth:1}"], ["model.vit_kwargs: 'depth:1' is not an argument name"]),
    (
        ["model.vit_kwargs={depth: 1, img_size: 40}"],
        ["model.vit_kwargs: 'img_size'", "model.img_size"],
    ),
    (["model.vit_kwargs={depth: 1, drop_path_rate: 0.1}"], ["'drop_path_rate'", "model.drop_path"]),
]


@pytest.mark.parametrize("overrides,named", BROKEN, ids=[" ".join(o) for o, _ in BROKEN])
def test_keys_that_do_not_fit_together_are_one_line_naming_them(tmp_path, capsys, overrides, named):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), "--max-steps", "1", *QUICK, *overrides]) == 2
    line = one_stderr_line(capsys)
    for words in named:
        assert words in line, line
    assert not out.exists()


# Values next to the rules' limits, which the schema accepts: each builds and trains.
ACCEPTED = [
    ["model.decoder={dim: 30, depth: 1, num_heads: 3, mlp_dim: 64, fourier_scale: 1.0}"],
    ["data.num_masked_views=0", "loss.align=0"],
    ["model.num_tokens=1", "loss.koleo=0"],
    ["model.vit_kwargs={depth: 1, embed_dim: 96, num_heads: 2}", "model.img_size=8"],
    # a constant rate has no warm-up: train.warmup_steps is not used
    ["train.lr_schedule=constant", "train.warmup_steps=21"],
]


def test_the_vq_file_is_needed_to_train_not_to_check_or_print(tmp_path, capsys):
    """A preset may name the vq target without the tokenizer's local file (base_release):
    the configuration checks and prints; training stops in one line naming the key."""
    cfg = load_config("tiny", [*QUICK, "model.recon_target=vq"])
    assert cfg["model"]["vq_checkpoint"] is None
    assert main(["--print-config", *QUICK, "model.recon_target=vq"]) == 0
    assert "recon_target: vq" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), *QUICK, "model.recon_target=vq"]) == 2
    line = one_stderr_line(capsys)
    assert "model.vq_checkpoint=FILE" in line and "model.recon_target is 'vq'" in line
    assert not out.exists()


def test_init_required_stops_a_new_run_without_init_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--print-config", *QUICK, "init_required=true"]) == 0
    capsys.readouterr()
    assert main(["--output-dir", str(out), "--max-steps", "1", *QUICK, "init_required=true"]) == 2
    line = one_stderr_line(capsys)
    assert "--init FILE" in line and "init_required is true" in line
    assert not out.exists()


@pytest.mark.parametrize("overrides", ACCEPTED, ids=[" ".join(o) for o in ACCEPTED])
def test_values_at_the_rules_limits_train(tmp_path, overrides):
    cfg = load_config("tiny", QUICK + overrides)
    summary = run_training(cfg, tmp_path / "run", max_steps=1, quiet=True)
    assert summary["step"] == 1 and torch.isfinite(torch.tensor(summary["losses"][1]))


def test_every_timm_vit_the_schema_accepts_runs_in_the_encoder():
    """model.arch's range names 248 timm models; the schema keeps those the encoder runs
    (built and run on the meta device, one block each)."""
    base = apply_overrides(load_preset("tiny"), QUICK)
    names = [n for n in timm.list_models() if schema.ARCH[0](n)]
    accepted = 0
    for name in names:
        cfg = copy.deepcopy(base)
        cfg["model"]["arch"] = name
        try:
            validate(cfg)
        except ConfigError as err:
            assert f"model.arch ('{name}')" in str(err)
            continue
        accepted += 1
        m, d = cfg["model"], cfg["data"]
        with torch.device("meta"):
            encoder = SparseViTEncoder(
                name, m["img_size"], m["patch_size"], m["num_tokens"], vit_kwargs=m["vit_kwargs"]
            )
            views = torch.zeros(2, 3, d["global_size"], d["global_size"])
            out = encoder(views)
            n = out.dense.shape[1]
            masked = encoder(views, torch.zeros(2, n // 4, dtype=torch.long))
            encoder(torch.zeros(2, 3, d["local_size"], d["local_size"]))
        assert out.sparse.shape == (2, m["num_tokens"], encoder.embed_dim), name
        assert masked.dense.shape[1] == n // 4, name
    assert 50 < accepted < len(names)


def test_a_value_that_is_not_yaml_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), *QUICK, "model.vit_kwargs={depth:"]) == 2
    assert "model.vit_kwargs: '{depth:' is not a YAML value" in one_stderr_line(capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------- defaults


# The keys where base_release (the released configuration) leaves the schema's defaults,
# which every other preset keeps (the public recipe, and the paper's reading of issue 27).
RELEASE_LEAVES_THE_DEFAULT = {
    "init_required": True,
    "model.recon_target": "vq",
    "data.blur_sigma_scaled": False,
    "data.photometric_draw": "batch",
    "train.lr_scaling": "none",
    "train.lr_schedule": "constant",
    "train.weight_decay_groups": "all",
}


def test_every_default_is_the_value_of_every_preset():
    """A key left out trains what every preset sets: the public code's recipe, with the
    paper's reading where the released configuration differs (base_release's keys)."""
    keys = schema.defaults()
    assert {
        "data.masked_views",
        "data.masking",
        "model.head.normalize_prototypes",
        "loss.views",
        *RELEASE_LEAVES_THE_DEFAULT,
    } <= set(keys)
    for name in PRESETS:
        preset = load_preset(name)
        for key, default in keys.items():
            if name == "base_release" and key in RELEASE_LEAVES_THE_DEFAULT:
                assert get_key(preset, key) == RELEASE_LEAVES_THE_DEFAULT[key] != default, key
            else:
                assert get_key(preset, key) == default, (name, key)


@pytest.mark.parametrize("name", PRESETS)
def test_a_file_that_leaves_the_defaulted_keys_out_trains_the_preset(tmp_path, name):
    full = load_preset(name)
    short = copy.deepcopy(full)
    for key in schema.defaults():
        if get_key(full, key) != schema.defaults()[key]:
            continue  # base_release's released values are not the defaults: a file says them
        *parents, last = key.split(".")
        node = short
        for part in parents:
            node = node[part]
        del node[last]
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(short))
    assert load_config(str(path)) == load_config(name)


def test_a_random_init_model_from_a_short_file_is_the_public_recipes(tmp_path):
    from stellar.eval.features import load_model

    short = load_preset("tiny")
    del short["model"]["head"]["normalize_prototypes"]
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(short))
    model = load_model(None, random_init=True, preset=str(path))
    assert model.sparse_head.normalize_prototypes is False


def test_every_defaulted_key_says_what_runs_from_before_it_did():
    assert set(schema.defaults()) <= set(config.BEFORE_THE_KEY)
    earlier = {
        "data.masked_views": "copies",
        "data.masking": "focal",
        "model.head.normalize_prototypes": True,
        "loss.views": "pooled",
    }
    for key, value in earlier.items():
        assert config.BEFORE_THE_KEY[key] == value != schema.defaults()[key]
    # Before the released configuration's keys, runs trained the paper's reading: the default.
    for key in RELEASE_LEAVES_THE_DEFAULT:
        assert config.BEFORE_THE_KEY[key] == schema.defaults()[key], key


def test_a_run_from_before_the_release_keys_resumes_only_as_it_trained():
    """A checkpoint's configuration without the keys of issue 27 trained the paper's reading:
    resuming it with the defaults is the same run, with the released values another one."""
    old = load_preset("tiny")
    for key in RELEASE_LEAVES_THE_DEFAULT:
        *parents, last = key.split(".")
        node = old
        for part in parents:
            node = node[part]
        del node[last]

    def checked(*overrides: str) -> dict:
        cfg = apply_overrides(load_preset("tiny"), list(overrides))
        validate(cfg)
        return cfg

    assert differences(old, checked()) == []
    released = [
        "data.blur_sigma_scaled=false",
        "data.photometric_draw=batch",
        "train.lr_scaling=none",
        "train.lr_schedule=constant",
        "train.weight_decay_groups=all",
    ]
    assert differences(old, checked(*released)) == [
        "data.blur_sigma_scaled: True -> False",
        "data.photometric_draw: 'image' -> 'batch'",
        "train.lr_scaling: 'batch' -> 'none'",
        "train.lr_schedule: 'cosine' -> 'constant'",
        "train.weight_decay_groups: 'exempt' -> 'all'",
    ]


def test_a_run_from_before_the_recipe_keys_resumes_only_as_it_trained(tmp_path, capsys):
    out = tmp_path / "run"
    earlier = [
        "data.masked_views=copies",
        "data.masking=focal",
        "model.head.normalize_prototypes=true",
        "loss.views=pooled",
    ]
    cfg = load_config("tiny", QUICK + earlier)
    run_training(cfg, out, max_steps=1, quiet=True)
    # The checkpoint of a run saved before the four keys existed lacks them.
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("data.masked_views", "data.masking", "model.head.normalize_prototypes"):
        *parents, last = key.split(".")
        node = ckpt["config"]
        for part in parents:
            node = node[part]
        del node[last]
    del ckpt["config"]["loss"]["views"]
    torch.save(ckpt, out / "checkpoint.pt")
    assert differences(ckpt["config"], cfg) == []
    # Resuming with the defaults (the public recipe) would change the run: refused.
    assert main(["--output-dir", str(out), "--max-steps", "2", *QUICK]) == 2
    line = one_stderr_line(capsys)
    for change in (
        "data.masked_views: 'copies' -> 'crops'",
        "data.masking: 'focal' -> 'mixed'",
        "loss.views: 'pooled' -> 'per_group'",
        "model.head.normalize_prototypes: True -> False",
    ):
        assert change in line
    assert main(["--output-dir", str(out), "--max-steps", "2", *QUICK, *earlier]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_timm_that_cannot_build_on_the_meta_device_still_checks(monkeypatch):
    """timm before its drop-path rates moved to the CPU read them from a tensor on the
    default device; the check then builds on the CPU instead of refusing the preset."""
    import timm.models.vision_transformer as vit_module

    def old_rates(drop_path_rate, depth, stagewise=False):
        return [x.item() for x in torch.linspace(0, drop_path_rate, depth)]

    monkeypatch.setattr(vit_module, "calculate_drop_path_rates", old_rates)
    monkeypatch.setattr(schema, "_VIT_CHECKS", {})  # no answer from an earlier check
    validate(load_preset("tiny"))
    bad = apply_overrides(load_preset("tiny"), ["model.vit_kwargs={depth: 2, foo: 1}"])
    with pytest.raises(ConfigError, match="unexpected keyword argument 'foo'"):
        validate(bad)
