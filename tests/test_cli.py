"""The commands as a user meets them: one line for every bad input (naming the key or the
file), help that lists the defaults, TensorBoard event files, the timm export, and the
Python API of the README."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stellar
from stellar.cli import resolve_device, run_command
from stellar.errors import CheckpointError, ConfigError, DataError
from stellar.testing import MINI_OVERRIDES
from stellar.train import schema
from stellar.train.config import PRESETS, load_preset, validate

QUICK = MINI_OVERRIDES + ["train.progress=false"]


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    assert not any("Traceback" in line for line in err), err
    return lines[0]


def train(*argv: str) -> int:
    from stellar.train.train import main

    return main(list(argv))


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "override,words",
    [
        (
            "train.batch_size=abc",
            "train.batch_size: 'abc' is not allowed; expected an integer >= 1",
        ),
        ("train.batch_size=-4", "train.batch_size: -4 is not allowed; expected an integer >= 1"),
        ("model.num_tokens=8.5", "model.num_tokens: 8.5 is not allowed; expected an integer"),
        ("data.mask_ratio=1.5", "data.mask_ratio: 1.5 is not allowed; expected a number in (0, 1)"),
        ("loss.matcher=greedy", "loss.matcher: 'greedy' is not allowed; expected one of"),
        ("train.amp=fp8", "train.amp: 'fp8' is not allowed"),
        ("data.global_scale=[0.5]", "data.global_scale: [0.5] is not allowed"),
        ("loss.koleo=-1", "loss.koleo: -1 is not allowed; expected a number >= 0, or true"),
        ("train.progress=maybe", "train.progress: 'maybe' is not allowed; expected true or false"),
        ("model.num_tokns=3", "unknown configuration key 'model.num_tokns' (did you mean"),
        ("model.arch=vit_nonesuch", "model.arch: 'vit_nonesuch' is not allowed; expected a string"),
        ("train.warmup_steps=10000", "train.warmup_steps (10000) is past train.total_steps"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key_and_nothing_is_written(
    tmp_path, capsys, override, words
):
    out = tmp_path / "run"
    assert train("--preset", "tiny", "--output-dir", str(out), override) == 2
    assert words in one_error_line(capsys, "stellar-train")
    assert not out.exists()


def test_every_preset_key_has_a_declared_type_and_range():
    declared = set(schema.all_keys())
    for name in PRESETS:
        cfg = load_preset(name)
        validate(cfg)
        keys = set(_dotted(cfg))
        assert keys == declared, (name, keys ^ declared)


def _dotted(cfg, prefix=""):
    for k, v in cfg.items():
        yield prefix + k
        if isinstance(v, dict) and prefix + k != "model.vit_kwargs":
            yield from _dotted(v, f"{prefix}{k}.")


def test_a_yaml_file_is_checked_like_a_preset(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    cfg = load_preset("tiny")
    cfg["train"]["lr_batch_ref"] = "big"
    import yaml

    bad.write_text(yaml.safe_dump(cfg))
    assert train("--preset", str(bad), "--output-dir", str(tmp_path / "r")) == 2
    assert "train.lr_batch_ref: 'big'" in one_error_line(capsys, "stellar-train")
    bad.write_text("model: [unclosed\n")
    assert train("--preset", str(bad), "--output-dir", str(tmp_path / "r")) == 2
    assert str(bad) in one_error_line(capsys, "stellar-train")


def test_ints_become_floats_where_a_float_is_due():
    cfg = load_preset("tiny")
    cfg["train"]["base_lr"] = 1
    validate(cfg)
    assert isinstance(cfg["train"]["base_lr"], float)


# ----------------------------------------------------------------------------- train


def test_max_steps_past_the_schedule_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--output-dir", str(out), "--max-steps", "21", *QUICK) == 2
    assert "--max-steps 21 is outside 1..train.total_steps (20" in one_error_line(
        capsys, "stellar-train"
    )
    assert not out.exists()


def test_print_config_needs_no_output_dir(capsys):
    assert train("--print-config", "model.num_tokens=4") == 0
    printed = capsys.readouterr().out
    assert "num_tokens: 4" in printed and "tensorboard: false" in printed


def test_output_dir_is_needed_to_train(capsys):
    assert train("--preset", "tiny") == 2
    assert "--output-dir is needed" in one_error_line(capsys, "stellar-train")


def test_missing_data_folder_and_init_file_name_the_path(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--output-dir", str(out), "--data", str(tmp_path / "nope"), *QUICK) == 1
    assert str(tmp_path / "nope") in one_error_line(capsys, "stellar-train")
    assert train("--output-dir", str(out), "--init", str(tmp_path / "mae.pth"), *QUICK) == 1
    assert str(tmp_path / "mae.pth") in one_error_line(capsys, "stellar-train")
    (tmp_path / "mae.pth").write_bytes(os.urandom(300))
    assert train("--output-dir", str(out), "--init", str(tmp_path / "mae.pth"), *QUICK) == 1
    assert "mae.pth is not a readable checkpoint" in one_error_line(capsys, "stellar-train")
    assert not out.exists()


def test_a_corrupt_checkpoint_in_the_run_directory_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(os.urandom(300))
    assert train("--output-dir", str(out), "--max-steps", "1", *QUICK) == 1
    assert f"{out / 'checkpoint.pt'}: not a readable checkpoint" in one_error_line(
        capsys, "stellar-train"
    )


def test_bad_device_is_one_line(tmp_path, capsys):
    assert train("--output-dir", str(tmp_path / "r"), "--device", "gpu", *QUICK) == 2
    assert "train.device: 'gpu' is not allowed" in one_error_line(capsys, "stellar-train")


def test_device_auto_is_cuda_when_available():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("STELLAR_TRACEBACK", "1")
    with pytest.raises(ValueError, match="train.batch_size"):
        train("--output-dir", str(tmp_path / "r"), "train.batch_size=abc")


# ----------------------------------------------------------------------------- user errors, bugs


def _raising(err: BaseException):
    def body() -> int:
        raise err

    return body


@pytest.mark.parametrize(
    "err,code",
    [
        (ConfigError("model.x: bad"), 2),
        (CheckpointError("run/checkpoint.pt: not readable"), 1),
        (DataError("--data: no readable image"), 1),
        (FileNotFoundError(2, "no such file", "missing.pt"), 1),
        (FileExistsError(17, "File exists", "runs/out"), 1),
    ],
)
def test_the_packages_errors_and_file_errors_are_one_line(capsys, err, code):
    assert run_command("stellar-x", _raising(err)) == code
    assert one_error_line(capsys, "stellar-x")


@pytest.mark.parametrize(
    "err", [ValueError("a bug"), RuntimeError("a bug"), TypeError("a bug"), KeyError("align")]
)
def test_any_other_error_keeps_its_traceback(err):
    with pytest.raises(type(err)):
        run_command("stellar-x", _raising(err))


def test_a_value_error_of_the_training_code_is_a_traceback_not_a_user_error(
    tmp_path, monkeypatch, capsys
):
    """A bug (here a ValueError from inside the training path) is not the user's mistake."""
    import stellar.train.train as train_module

    def broken(*args, **kwargs):
        raise ValueError("cannot reshape: a bug")

    monkeypatch.setattr(train_module, "build_loader", broken)
    with pytest.raises(ValueError, match="a bug"):
        train("--output-dir", str(tmp_path / "r"), "--max-steps", "1", *QUICK)
    assert "error:" not in capsys.readouterr().err


