"""Experiment 1 (paper sec. 5.1, Fig. 2a): equivariant partitioning under shifts.

A crop of side (image side - largest shift) is taken at the top-left corner
and again shifted by s pixels horizontally, then vertically. Both crops are
resized to the model's input size and encoded; the shifted crop's sparse
tokens are matched to the unshifted ones by optimal transport (Sinkhorn on
the Euclidean cost, eq. 8, rounded to a permutation) and the localization
matrix's columns follow the same permutation. Reported per shift (averaged
over images and the two directions):

    semantic_change = ||S - S'|| / ||S||     spatial_change = ||A - A'|| / ||A||

(Frobenius norms per image). An equivariantly partitioned representation
keeps S nearly fixed while A moves with the content.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import stellar_kernels as sk

from ..errors import ConfigError
from .features import batches

PAPER_SHIFTS = (5, 10, 15, 20, 25, 30)  # pixels, at 224 x 224


def scaled_shifts(image_side: int, shifts=PAPER_SHIFTS) -> list[int]:
    """The paper's shifts, scaled by side / 224 for images under 128 px (at least 1 px, distinct)."""
    if image_side >= 128:
        return [int(s) for s in shifts]
    out: list[int] = []
    for s in shifts:
        v = max(1, round(s * image_side / 224))
        if out and v <= out[-1]:
            v = out[-1] + 1
        out.append(v)
    return out


def match_permutation(s_ref: torch.Tensor, s_new: torch.Tensor, matcher: str = "sinkhorn"):
    """(B, K) index: token j of s_ref is matched with token perm[:, j] of s_new (one-to-one)."""
    cost = torch.cdist(s_ref.float(), s_new.float())
    if matcher == "hungarian":
        return sk.hungarian_match(cost)
    return sk.sinkhorn_match(cost, eps=0.1, n_iters=5, rounding="permutation").index


def _encode_crop(model, images, top, left, side, size):
    crop = images[:, :, top : top + side, left : left + side]
    if side != size:
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
    return model.encode(crop.clamp(0, 1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-12)


@torch.no_grad()
def shift_changes(model, images: torch.Tensor, shifts, matcher: str = "sinkhorn") -> dict:
    """Per shift and direction, the per-image relative changes (lists of B floats)."""
    size = int(model.config["img_size"])
    side = images.shape[-1] - max(shifts)
    ref = _encode_crop(model, images, 0, 0, side, size)
    out = {"horizontal": {}, "vertical": {}}
    for s in shifts:
        for direction, (top, left) in (("horizontal", (0, s)), ("vertical", (s, 0))):
            new = _encode_crop(model, images, top, left, side, size)
            perm = match_permutation(ref["sparse"], new["sparse"], matcher)
            s_new = torch.gather(
                new["sparse"], 1, perm[..., None].expand(-1, -1, new["sparse"].shape[-1])
            )
            a_new = torch.gather(
                new["spatial"], 2, perm[:, None, :].expand(-1, new["spatial"].shape[1], -1)
            )
            out[direction][s] = (
                _rel(ref["sparse"].float(), s_new.float()).tolist(),
                _rel(ref["spatial"].float(), a_new.float()).tolist(),
            )
    return out


def evaluate_equivariance(
    model,
    dataset,
    shifts=None,
    batch_size: int = 32,
    matcher: str = "sinkhorn",
    progress: bool = True,
) -> dict:
    """{"shifts", "semantic_change", "spatial_change", per direction, crop side, image side}."""
    first = dataset[0] if dataset[0] is not None else next(iter(batches(dataset, 1)))
    side = int(first["image"].shape[-1])
    if shifts is None:
        shifts = scaled_shifts(side)
    shifts = [int(s) for s in shifts]
    if max(shifts) >= side:
        raise ConfigError(
            f"--shifts: the largest shift {max(shifts)} must be below the image side {side}"
        )
    acc = {d: {s: ([], []) for s in shifts} for d in ("horizontal", "vertical")}
    for batch in batches(dataset, batch_size, "equivariance", progress):
        images = batch["image"].to(next(model.parameters()).device)
        res = shift_changes(model, images, shifts, matcher)
        for d in acc:
            for s in shifts:
                acc[d][s][0].extend(res[d][s][0])
                acc[d][s][1].extend(res[d][s][1])

    def mean(v):
        return float(sum(v) / len(v))

    per_dir = {
        d: {
            "semantic_change": [mean(acc[d][s][0]) for s in shifts],
            "spatial_change": [mean(acc[d][s][1]) for s in shifts],
        }
        for d in acc
    }
    sem = [mean(acc["horizontal"][s][0] + acc["vertical"][s][0]) for s in shifts]
    spa = [mean(acc["horizontal"][s][1] + acc["vertical"][s][1]) for s in shifts]
    return {
        "shifts": shifts,
        "semantic_change": sem,
        "spatial_change": spa,
        "mean_semantic_change": mean(sem),
        "mean_spatial_change": mean(spa),
        "spatial_to_semantic": mean(spa) / max(mean(sem), 1e-12),
        "per_direction": per_dir,
        "image_side": side,
        "crop_side": side - max(shifts),
        "model_input": int(model.config["img_size"]),
        "matcher": matcher,
        "num_images": len(acc["horizontal"][shifts[0]][0]),
    }


def plot_equivariance(results: dict, path) -> str:
    """Fig. 2(a): relative change of S (dashed) and A (solid) against the shift, per model."""
    from .visualize import line_plot

    series, styles = {}, {}
    for label, res in results.items():
        series[f"A, {label}"] = res["spatial_change"]
        series[f"S, {label}"] = res["semantic_change"]
        styles[f"A, {label}"] = "-o"
        styles[f"S, {label}"] = "--s"
    x = next(iter(results.values()))["shifts"]
    line_plot(
        path,
        x,
        series,
        "shift (pixels)",
        "relative change",
        "Exp. 1: equivariant partitioning",
        styles,
    )
    return str(path)
