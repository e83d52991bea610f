"""stellar-train: configuration, outputs, exact resumption, stopping, --init, DDP on gloo."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import yaml

import stellar
from stellar.testing import MINI_OVERRIDES
from stellar.train.config import PRESETS, apply_overrides, differences, load_preset, validate
from stellar.train.schema import ConfigError
from stellar.train.ssl_meta_arch import StellarSSL
from stellar.train.train import (
    load_config,
    lr_factor,
    main,
    param_groups,
    peak_lr,
    recipe_notices,
    run_training,
)

MINI = MINI_OVERRIDES + ["train.ckpt_every=2"]


def _train(out, *extra: str, max_steps: int | None = None) -> int:
    argv = ["--preset", "tiny", "--output-dir", str(out)]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    return main(argv + MINI + list(extra))


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------- configuration


def test_presets_hold_every_key_and_the_papers_recipe():
    tiny = load_preset("tiny")
    keys = None
    for name in PRESETS:
        cfg = load_preset(name)
        validate(cfg)
        flat = set(_flat_keys(cfg))
        keys = flat if keys is None else keys
        assert flat == keys, name  # every preset sets every key
    base = load_preset("base")
    assert base["model"]["arch"] == "vit_base_patch16_224" and base["model"]["num_tokens"] == 16
    assert base["train"]["base_lr"] == 1.5e-4 and base["train"]["weight_decay"] == 0.04
    assert base["train"]["clip_grad"] == 3.0 and base["train"]["amp"] == "bf16"
    assert base["loss"]["recon"] == 10 and base["loss"]["koleo"] == 0.1
    assert base["model"]["head"]["num_prototypes"] == 16384
    assert base["data"]["mask_ratio"] == 0.8 and base["data"]["num_masked_views"] == 8
    assert base["teacher"]["momentum"] == 0.996
    assert load_preset("huge")["model"]["patch_size"] == 14
    assert tiny["data"]["source"] == "shapes"


def _flat_keys(cfg, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, dict) and k not in ("vit_kwargs",):
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_overrides():
    cfg = apply_overrides(
        load_preset("tiny"),
        [
            "model.num_tokens=6",
            "data.global_scale=[0.5, 1.0]",
            "model.vit_kwargs.depth=2",
            "loss.koleo=false",
            "loss.recon=true",
        ],
    )
    assert cfg["model"]["num_tokens"] == 6 and cfg["data"]["global_scale"] == [0.5, 1.0]
    assert cfg["model"]["vit_kwargs"] == {"depth": 2}
    validate(cfg)
    assert cfg["loss"]["koleo"] == 0.0 and cfg["loss"]["recon"] == 10.0
    with pytest.raises(ConfigError, match="model.num_tokens"):
        apply_overrides(cfg, ["model.num_token=3"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["model.num_tokens"])
    assert differences(cfg, apply_overrides(cfg, ["train.log_every=7"])) == []
    assert differences(cfg, apply_overrides(cfg, ["train.base_lr=1"])) == [
        "train.base_lr: 0.002 -> 1"
    ]


def test_overrides_read_exponent_floats_and_reject_text_numbers():
    # YAML 1.1 reads "1e-2" as text; an override means the number.
    cfg = apply_overrides(
        load_preset("tiny"), ["train.base_lr=1e-2", "data.blur_sigma=[1e-1, 2E0]"]
    )
    assert cfg["train"]["base_lr"] == 0.01 and cfg["data"]["blur_sigma"] == [0.1, 2.0]
    validate(cfg)
    bad = apply_overrides(load_preset("tiny"), ["train.weight_decay=small"])
    with pytest.raises(ConfigError, match="train.weight_decay"):
        validate(bad)


def test_lr_schedule_warmup_then_cosine():
    cfg = load_preset("tiny")
    cfg["train"].update(total_steps=100, warmup_steps=10, min_lr=0.0)
    f = lr_factor(cfg, 1.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_a_constant_rate_is_the_base_rate_at_every_step_without_warm_up():
    cfg = load_preset("tiny")
    cfg["train"].update(total_steps=100, warmup_steps=10, lr_schedule="constant")
    for scaling, world, want in (("none", 1, 2e-3), ("none", 16, 2e-3), ("batch", 2, 5e-4)):
        cfg["train"]["lr_scaling"] = scaling
        peak = peak_lr(cfg, world)
        assert peak == pytest.approx(want)  # batch: 2e-3 x (32 x 2) / 256
        f = lr_factor(cfg, peak)
        assert [f(i) * peak for i in (0, 1, 9, 10, 55, 99, 100)] == [pytest.approx(want)] * 7


def test_the_rate_scales_with_the_global_batch_only_with_lr_scaling_batch():
    cfg = load_preset("base")
    assert peak_lr(cfg, 16) == pytest.approx(1.5e-4 * 2048 / 256)
    cfg["train"]["lr_scaling"] = "none"
    assert peak_lr(cfg, 16) == pytest.approx(1.5e-4) == peak_lr(cfg, 1)


def test_weight_decay_groups_all_decays_every_parameter():
    from stellar.models import Stellar
    from stellar.testing import mini_model_kwargs

    model = Stellar.from_config(mini_model_kwargs())
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    (one,) = param_groups(model, 0.04, "all")
    assert one["weight_decay"] == 0.04 and {id(p) for p in one["params"]} == trained
    decay, exempt = param_groups(model, 0.04, "exempt")
    assert (decay["weight_decay"], exempt["weight_decay"]) == (0.04, 0.0)
    assert {id(p) for p in decay["params"] + exempt["params"]} == trained
    exempted = {id(p) for p in exempt["params"]}
    for name, p in model.named_parameters():
        if p.ndim <= 1 or any(k in name for k in ("pos_embed", "cls_token", "latent_queries")):
            assert id(p) in exempted, name
    assert id(model.sparse_head.prototypes.weight) in exempted


def test_a_run_with_the_released_keys(tmp_path, monkeypatch):
    """Constant, unscaled rate; one AdamW group decaying every parameter; the photometric
    changes drawn per batch with unscaled blur."""
    import stellar.train.ssl_meta_arch as arch
    from stellar.data import photometric

    calls = []

    def recording(x, generator, **kw):
        calls.append(kw)
        return photometric(x, generator, **kw)

    monkeypatch.setattr(arch, "photometric", recording)
    out = tmp_path / "run"
    released = [
        "train.lr_schedule=constant",
        "train.lr_scaling=none",
        "train.weight_decay_groups=all",
        "data.photometric_draw=batch",
        "data.blur_sigma_scaled=false",
    ]
    assert _train(out, *released, max_steps=3) == 0
    assert [r["lr"] for r in _metrics(out)] == [2e-3] * 3  # the tiny preset's base_lr
    groups = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.04
    assert calls and all(kw["draw"] == "batch" for kw in calls)
    assert all(kw["blur_sigma_scaled"] is False for kw in calls)


def test_the_start_notes_of_a_run_that_leaves_the_papers_recipe():
    init = ["init=/models/mae_pretrain_vit_base.pth"]
    vq = ["model.recon_target=vq", "model.vq_checkpoint=/models/vq.bin"]
    for name in ("base", "large", "huge"):
        notes = recipe_notices(load_config(name))
        assert len(notes) == 2, (name, notes)
        assert "random initialization with an EMA teacher" in notes[0]
        assert "--init FILE" in notes[0]
        assert "model.recon_target=vq model.vq_checkpoint=FILE" in notes[1]
    assert recipe_notices(load_config("base", init + vq)) == []
    assert recipe_notices(load_config("base", init)) == notes[1:]
    assert recipe_notices(load_config("base", vq)) == notes[:1]
    # The random-prior recipe sets its teacher stage: no --init is its choice.
    assert recipe_notices(load_config("base_random_prior")) == notes[1:]
    # No checkpoint to expect for the tiny encoder; base_release requires both files.
    assert recipe_notices(load_config("tiny")) == []
    assert recipe_notices(load_config("base_release", init + vq)) == []


def test_the_start_notes_come_before_the_first_step_and_not_for_tiny(tmp_path, capsys):
    base_like = ["model.arch=vit_base_patch16_224", "model.vit_kwargs={depth: 1}"]
    cfg = load_config("tiny", MINI + base_like)
    run_training(cfg, tmp_path / "base", max_steps=1)
    err = capsys.readouterr().err
    assert err.index("random initialization with an EMA teacher") < err.index("done: step 1")
    assert err.index("model.recon_target=vq model.vq_checkpoint=FILE") < err.index("done")
    run_training(load_config("tiny", MINI), tmp_path / "tiny", max_steps=1)
    err = capsys.readouterr().err
    assert "done: step 1" in err and "note:" not in err


# ------------------------------------------------------------------------- a run


def test_run_writes_config_metrics_checkpoints_and_loads(tmp_path):
    out = tmp_path / "run"
    assert _train(out, max_steps=3) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["num_tokens"] == 4 and cfg["teacher"]["mode"] == "ema"
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in (
            "loss",
            "loss_recon",
            "loss_cluster",
            "loss_align",
            "loss_cls",
            "loss_koleo",
            "lr",
            "images_per_s",
        ):
            assert key in r and r[key] == r[key], key
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert set(ckpt) >= {"model", "teacher", "optimizer", "scheduler", "rng", "config", "step"}
    assert isinstance(ckpt["rng"][0]["torch"], torch.Tensor)
    model = stellar.load(out)
    with torch.no_grad():
        enc = model.encode(torch.rand(1, 3, 32, 32))
    assert enc["sparse"].shape == (1, 4, 192)
    torch.testing.assert_close(
        model.encoder.latent_queries, ckpt["model"]["encoder.latent_queries"]
    )
    assert not list(out.glob(".*.tmp-*"))  # no temporary files left behind


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, max_steps=5) == 0
    assert _train(split, max_steps=3) == 0
    assert _train(split, max_steps=5) == 0  # the same command with a larger --max-steps
    a, b = _metrics(straight), _metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        for key in ra:
            if key not in ("images_per_s", "time_s"):
                assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    sa = torch.load(straight / "checkpoint.pt", weights_only=True)
    sb = torch.load(split / "checkpoint.pt", weights_only=True)
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    # Nothing to do at or beyond the last step.
    assert _train(split, max_steps=4) == 0
    assert len(_metrics(split)) == 5


def test_resume_with_another_configuration_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, max_steps=1) == 0
    assert _train(out, "train.base_lr=0.1", max_steps=2) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "train.base_lr: 0.002 -> 0.1" in err


def test_nonfinite_loss_stops_after_saving(tmp_path, monkeypatch, capsys):
    forward = StellarSSL.forward
    calls = {"n": 0}

    def poisoned(self, batch, generator, step=None):
        out = forward(self, batch, generator, step)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(StellarSSL, "forward", poisoned)
    out = tmp_path / "run"
    assert _train(out, "train.ckpt_every=100", max_steps=6) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 3" in err and "step 2" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_error_in_a_step_saves_the_progress_first(tmp_path, monkeypatch):
    forward = StellarSSL.forward
    calls = {"n": 0}

    def failing(self, batch, generator, step=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("out of memory")
        return forward(self, batch, generator, step)

    monkeypatch.setattr(StellarSSL, "forward", failing)
    out = tmp_path / "run"
    with pytest.raises(MemoryError):
        _train(out, "train.ckpt_every=100", max_steps=6)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_crash_while_saving_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train(out, max_steps=2) == 0
    good = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # a half-written file ...
            fh.truncate(100)
        raise OSError("disk full")  # ... and a crash

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        _train(out, max_steps=4)
    assert (out / "checkpoint.pt").read_bytes() == good
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not list(out.glob(".*.tmp-*"))


def test_triton_on_cpu_without_interpreter_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _train(tmp_path / "run", "--kernels", "triton", max_steps=1) == 2
    assert "--kernels triton needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_override_is_an_error(tmp_path, capsys):
    assert _train(tmp_path / "run", "model.num_tokenz=3", max_steps=1) == 2
    assert "did you mean model.num_tokens" in capsys.readouterr().err


def test_init_from_mae_checkpoint_and_mismatch(tmp_path, capsys):
    import timm

    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=1
    )
    state = {k: torch.randn_like(v) for k, v in vit.state_dict().items()}
    state["decoder_embed.weight"] = torch.zeros(4, 4)
    torch.save({"model": state}, tmp_path / "mae.pth")
    out = tmp_path / "run"
    assert _train(out, "--init", str(tmp_path / "mae.pth"), max_steps=1) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["teacher"]["mode"] == "none"  # an MAE prior trains without the EMA teacher
    assert "initialized the encoder's ViT" in capsys.readouterr().err
    state["blocks.1.norm1.weight"] = torch.zeros(192)
    torch.save({"model": state}, tmp_path / "bad.pth")
    assert _train(tmp_path / "bad", "--init", str(tmp_path / "bad.pth"), max_steps=1) == 1
    assert "unexpected keys (1): blocks.1.norm1.weight" in capsys.readouterr().err


def test_image_folder_run_with_a_corrupt_file(tmp_path, capfd):
    from PIL import Image

    data = tmp_path / "images"
    (data / "a").mkdir(parents=True)
    (data / "b").mkdir()
    for i in range(6):
        Image.new("RGB", (40 + i, 36), (40 * i, 90, 160)).save(data / "ab"[i % 2] / f"{i}.png")
    (data / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "run"
    assert _train(out, "--data", str(data), max_steps=2) == 0
    err = capfd.readouterr().err
    assert err.count("warning: skipping unreadable image") == 1 and "broken.jpg" in err
    assert len(_metrics(out)) == 2


# ------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from stellar.train.train import build_parser, config_from_args, run_training

    cfg = config_from_args(build_parser().parse_args(["--output-dir", out] + MINI))
    summary = run_training(cfg, out, max_steps=3, quiet=True)
    weights = torch.cat([p.detach().flatten() for p in summary["student"].parameters()])
    torch.save({"losses": summary["losses"], "weights": weights}, os.path.join(out, f"r{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_processes_on_gloo(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 logs, once per step
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    r0, r1 = (torch.load(out / f"r{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["losses"] == r1["losses"]  # the logged loss is the mean over ranks
    assert all(v == v for v in r0["losses"].values())
    assert torch.equal(r0["weights"], r1["weights"])  # gradients were all-reduced
    saved = stellar.load(out / "checkpoint.pt")
    assert torch.equal(torch.cat([p.flatten() for p in saved.parameters()]), r0["weights"])


def test_loss_falls_from_the_first_steps(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "train.base_lr=0.02", "train.batch_size=8", max_steps=12) == 0
    losses = [r["loss"] for r in _metrics(out)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses


def test_compiled_steps_give_the_eager_losses(tmp_path, capsys):
    """train.compile=true: three steps with inductor-compiled encoders and decoder give the
    eager run's losses (the same batches, masks and initial weights)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    from torch._dynamo.utils import counters

    assert _train(eager, "train.batch_size=2", max_steps=3) == 0
    counters.clear()
    assert _train(compiled, "train.batch_size=2", "train.compile=true", max_steps=3) == 0
    assert counters["stats"]["unique_graphs"] >= 3  # the three networks went through dynamo
    assert "torch.compile: student.encoder, student.decoder, teacher.encoder" in (
        capsys.readouterr().err
    )
    want, got = _metrics(eager), _metrics(compiled)
    assert len(want) == len(got) == 3
    for w, g in zip(want, got):
        for term in ("loss", "loss_recon", "loss_cluster", "loss_align", "loss_cls"):
            assert g[term] == pytest.approx(w[term], rel=2e-3, abs=1e-4), (term, w, g)
    # The checkpoint of a compiled run holds the plain parameter names.
    assert stellar.load(compiled).encode(torch.rand(1, 3, 32, 32))["spatial"].shape[-1] == 4


