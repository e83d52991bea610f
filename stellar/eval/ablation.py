"""Table 3 ablations on a preset: train each variant, then score reconstruction and semantics.

Variants (paper Table 3; the loss weights set to 0):
  default  everything
  a        no low-rank reconstruction (recon)
  b        no clustering, no set alignment, no CLS alignment
  c        no set alignment, no CLS alignment
  d        no clustering
  e        no CLS alignment
  f        no KoLeo
Each variant trains into DIR/runs/VARIANT (resumed when it exists) and is
scored by linear probing of mean-pooled sparse tokens, reconstruction PSNR
(not for a, whose decoder is untrained) and, on the embedded scenes, token mIoU.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

VARIANTS = {
    "default": {},
    "a": {"loss.recon": 0},
    "b": {"loss.cluster": 0, "loss.align": 0, "loss.cls": 0},
    "c": {"loss.align": 0, "loss.cls": 0},
    "d": {"loss.cluster": 0},
    "e": {"loss.cls": 0},
    "f": {"loss.koleo": 0},
}


def variant_config(preset: str, variant: str, data: str | None = None) -> dict:
    from ..train.config import apply_overrides, load_preset, validate
    from ..train.ssl_meta_arch import teacher_mode

    cfg = load_preset(preset)
    overrides = [f"{k}={json.dumps(v)}" for k, v in VARIANTS[variant].items()]
    if data is not None and data != "shapes":
        overrides.append(f"data.source={json.dumps(str(Path(data).resolve()))}")
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    if cfg["teacher"]["mode"] == "auto":
        cfg["teacher"]["mode"] = teacher_mode(cfg)
    return cfg


def run_ablation(args, out: Path) -> dict:
    from ..train.train import TrainingStopped, run_training
    from .features import build_data, load_model
    from .linear import DEFAULT_LRS, evaluate_linear
    from .localization import evaluate_localization
    from .reconstruction import evaluate_reconstruction

    names = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(
            f"--variants: unknown variants {unknown}; choose from {', '.join(VARIANTS)}"
        )
    progress = not args.no_progress
    rows = []
    for name in names:
        run_dir = out / "runs" / name
        cfg = variant_config(args.preset, name, args.data)
        print(f"ablation {name}: {VARIANTS[name] or 'all losses'} -> {run_dir}", flush=True)
        row = {"variant": name, "disabled": sorted(VARIANTS[name]), "run": str(run_dir)}
        try:
            run_training(cfg, run_dir, args.max_steps, quiet=not progress)
        except TrainingStopped as err:
            row["error"] = str(err)
        try:
            model = load_model(run_dir)
        except FileNotFoundError as err:
            row["error"] = str(err)
            rows.append(row)
            continue
        size = int(model.config["img_size"])
        data = build_data(args.data, size, args.val_data, args.num_images, args.seed)
        row["linear_top1"] = evaluate_linear(
            model,
            data,
            "sparse",
            args.batch_size,
            args.lrs or DEFAULT_LRS,
            args.epochs or 100,
            args.seed,
            progress,
        )["top1"]
        rec = evaluate_reconstruction(model, data.val, args.batch_size, progress)
        row["psnr"] = None if name == "a" else rec["psnr"]
        row["mse"] = None if name == "a" else rec["mse"]
        if data.name == "shapes":
            row["miou"] = evaluate_localization(model, data.val, args.batch_size, progress)["miou"]
        rows.append(row)
    table = ablation_table(rows)
    (out / "ablation.md").write_text(table)
    print(table)
    return {"preset": args.preset, "max_steps": args.max_steps, "variants": rows}


def ablation_table(rows: list[dict]) -> str:
    def fmt(v, spec=".2f"):
        return "—" if v is None else format(v, spec)

    base = next((r for r in rows if r["variant"] == "default" and "linear_top1" in r), None)
    lines = [
        "| variant | disabled losses | PSNR (dB) | linear top-1 (%) | mIoU (%) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "linear_top1" not in r:
            lines.append(f"| {r['variant']} | {', '.join(r['disabled'])} | failed | failed | |")
            continue
        lin = fmt(r["linear_top1"])
        if base is not None and r is not base:
            lin += f" ({r['linear_top1'] - base['linear_top1']:+.2f})"
        lines.append(
            f"| {r['variant']} | {', '.join(d.split('.')[-1] for d in r['disabled']) or '—'} | "
            f"{fmt(r.get('psnr'))} | {lin} | {fmt(r.get('miou'))} |"
        )
    return "\n".join(lines) + "\n"
