"""Experiment 3 (paper sec. 5.1, Fig. 2c): the number of sparse tokens K.

Given saved runs trained with different K (e.g. stellar-train ... model.num_tokens=4),
each is scored by linear probing on mean-pooled sparse tokens and by
reconstruction (PSNR, MSE) on the same evaluation images; both are plotted
against K.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..cli import resolve_device
from ..errors import ConfigError
from .features import build_data, encoded_image_size, load_model


def evaluate_run(run, args, progress: bool = True) -> dict:
    from .linear import DEFAULT_LRS, evaluate_linear
    from .reconstruction import evaluate_reconstruction

    model = load_model(run, False, resolve_device(args.device))
    size = encoded_image_size(model, args.image_size)
    data = build_data(args.data, size, args.val_data, args.num_images, args.seed, with_masks=False)
    lin = evaluate_linear(
        model,
        data,
        "sparse",
        args.batch_size,
        args.lrs or DEFAULT_LRS,
        args.epochs or 100,
        args.seed,
        progress,
    )
    rec = evaluate_reconstruction(model, data.val, args.batch_size, progress)
    return {
        "run": str(run),
        "num_tokens": int(model.config["num_tokens"]),
        "linear_top1": lin["top1"],
        "psnr": rec["psnr"],
        "mse": rec["mse"],
        "ssim": rec["ssim"],
    }


def evaluate_tokens(args, out: Path) -> dict:
    if not args.runs:
        raise ConfigError("tokens needs --runs RUN_DIR ... (runs trained with different K)")
    rows = [evaluate_run(r, args, not args.no_progress) for r in args.runs]
    rows.sort(key=lambda r: r["num_tokens"])
    res = {
        "num_tokens": [r["num_tokens"] for r in rows],
        "linear_top1": [r["linear_top1"] for r in rows],
        "psnr": [r["psnr"] for r in rows],
        "mse": [r["mse"] for r in rows],
        "runs": copy.deepcopy(rows),
    }
    res["plot"] = plot_tokens(res, out / "tokens.png")
    return res


def plot_tokens(res: dict, path) -> str:
    from .visualize import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    k = res["num_tokens"]
    ax.plot(k, res["linear_top1"], "-o", color="C0", label="linear top-1 (%)")
    ax.set_xlabel("number of tokens K")
    ax.set_ylabel("linear top-1 (%)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(k, res["psnr"], "--s", color="C1", label="PSNR (dB)")
    ax2.set_ylabel("reconstruction PSNR (dB)", color="C1")
    ax.set_title("Exp. 3: low-rank bottleneck", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