def test_a_bad_kernels_backend_variable_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STELLAR_KERNELS_BACKEND", "cuda-fast")
    assert train("--output-dir", str(tmp_path / "r"), "--max-steps", "1", *QUICK) == 2
    assert "STELLAR_KERNELS_BACKEND='cuda-fast'" in one_error_line(capsys, "stellar-train")
    assert not (tmp_path / "r").exists()


def test_a_folder_of_unreadable_images_is_one_line(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--data", str(tmp_path / "data"), "--max-steps", "1"]
    assert train(*argv, *QUICK) == 1
    assert "none of the 1 image files" in one_error_line(capsys, "stellar-train")


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--image-size", "36"], "--image-size 36 is not a multiple of the model's patch size 8"),
        (["--shifts", "100"], "--shifts: the largest shift 100 must be below the image side"),
    ],
)
def test_eval_option_values_the_model_cannot_take_are_one_line(tmp_path, capsys, argv, words):
    from stellar.eval.cli import main

    task = "equivariance" if "--shifts" in argv else "linear"
    common = ["--random-init", "--num-images", "10", "--no-progress", "--device", "cpu"]
    assert main([task, *common, "--output-dir", str(tmp_path / "e"), *argv]) == 2
    assert words in one_error_line(capsys, "stellar-eval")