@pytest.mark.slow
def test_tiny_preset_default_run(tmp_path):
    """The tiny preset's whole run: 600 steps on the embedded scenes, the loss well down."""
    out = tmp_path / "tiny"
    assert main(["--preset", "tiny", "--output-dir", str(out), "train.progress=false"]) == 0
    rows = _metrics(out)
    assert len(rows) == 600
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < first - 3, (first, last)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_training_steps_on_the_gpu(tmp_path, kernels):
    """Two bf16 steps on the GPU through the CLI, with each kernel backend."""
    from stellar.train.profile import make_train_step

    loss = make_train_step("tiny", 8, "cuda", kernels)()
    assert torch.isfinite(loss)
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--output-dir", str(out), "--max-steps", "2", "--kernels", kernels]
    assert main(argv + ["train.progress=false", "train.batch_size=8"]) == 0
    rows = _metrics(out)
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    model = stellar.load(out, device="cuda")
    with torch.no_grad():
        enc = model.encode(torch.rand(2, 3, 64, 64, device="cuda"))
    assert enc["spatial"].shape == (2, 64, 8) and enc["lowrank"].is_cuda


def test_a_run_from_before_a_new_key_resumes_when_the_key_keeps_its_default():
    new = load_preset("tiny")
    validate(new)
    old = load_preset("tiny")
    del old["train"]["tensorboard"], old["data"]["masking"]
    new["data"]["masking"] = "focal"  # the default: what the old run did
    assert differences(old, new) == []
    new["data"]["masking"] = "mixed"
    assert differences(old, new) == ["data.masking: 'focal' -> 'mixed'"]


def test_random_prior_preset_is_the_papers_schedule():
    cfg = load_preset("base_random_prior")
    validate(cfg)
    base = load_preset("base")
    steps_per_epoch = base["train"]["total_steps"] // 150
    assert cfg["teacher"]["mode"] == "ema" and cfg["init"] is None
    assert cfg["teacher"]["ema_steps"] == 150 * steps_per_epoch
    assert cfg["train"]["total_steps"] == 225 * steps_per_epoch
    assert cfg["teacher"]["ema_mask_ratio"] == 0.6 and cfg["data"]["mask_ratio"] == 0.8
    assert differences(base, cfg, exempt=()) == [
        "teacher.ema_mask_ratio: None -> 0.6",
        "teacher.ema_steps: None -> 93750",
        "teacher.mode: 'auto' -> 'ema'",
        "train.total_steps: 93750 -> 140625",
    ]
