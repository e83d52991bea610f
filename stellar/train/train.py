"""stellar-train: self-supervised STELLAR training, from one CPU to many GPUs.

    stellar-train --preset tiny --output-dir runs/tiny
    stellar-train --preset base --data /data/imagenet/train --init mae_pretrain_vit_base.pth \
        --output-dir runs/base
    torchrun --nproc_per_node=8 -m stellar.train --preset base --data ... --output-dir ...

Writes DIR/config.yaml, DIR/metrics.jsonl, DIR/checkpoint.pt (atomic, every
train.ckpt_every steps and when the run stops) and DIR/model.safetensors.
Running the same command again with a larger --max-steps resumes from the
checkpoint on the same schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..cli import (
    DEVICE_HELP,
    HelpFormatter,
    check_kernels_environment,
    resolve_device,
    run_command,
)
from ..data import build_loader
from ..data.loader import derive_seed
from ..errors import CheckpointError, ConfigError, reason
from ..loss import MATCHERS
from ..models import load_vit_weights
from .checkpoint import (
    CHECKPOINT_NAME,
    WEIGHTS_NAME,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from .config import PRESETS, apply_overrides, differences, dump, load_preset, validate
from .ssl_meta_arch import StellarSSL, momentum_at, teacher_mode

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "latent_queries", "prototypes")


class TrainingStopped(RuntimeError):
    """Training stopped early (non-finite loss); the message says why and what was saved."""


# ---------------------------------------------------------------------------- setup


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of step `step`'s masks and photometric changes on rank `rank`."""
    return derive_seed(seed, 3, step, rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def check_kernels(kernels: str | None, device: torch.device) -> None:
    check_kernels_environment()
    if (
        kernels == "triton"
        and device.type != "cuda"
        and os.environ.get("TRITON_INTERPRET", "0") != "1"
    ):
        raise ConfigError(
            "--kernels triton needs a CUDA device (or TRITON_INTERPRET=1 set before "
            "the start, which runs the Triton kernels slowly on the CPU); on the CPU use "
            "--kernels torch or leave --kernels out"
        )


def peak_lr(cfg: dict, world_size: int) -> float:
    """The learning rate after the warm-up: train.base_lr, times the global batch over
    train.lr_batch_ref with train.lr_scaling=batch (MAE's convention for a "base" rate)."""
    t = cfg["train"]
    if t.get("lr_scaling", "batch") == "none":
        return t["base_lr"]
    return t["base_lr"] * t["batch_size"] * world_size / t["lr_batch_ref"]


def lr_factor(cfg: dict, peak: float) -> Callable[[int], float]:
    """LambdaLR factor after `done` steps: linear warm-up, then cosine to train.min_lr; with
    train.lr_schedule=constant, 1 at every step (no warm-up, as the released configuration,
    which names no scheduler)."""
    t = cfg["train"]
    if t.get("lr_schedule", "cosine") == "constant":
        return lambda done: 1.0
    total, warmup = t["total_steps"], t["warmup_steps"]
    floor = min(1.0, t["min_lr"] / peak) if peak > 0 else 0.0

    def factor(done: int) -> float:
        if done < warmup:
            return (done + 1) / warmup
        progress = min(1.0, (done - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float, groups: str = "exempt") -> list[dict]:
    """AdamW's parameter groups. "exempt": no decay on 1-D parameters (biases, norms) and on
    `NO_DECAY_NAMES`; "all": one group, decay on every parameter (the released code passes
    the model's parameters to AdamW as they are)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if groups == "all":
        return [{"params": trained, "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# The timm encoders for which MAE released checkpoints (mae_pretrain_vit_{base,large,huge}.pth):
# the paper starts them from one, so starting them from random weights deserves a word.
MAE_ARCHS = ("vit_base_patch16", "vit_large_patch16", "vit_huge_patch14")


def check_start_files(cfg: dict, resume: bool) -> None:
    """ConfigError in one line when a run cannot start for want of a file the configuration
    needs: the MAE checkpoint of `init_required` (a new run only: a resumed one has its
    weights) and the tokenizer of model.recon_target=vq. Checked here, not by the schema, so
    that a preset that names them prints (--print-config) without the files."""
    missing = []
    if cfg.get("init_required") and not cfg.get("init") and not resume:
        missing.append(
            "--init FILE (init_required is true: the recipe starts the encoder from an MAE "
            "checkpoint, e.g. mae_pretrain_vit_base.pth)"
        )
    model = cfg["model"]
    if model.get("recon_target") == "vq" and not model.get("vq_checkpoint"):
        missing.append(
            "model.vq_checkpoint=FILE (model.recon_target is 'vq': the tokenizer's file, the "
            "released maskgit-vqgan-imagenet-f16-256.bin)"
        )
    if missing:
        raise ConfigError("training needs " + " and ".join(missing))


def recipe_notices(cfg: dict) -> list[str]:
    """Lines said before the first step of a new run whose encoder is one MAE released a
    checkpoint for (ViT-B/16, L/16, H/14) where the run leaves the paper's main recipe
    without saying so in its configuration: no --init (outside the random-prior recipe, which
    sets teacher.ema_steps), and the pixel target. The tiny preset has no checkpoint to
    expect, and base_release requires both files."""
    if not str(cfg["model"]["arch"]).startswith(MAE_ARCHS):
        return []
    lines = []
    if not cfg.get("init") and cfg["teacher"].get("ema_steps") is None:
        if teacher_mode(cfg) == "ema":
            how = "with an EMA teacher for the whole run"
        else:
            how = "with the student's own targets (teacher.mode=none)"
        lines.append(
            f"note: the encoder starts from random initialization {how}; the paper's "
            "recipe starts it from an MAE checkpoint: --init FILE"
        )
    if cfg["model"].get("recon_target", "pixels") == "pixels" and cfg["loss"]["recon"]:
        lines.append(
            "note: the decoder reconstructs pixels (MSE); the paper's main recipe predicts "
            "MaskGIT-VQGAN codes: model.recon_target=vq model.vq_checkpoint=FILE"
        )
    return lines


def device_batch(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


# ---------------------------------------------------------------------------- training


class _StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers
            self._old = {}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signal = signum
        print(
            f"\nreceived signal {signum}: stopping after this step (again to abort)",
            file=sys.stderr,
        )

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TensorBoardLog:
    """The scalars of metrics.jsonl, also as TensorBoard event files in the run directory."""

    def __init__(self, writer_class) -> None:
        self._writer_class = writer_class
        self._writer = None

    def log(self, out: Path, row: dict) -> None:
        if self._writer is None:  # made with the first row: the run directory exists by then
            self._writer = self._writer_class(log_dir=str(out / "tensorboard"))
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(name, value, row["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def open_tensorboard(cfg: dict) -> TensorBoardLog | None:
    if not cfg["train"].get("tensorboard"):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard "
            f"(or pip install -e '.[tensorboard]'; {err})"
        ) from err
    return TensorBoardLog(SummaryWriter)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops the rows after `last_step` (logged after the checkpoint a resumed run starts from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def run_training(
    cfg: dict, output_dir: str | Path, max_steps: int | None = None, quiet: bool = False
) -> dict:
    """Trains (or resumes) the run in `output_dir` up to `max_steps`; returns a summary dict.

    Raises TrainingStopped on a non-finite loss (after saving the last good state).
    """
    validate(cfg)
    rank, world, local_rank = distributed_env()
    device = resolve_device(cfg["train"]["device"], local_rank)
    check_kernels(cfg.get("kernels"), device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    is_main = rank == 0
    out = Path(output_dir)
    ckpt_path, metrics_path = out / CHECKPOINT_NAME, out / "metrics.jsonl"
    total = int(cfg["train"]["total_steps"])
    max_steps = total if max_steps is None else int(max_steps)
    tensorboard = open_tensorboard(cfg) if is_main else None
    if not 1 <= max_steps <= total:
        raise ConfigError(
            f"--max-steps {max_steps} is outside 1..train.total_steps ({total}, the learning-rate "
            "schedule's length); to train longer, raise train.total_steps in a new run"
        )
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if is_main and not quiet else None

    resume = ckpt_path.is_file()
    ckpt = None
    if resume:
        try:
            ckpt = load_checkpoint(ckpt_path)
        except Exception as err:  # pickle, zip and EOF errors of a damaged file
            raise CheckpointError(
                f"{ckpt_path}: not a readable checkpoint ({reason(err)})"
            ) from err
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
            raise CheckpointError(f"{ckpt_path}: not a STELLAR training checkpoint")
        diff = differences(ckpt["config"], cfg)
        if diff:
            raise ConfigError(
                f"{out} holds a run with another configuration; resume it with the same "
                "settings or choose a new --output-dir. Differences: " + "; ".join(diff)
            )
        if ckpt.get("world_size", world) != world and say:
            say(f"warning: resuming a {ckpt['world_size']}-process run with {world} processes")
    check_start_files(cfg, resume)
    seed = int(cfg["seed"])
    seed_everything(seed)  # same initial weights on every rank
    ssl = StellarSSL(cfg)
    if cfg.get("init") and not resume:
        load_vit_weights(ssl.student.encoder.vit, cfg["init"])
        ssl.reset_teacher()
        if say:
            say(f"initialized the encoder's ViT from {cfg['init']}")
    if say and not resume:
        for line in recipe_notices(cfg):
            say(line)
    ssl.to(device)
    if cfg["train"].get("compile"):
        names = ssl.compile_models()
        if say:
            say(f"torch.compile: {', '.join(names)} (compiled on the first steps)")
    peak = peak_lr(cfg, world)
    t = cfg["train"]
    groups = param_groups(ssl.student, t["weight_decay"], t.get("weight_decay_groups", "exempt"))
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=tuple(t["betas"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, peak))
    step = 0
    if ckpt is not None:
        ssl.student.load_state_dict(ckpt["model"])
        if ssl.teacher is not None:
            ssl.teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if is_main:
            _truncate_metrics(metrics_path, step)
        if say:
            say(f"resuming {out} from step {step}")
    else:
        seed_everything(seed + rank)
    del ckpt

    summary = {
        "start_step": step,
        "step": step,
        "losses": {},
        "stopped": None,
        "student": ssl.student,
    }
    if step >= max_steps:
        if say:
            say(f"{out} is already at step {step} >= --max-steps {max_steps}: nothing to do")
        return summary

    model: torch.nn.Module = ssl
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        unused = not all(w > 0 for w in ssl.weights.values())
        model = DDP(
            ssl,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused,
        )
    loader = build_loader(
        cfg["data"],
        t["batch_size"],
        seed,
        rank,
        world,
        start_step=step,
        warn_dir=out / ".skipped",
        pin_memory=device.type == "cuda",
    )
    # Only now, with the configuration, model and data built, does the run directory appear.
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_text(out / "config.yaml", dump(cfg))
            if metrics_path.exists():
                metrics_path.unlink()
    if world > 1:
        dist.barrier()
    amp = device.type == "cuda" and t.get("amp") == "bf16"
    global_batch = t["batch_size"] * world
    terms = ssl.active_terms()

    saving = False

    def save(at_step: int) -> None:
        nonlocal saving
        saving = True
        _save(at_step)
        saving = False

    def _save(at_step: int) -> None:
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if not is_main:
            return
        state = {
            "step": at_step,
            "config": cfg,
            "world_size": world,
            "model": ssl.student.state_dict(),
            "teacher": ssl.teacher.state_dict() if ssl.teacher is not None else {},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": states,
        }
        save_checkpoint(ckpt_path, state)
        save_weights(out / WEIGHTS_NAME, ssl.student, cfg, at_step)

    from tqdm import tqdm

    bar = tqdm(
        total=max_steps,
        initial=step,
        disable=not (is_main and t.get("progress", True) and not quiet),
        dynamic_ncols=True,
        mininterval=0.5,
        desc="stellar-train",
    )
    model.train()
    it = iter(loader)
    last_saved = step
    smooth_ips = None
    started = time.perf_counter()
    consistent = True  # the in-memory state is the state after `step` steps
    with _StopFlag() as stop:
        try:
            while step < max_steps:
                t0 = time.perf_counter()
                batch = device_batch(next(it), device)
                generator = torch.Generator().manual_seed(step_seed(seed, step + 1, rank))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    losses = model(batch, generator, step + 1)
                loss = losses["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(ssl.student.parameters(), t["clip_grad"])
                stats = torch.stack(
                    [loss.detach().float(), grad_norm.detach().float().to(loss.device)]
                    + [losses[k].detach().float() for k in terms]
                    + [torch.tensor(float(stop.signal is not None), device=loss.device)]
                )
                finite = torch.isfinite(stats[:2]).all().float()
                stats = torch.cat([stats, (1 - finite).view(1)])
                if world > 1:
                    flags = stats[-2:].clone()
                    dist.all_reduce(stats, op=dist.ReduceOp.SUM)
                    stats[:-2] /= world
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    stats[-2:] = flags
                values = stats.tolist()
                if values[-1] > 0:  # NaN or Inf: keep the state before this step
                    if step > last_saved or not ckpt_path.exists():
                        save(step)
                    bar.close()
                    named = ", ".join(f"{k}={v:.4g}" for k, v in zip(terms, values[2:-2]))
                    msg = (
                        f"non-finite loss at step {step + 1} (loss={values[0]}, grad_norm="
                        f"{values[1]}; {named}); training stopped. The last good state (step {step}) "
                        f"is in {ckpt_path}. Lower train.base_lr, raise train.warmup_steps or "
                        "switch off the term that diverged (loss.<term>=0)."
                    )
                    summary["stopped"] = "nonfinite"
                    raise TrainingStopped(msg)
                consistent = False
                optimizer.step()
                scheduler.step()
                step += 1
                momentum = None
                if ssl.ema_phase(step):
                    momentum = momentum_at(cfg, step)
                    ssl.teacher.update(ssl.student, momentum)
                consistent = True
                elapsed = time.perf_counter() - t0
                ips = global_batch / max(elapsed, 1e-9)
                smooth_ips = ips if smooth_ips is None else 0.9 * smooth_ips + 0.1 * ips
                row = {
                    "step": step,
                    "epoch": (step - 1) // loader.batch_sampler.steps_per_epoch,
                    "loss": values[0],
                    **{f"loss_{k}": v for k, v in zip(terms, values[2:-2])},
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": values[1],
                    "images_per_s": ips,
                    "time_s": time.perf_counter() - started,
                }
                if momentum is not None:
                    row["momentum"] = momentum
                summary["losses"][step] = values[0]
                summary["step"] = step
                if is_main and (step % t["log_every"] == 0 or step == max_steps or step == 1):
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if tensorboard is not None:
                        tensorboard.log(out, row)
                bar.update(1)
                bar.set_postfix(loss=f"{values[0]:.4f}", img_s=f"{smooth_ips:.1f}", refresh=False)
                stopping = values[-2] > 0
                if step % t["ckpt_every"] == 0 or step == max_steps or stopping:
                    save(step)
                    last_saved = step
                if stopping:
                    summary["stopped"] = "signal"
                    break
        except (Exception, KeyboardInterrupt) as err:
            if tensorboard is not None:
                tensorboard.close()
            # A failure outside the update (data, forward, backward, out of memory): keep
            # the progress made since the last checkpoint. Under DDP the other ranks may
            # wait in a collective, so only a single process saves here.
            if (
                world == 1
                and not saving
                and consistent
                and step > last_saved
                and not isinstance(err, TrainingStopped)
            ):
                if say:
                    say(f"\n{type(err).__name__} at step {step + 1}: saving step {step} first")
                save(step)
            raise
    bar.close()
    if tensorboard is not None:
        tensorboard.close()
    if say:
        first = summary["losses"].get(summary["start_step"] + 1)
        say(
            f"done: step {step}, loss {first:.4f} -> {values[0]:.4f}; checkpoint {ckpt_path}"
            if first is not None
            else f"done: step {step}"
        )
    return summary


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stellar-train",
        description="Self-supervised STELLAR training (paper sec. 4, 5 and appendix A).",
        epilog="Overrides: key=value for any preset key, e.g. model.num_tokens=8 loss.koleo=0 "
        "train.batch_size=64 (values are parsed as YAML; --print-config lists every key).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--preset", default="tiny", help=f"{', '.join(PRESETS)} or a YAML file")
    p.add_argument(
        "--data",
        help="an image folder (flat or class subfolders); default: the embedded shapes scenes",
    )
    p.add_argument(
        "--output-dir",
        help="run directory (resumed when it holds a checkpoint); needed unless --print-config",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this step, at most train.total_steps (default: train.total_steps)",
    )
    p.add_argument(
        "--init",
        help="MAE-pretrained ViT weights (.pth/.pt/.safetensors, timm or "
        "MAE key names) for the encoder",
    )
    p.add_argument(
        "--kernels",
        choices=("triton", "torch"),
        default=None,
        help="stellar_kernels backend (default: the fastest for the device)",
    )
    p.add_argument("--matcher", choices=MATCHERS, default=None, help="set alignment matching")
    p.add_argument("--device", default=None, help=f"{DEVICE_HELP} (default: train.device)")
    p.add_argument("--print-config", action="store_true", help="print the configuration and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="preset overrides")
    return p


def load_config(preset: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A run's checked configuration: a preset name or YAML file, then `key=value` overrides
    (ConfigError naming the key for a value that is not allowed)."""
    cfg = apply_overrides(load_preset(preset), list(overrides))
    validate(cfg)
    if cfg["teacher"]["mode"] == "auto":
        cfg["teacher"]["mode"] = teacher_mode(cfg)
    return cfg


def config_from_args(args: argparse.Namespace) -> dict:
    extra = []
    if args.data is not None:
        extra.append(
            ("data.source", args.data if args.data == "shapes" else str(Path(args.data).resolve()))
        )
    if args.kernels is not None:
        extra.append(("kernels", args.kernels))
    if args.matcher is not None:
        extra.append(("loss.matcher", args.matcher))
    if args.init is not None:
        extra.append(("init", str(Path(args.init).resolve())))
    if args.device is not None:
        extra.append(("train.device", args.device))
    return load_config(args.preset, args.overrides + [f"{k}={json.dumps(v)}" for k, v in extra])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("stellar-train", lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    if args.output_dir is None:
        raise ConfigError("--output-dir is needed (the run directory)")
    if args.init is not None and not Path(args.init).is_file():
        raise FileNotFoundError(2, "no such file (--init)", args.init)
    try:
        summary = run_training(cfg, args.output_dir, args.max_steps)
    except TrainingStopped as err:
        print(f"stellar-train: error: {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary["stopped"] == "signal":
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
