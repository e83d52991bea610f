"""stellar-export: a trained run's backbone for other code.

    stellar-export --checkpoint RUN --format timm --output-dir DIR

`--format timm` writes the encoder's ViT in timm's Hub layout, `DIR/config.json` and
`DIR/model.safetensors`, so that

    timm.create_model("local-dir:DIR", pretrained=True)

builds it with the run's weights (a strict load), for fine-tuning (paper Appendix B.4)
or any timm pipeline. It expects images normalized with the ImageNet mean and std, as
timm's data config in config.json says (STELLAR normalizes inside its model).

A timm ViT has no place for the rest of STELLAR: the K latent queries (the sparse tokens'
inputs), the projections W_d and W_s, the pixel decoder and the two clustering heads.
They go beside it, in `DIR/stellar_extras.safetensors` (the run's configuration in its
metadata), so that nothing of the run is lost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .cli import HelpFormatter, run_command
from .errors import ConfigError

FORMATS = ("timm",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata)


def export_timm(model, output_dir: str | Path) -> dict[str, Path]:
    """Writes the timm Hub layout of `model`'s encoder ViT (and the rest beside it)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    vit = model.encoder.vit
    size = int(config["img_size"])
    model_args = {
        "img_size": size,
        "patch_size": int(model.encoder.patch_size),
        "num_classes": 0,
        **dict(config.get("vit_kwargs") or {}),
    }
    hub_config = {
        "architecture": config["arch"],
        "num_classes": 0,
        "num_features": int(vit.num_features),
        "global_pool": vit.global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "apache-2.0",
        },
    }
    paths = {
        "config": out / "config.json",
        "weights": out / "model.safetensors",
        "extras": out / "stellar_extras.safetensors",
    }
    paths["config"].write_text(json.dumps(hub_config, indent=2) + "\n")
    _save_tensors(paths["weights"], vit.state_dict(), {"format": "pt"})
    extras = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.vit.")}
    _save_tensors(paths["extras"], extras, {"format": "pt", "config": json.dumps(config)})
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stellar-export",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="a run directory, checkpoint.pt or model.safetensors"
    )
    p.add_argument("--format", choices=FORMATS, default="timm", help="the layout written")
    p.add_argument("--output-dir", required=True, help="where the exported files go")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def export() -> int:
        from . import load

        if not Path(args.checkpoint).exists():
            raise FileNotFoundError(2, "no such file or directory (--checkpoint)", args.checkpoint)
        if args.format != "timm":
            raise ConfigError(f"--format {args.format!r} is not one of {FORMATS}")
        paths = export_timm(load(args.checkpoint), args.output_dir)
        out = Path(args.output_dir).resolve()
        print(f"timm backbone: timm.create_model('local-dir:{out}', pretrained=True)")
        print(f"  {paths['config'].name}, {paths['weights'].name}")
        print(
            f"  beside it, {paths['extras'].name}: latent queries, W_d/W_s, decoder, "
            "clustering heads (not part of a timm ViT)"
        )
        return 0

    return run_command("stellar-export", export)


if __name__ == "__main__":
    sys.exit(main())
