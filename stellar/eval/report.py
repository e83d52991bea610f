"""report.md: a summary table (trained vs random init) and the figures, embedded by relative path."""

from __future__ import annotations

import os
from pathlib import Path


def _fmt(v, spec=".2f") -> str:
    return "—" if v is None else format(v, spec)


def _get(res: dict | None, *keys):
    for k in keys:
        if res is None:
            return None
        res = res.get(k)
    return res


ROWS = (
    ("linear top-1 (%), mean-pooled sparse tokens", ("linear", "top1"), ".1f"),
    ("k-NN top-1 (%)", ("knn", "top1"), ".1f"),
    ("reconstruction PSNR (dB)", ("reconstruction", "psnr"), ".2f"),
    ("reconstruction SSIM", ("reconstruction", "ssim"), ".3f"),
    ("VQ code accuracy", ("reconstruction", "code_accuracy"), ".3f"),
    ("Exp. 1 mean semantic change ‖ΔS‖/‖S‖", ("equivariance", "mean_semantic_change"), ".3f"),
    ("Exp. 1 mean spatial change ‖ΔA‖/‖A‖", ("equivariance", "mean_spatial_change"), ".3f"),
    ("Exp. 1 spatial / semantic", ("equivariance", "spatial_to_semantic"), ".2f"),
    ("Exp. 2 mean cosine distance", ("robustness", "mean_cosine_distance"), ".4f"),
    ("token-map mIoU (%)", ("localization", "miou"), ".1f"),
    ("sharpness of A: mean over patches of max_k A", ("localization", "a_max_mean"), ".3f"),
    (
        "sharpness of A: patches whose top token passes 0.5 (%)",
        ("localization", "a_max_above_half"),
        ".1f",
    ),
    ("segmentation mIoU (%), BatchNorm + linear on D", ("segmentation", "miou"), ".1f"),
    ("segmentation mIoU (%), on A·S", ("segmentation", "miou_lowrank"), ".1f"),
)


def summary_table(results: dict[str, dict]) -> str:
    """Markdown table of the metrics present, one column per model label."""
    labels = list(results)
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name, keys, spec in ROWS:
        values = [_get(results[label], *keys) for label in labels]
        if all(v is None for v in values):
            continue
        lines.append(f"| {name} | " + " | ".join(_fmt(v, spec) for v in values) + " |")
    return "\n".join(lines)


def write_report(
    path,
    title: str,
    results: dict[str, dict],
    figures: list[tuple[str, str]],
    notes: list[str] | None = None,
) -> Path:
    """Writes `path` (report.md): notes, the summary table, then each (caption, png) figure."""
    path = Path(path)
    parts = [f"# {title}", ""]
    for note in notes or []:
        parts += [note, ""]
    parts += ["## Summary", "", summary_table(results), ""]
    eq = {k: v.get("equivariance") for k, v in results.items() if v.get("equivariance")}
    if eq:
        first = next(iter(eq.values()))
        parts += [
            f"Exp. 1 shifts (pixels of a {first['image_side']}-pixel image, crop side "
            f"{first['crop_side']} resized to {first['model_input']}): "
            + ", ".join(str(s) for s in first["shifts"]),
            "",
        ]
    if figures:
        parts += ["## Figures", ""]
        for caption, fig in figures:
            rel = os.path.relpath(Path(fig).resolve(), path.parent.resolve())
            parts += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    path.write_text("\n".join(parts))
    return path