@pytest.mark.parametrize(
    "option,value",
    [("--batch-size", "0"), ("--lrs", "-1"), ("--scales", "0"), ("--num-vis", "0")],
)
def test_eval_options_out_of_range_are_refused_by_the_parser(tmp_path, capsys, option, value):
    from stellar.eval.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["linear", "--random-init", "--output-dir", str(tmp_path / "e"), option, value])
    assert exit_.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 3-step run with TensorBoard on."""
    out = tmp_path_factory.mktemp("cli") / "run"
    pytest.importorskip("torch.utils.tensorboard")
    assert (
        train("--output-dir", str(out), "--max-steps", "3", *QUICK, "train.tensorboard=true") == 0
    )
    return out


def test_tensorboard_event_files_hold_the_metrics(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(run_dir.iterdir())
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for name in ("loss", "lr", "grad_norm", "loss_recon"):
        logged = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in logged] == [r["step"] for r in rows]
        assert [v for _, v in logged] == pytest.approx([r[name] for r in rows], rel=1e-6)


def test_tensorboard_missing_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert train("--output-dir", str(out), *QUICK, "train.tensorboard=true") == 2
    assert "pip install tensorboard" in one_error_line(capsys, "stellar-train")
    assert not out.exists()


@pytest.mark.parametrize("name", ["checkpoint.pt", "model.safetensors"])
def test_eval_names_a_corrupt_or_foreign_file(tmp_path, capsys, name):
    from stellar.eval.cli import main

    bad = tmp_path / name
    bad.write_bytes(os.urandom(200))
    assert main(["linear", "--checkpoint", str(bad), "--output-dir", str(tmp_path / "e")]) == 1
    line = one_error_line(capsys, "stellar-eval")
    assert str(bad) in line and "not a readable" in line
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert main(["linear", "--checkpoint", str(tmp_path / "foreign.pt"), "--output-dir", "e"]) == 1
    assert "not a STELLAR checkpoint" in one_error_line(capsys, "stellar-eval")
    missing = tmp_path / "missing"
    assert main(["linear", "--checkpoint", str(missing), "--output-dir", str(tmp_path / "e")]) == 1
    assert str(missing) in one_error_line(capsys, "stellar-eval")
    assert not (tmp_path / "e").exists()


def test_timm_loads_the_export_with_the_runs_weights(run_dir, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    from stellar.export import main

    out = tmp_path / "timm"
    assert main(["--checkpoint", str(run_dir), "--format", "timm", "--output-dir", str(out)]) == 0
    assert {"config.json", "model.safetensors", "stellar_extras.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    backbone = timm.create_model(f"local-dir:{out}", pretrained=True)
    model = stellar.load(run_dir)
    ours = model.encoder.vit.state_dict()
    theirs = backbone.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    images = torch.rand(2, 3, 32, 32)
    expected = model.encoder.vit.forward_features(model.normalize(images))
    torch.testing.assert_close(backbone.forward_features(model.normalize(images)), expected)
    from safetensors import safe_open

    with safe_open(str(out / "stellar_extras.safetensors"), framework="pt") as f:
        extras = set(f.keys())
    assert "encoder.latent_queries" in extras and "proj_dense.weight" in extras


def test_export_of_a_missing_run_is_one_line(tmp_path, capsys):
    from stellar.export import main

    assert main(["--checkpoint", str(tmp_path / "none"), "--output-dir", str(tmp_path / "x")]) == 1
    assert str(tmp_path / "none") in one_error_line(capsys, "stellar-export")


def test_demo_with_a_bad_override_is_one_line(tmp_path, capsys):
    from stellar.demo import main

    assert main(["--output-dir", str(tmp_path / "d"), "model.num_tokens=x"]) == 2
    assert "model.num_tokens: 'x'" in one_error_line(capsys, "stellar-demo")
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command", ["stellar.train.train", "stellar.eval.cli", "stellar.demo", "stellar.export"]
)
def test_help_lists_the_defaults(command, capsys):
    module = __import__(command, fromlist=["build_parser"])
    text = module.build_parser().format_help()
    assert "(default: " in text
    if command != "stellar.export":
        assert "--device" in text
    if command in ("stellar.eval.cli", "stellar.demo"):
        assert "--device DEVICE" in text and "(default: auto)" in text.replace("\n", " ")


def test_stellar_kernels_help_prints_usage_and_runs_nothing():
    run = subprocess.run(
        [sys.executable, "-m", "stellar_kernels", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: python -m stellar_kernels")
    assert "ok " not in run.stdout and "FAIL" not in run.stdout


# ----------------------------------------------------------------------------- Python API


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """The README's "From Python" block, with the test's small model."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- python-api -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "run_training" in block and "evaluate_linear" in block
    monkeypatch.chdir(tmp_path)
    small = [*QUICK, "train.total_steps=4"]
    code = block.replace('["train.total_steps=300"]', repr(small))
    code = code.replace("num_images=400", "num_images=40").replace("epochs=20", "epochs=2")
    assert code != block
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert 0 <= namespace["result"]["top1"] <= 100
    assert (tmp_path / "runs" / "api" / "model.safetensors").is_file()
