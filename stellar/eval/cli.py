"""stellar-eval: evaluation and probing of a STELLAR model's factorized representation.

    stellar-eval TASK --checkpoint RUN_DIR_OR_FILE [--data shapes|PATH] --output-dir DIR
                 [--random-init] [options]

TASK: linear (--augment: the public protocol), knn, reconstruction, equivariance,
robustness, localization, segmentation (--protocol fast|paper), visualize, tokens
(--runs RUN ...), ablation (--preset tiny), all (every image task).
Each task writes DIR/TASK.json (plus its pictures) and prints a short table.
--random-init evaluates the same architecture with fresh weights (the baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..cli import (
    DEVICE_HELP,
    HelpFormatter,
    check_kernels_environment,
    positive_int,
    resolve_device,
    run_command,
)
from ..errors import ConfigError
from .features import (
    FEATURE_TYPES,
    build_data,
    encoded_image_size,
    extract_splits,
    load_model,
)
from .segmentation import FAST_EPOCHS, PAPER_EPOCHS, PROTOCOLS

IMAGE_TASKS = (
    "linear",
    "knn",
    "reconstruction",
    "equivariance",
    "robustness",
    "localization",
    "segmentation",
    "visualize",
)
TASKS = IMAGE_TASKS + ("tokens", "ablation", "all")


def _positive_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers") from None
    if not values or not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers > 0 expected")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stellar-eval",
        description="Evaluate and probe a STELLAR model (paper sec. 5.1-5.4, appendix A.2).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("task", choices=TASKS, help="what to measure (all: every image task)")
    p.add_argument("--checkpoint", help="a run directory, checkpoint.pt or model.safetensors")
    p.add_argument(
        "--data",
        default="shapes",
        help="'shapes' (the embedded scenes) or an image folder with class subfolders",
    )
    p.add_argument("--val-data", help="a separate validation folder (default: seeded 80/20 split)")
    p.add_argument("--output-dir", required=True, help="where TASK.json and pictures go")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="evaluate the same architecture with freshly initialized weights",
    )
    p.add_argument("--seed", type=int, default=0, help="split, crops and random-init seed")
    p.add_argument(
        "--num-images", type=positive_int, default=2000, help="embedded scenes to evaluate on"
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="evaluation image side (default: the model's input size; equivariance: 1.5x)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("linear / knn")
    g.add_argument("--features", choices=FEATURE_TYPES, default="sparse", help="what is probed")
    g.add_argument(
        "--lrs", type=_positive_floats, default=None, help="comma-separated learning rates"
    )
    g.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="linear probe epochs (default: 100; 30 with --augment)",
    )
    g.add_argument(
        "--augment",
        action="store_true",
        help="linear: the public protocol, training on augmented views (random resized crop "
        "0.2-1 + flip) every epoch, centre crops for scoring, AdamW at the first --lrs "
        "(default 1e-3), 2048 images a step (or the most that fit; the output states it), "
        "gradient norm clipped to 5, bf16 autocast on CUDA; slower than the default probe "
        "on features extracted once",
    )
    g.add_argument("--k", type=positive_int, default=20, help="k-NN neighbours")
    g.add_argument("--temperature", type=_positive_float, default=0.07, help="k-NN temperature")
    g = p.add_argument_group("segmentation")
    g.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="fast",
        help="fast: features computed once, no augmentation, per-pixel cross-entropy and mIoU; "
        "paper: the public code's probe, new random resized crops + flips every step, "
        "cross-entropy + Dice and mIoU at the patch grid, AdamW 1e-4, 2048 images a step, "
        "gradient clipping 5",
    )
    g.add_argument(
        "--seg-epochs",
        type=positive_int,
        default=None,
        help=f"epochs of the two BatchNorm + linear heads (default: {FAST_EPOCHS} fast, "
        f"{PAPER_EPOCHS} paper)",
    )
    g = p.add_argument_group("equivariance / robustness / visualize")
    g.add_argument(
        "--shifts", type=_positive_floats, default=None, help="pixels (default: 5..30 scaled)"
    )
    g.add_argument(
        "--matcher",
        choices=("sinkhorn", "hungarian"),
        default="sinkhorn",
        help="how tokens are matched across shifts",
    )
    g.add_argument("--scales", type=_positive_floats, default=None, help="crop area scales")
    g.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="show each token's map where A_k passes this value (default: 2/K, twice the "
        "uniform share, whatever the sharpness of A)",
    )
    g.add_argument("--num-vis", type=positive_int, default=6, help="images in the pictures")
    g = p.add_argument_group("tokens / ablation")
    g.add_argument("--runs", nargs="+", help="tokens: run directories trained with different K")
    g.add_argument("--preset", default="tiny", help="ablation (and --random-init alone) preset")
    g.add_argument("--max-steps", type=int, default=None, help="ablation: training steps")
    g.add_argument("--variants", default=None, help="ablation: comma-separated, e.g. default,a,b")
    return p


# ---------------------------------------------------------------------------- tasks


def run_image_task(task: str, model, args, out: Path) -> dict:
    progress = not args.no_progress
    # Equivariance and robustness resize their crops to the model's input size; every other
    # task encodes images of --image-size.
    if task in ("equivariance", "robustness"):
        size = args.image_size or int(model.config["img_size"])
    else:
        size = encoded_image_size(model, args.image_size)
    if task == "segmentation":
        from .segmentation import (
            evaluate_segmentation,
            evaluate_segmentation_paper,
            folder_splits,
            scene_splits,
        )

        if args.data is None or str(args.data) == "shapes":
            train, val = scene_splits(args.num_images, size, args.seed)
        else:
            train, val = folder_splits(args.data, size, args.seed, args.val_data)
        paper = args.protocol == "paper"
        probe = evaluate_segmentation_paper if paper else evaluate_segmentation
        return probe(
            model,
            train,
            val,
            args.batch_size,
            args.seg_epochs or (PAPER_EPOCHS if paper else FAST_EPOCHS),
            seed=args.seed,
            progress=progress,
            out_dir=out,
        )
    if task == "equivariance" and args.image_size is None:
        size = int(round(1.5 * int(model.config["img_size"])))
    data = build_data(
        args.data,
        size,
        args.val_data,
        args.num_images,
        args.seed,
        render_size=max(size, round(1.5 * int(model.config["img_size"]))),
        with_masks=task == "localization",
    )
    if task == "linear" and args.augment:
        from .linear import AUGMENT_EPOCHS, AUGMENT_LR, evaluate_linear_augmented

        lr = args.lrs[0] if args.lrs else AUGMENT_LR
        return evaluate_linear_augmented(
            model,
            data,
            args.features,
            args.batch_size,
            lr,
            args.epochs or AUGMENT_EPOCHS,
            args.seed,
            progress,
        )
    if task == "linear":
        from .linear import DEFAULT_LRS, evaluate_linear

        return evaluate_linear(
            model,
            data,
            args.features,
            args.batch_size,
            args.lrs or DEFAULT_LRS,
            args.epochs or 100,
            args.seed,
            progress,
        )
    if task == "knn":
        from .knn import knn_eval

        k = args.features
        tr, va, n_cls = extract_splits(model, data, k, args.batch_size, progress)
        res = knn_eval(tr[k], tr["labels"], va[k], va["labels"], n_cls, args.k, args.temperature)
        res["features"] = k
        return res
    if task == "reconstruction":
        from .reconstruction import evaluate_reconstruction

        return evaluate_reconstruction(model, data.val, args.batch_size, progress)
    if task == "equivariance":
        from .equivariance import evaluate_equivariance, plot_equivariance

        shifts = [int(s) for s in args.shifts] if args.shifts else None
        res = evaluate_equivariance(model, data.val, shifts, 32, args.matcher, progress)
        res["plot"] = str(plot_equivariance({_label(args): res}, out / "equivariance.png"))
        return res
    if task == "robustness":
        from .robustness import DEFAULT_SCALES, evaluate_robustness, plot_robustness

        res = evaluate_robustness(
            model, data.val, args.scales or DEFAULT_SCALES, args.features, 32, args.seed, progress
        )
        res["plot"] = str(plot_robustness({_label(args): res}, out / "robustness.png"))
        return res
    if task == "localization":
        from .localization import evaluate_localization

        if data.name != "shapes":
            raise ConfigError("localization needs object masks: use --data shapes")
        return evaluate_localization(model, data.val, args.batch_size, progress)
    if task == "visualize":
        from .visualize import visualize

        return visualize(model, data, out, args.num_vis, args.threshold, progress=progress)
    raise ValueError(task)


def _label(args) -> str:
    return "random init" if args.random_init else "trained"


def print_table(task: str, res: dict) -> None:
    rows = []
    for key, value in res.items():
        if isinstance(value, float):
            rows.append((key, f"{value:.4g}"))
        elif isinstance(value, (int, str)):
            rows.append((key, str(value)))
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            rows.append(
                (key, " ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in value))
            )
    width = max((len(k) for k, _ in rows), default=4)
    print(f"== {task}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def write_result(out: Path, task: str, res: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    return path


def evaluate(task: str, args, model=None) -> dict:
    """Runs one task (not 'all') and writes DIR/TASK.json; returns the result."""
    out = Path(args.output_dir)
    torch.manual_seed(args.seed)
    start = time.time()
    if task in IMAGE_TASKS and model is None:  # a bad checkpoint stops before DIR is made
        model = load_model(
            args.checkpoint, args.random_init, resolve_device(args.device), args.seed, args.preset
        )
    out.mkdir(parents=True, exist_ok=True)
    if task == "tokens":
        from .tokens import evaluate_tokens

        res = evaluate_tokens(args, out)
    elif task == "ablation":
        from .ablation import run_ablation

        res = run_ablation(args, out)
    else:
        res = run_image_task(task, model, args, out)
        res["checkpoint"] = None if args.checkpoint is None else str(args.checkpoint)
        res["random_init"] = bool(args.random_init)
        res["data"] = str(args.data)
    res["seconds"] = round(time.time() - start, 2)
    write_result(out, task, res)
    print_table(task, res)
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("stellar-eval", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    check_kernels_environment()
    if args.task in IMAGE_TASKS + ("all",) and args.checkpoint is None and not args.random_init:
        raise ConfigError("--checkpoint is needed (or --random-init)")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise FileNotFoundError(2, "no such file or directory (--checkpoint)", args.checkpoint)
    if args.task == "all":
        model = load_model(
            args.checkpoint,
            args.random_init,
            resolve_device(args.device),
            args.seed,
            args.preset,
        )
        for task in IMAGE_TASKS:
            evaluate(task, args, model)
    else:
        evaluate(args.task, args)
    print(f"results in {Path(args.output_dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
