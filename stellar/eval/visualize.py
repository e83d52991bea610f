"""Pictures of the factorized representation (paper Fig. 3).

Writes into the output folder:
  token_maps.png       images, their token partition (argmax over K of A) and
                       each token's spatial map A[:, k], thresholded (pixels
                       under the threshold dimmed; by default at twice the
                       uniform share 1/K, so that each token's region shows
                       however soft A still is)
  reconstructions.png  originals beside the decoder's reconstructions
  retrieval.png        for tokens of a query image, the gallery images holding
                       the most cosine-similar token, with that token's map
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .features import batches

RELATIVE_THRESHOLD = 2.0
"""The default threshold of the token maps, in units of the uniform share 1/K: a patch is
shown for token k when A_k > 2/K, whatever the sharpness of A (a soft A, early in training,
leaves almost no patch above an absolute 0.5)."""


def token_threshold(threshold: float | None, num_tokens: int) -> float:
    """The threshold on A_k: `threshold` itself, or RELATIVE_THRESHOLD / K when None."""
    return RELATIVE_THRESHOLD / num_tokens if threshold is None else threshold


def threshold_label(threshold: float | None, num_tokens: int) -> str:
    value = token_threshold(threshold, num_tokens)
    if threshold is None:
        return f"A_k > {RELATIVE_THRESHOLD:g}/K = {value:.3g}, twice the uniform share"
    return f"A_k > {value:g}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def token_maps(model, images: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) spatial maps A upsampled (bilinear) to the image size."""
    out = model.encode(images)
    b, n, k = out["spatial"].shape
    h, w = model.encoder.grid_size(images.shape[-2], images.shape[-1])
    maps = out["spatial"].float().permute(0, 2, 1).reshape(b, k, h, w)
    return F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)


def token_region(amap: np.ndarray, threshold: float) -> np.ndarray:
    """Where a token's map passes the threshold: the pixels its panel shows undimmed."""
    return amap > threshold


def _overlay(img: np.ndarray, amap: np.ndarray, threshold: float) -> np.ndarray:
    """The image on the token's region, dimmed to 25% elsewhere, with a red tint by amap."""
    keep = token_region(amap, threshold)[..., None]
    out = np.where(keep, img, img * 0.25)
    tint = np.zeros_like(img)
    tint[..., 0] = 1.0
    return np.clip(out * 0.8 + 0.2 * tint * amap[..., None], 0, 1)


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def _first_images(dataset, n: int) -> torch.Tensor:
    imgs = []
    for batch in batches(dataset, max(1, n), progress=False):
        imgs.append(batch["image"])
        if sum(len(i) for i in imgs) >= n:
            break
    return torch.cat(imgs)[:n]


@torch.no_grad()
def plot_token_maps(model, images, path, threshold: float | None = None) -> Path:
    """Each token's map over the images, shown where A_k passes `threshold` (default: twice
    the uniform share, see RELATIVE_THRESHOLD)."""
    plt = _plt()
    maps = token_maps(model, images).cpu().numpy()
    b, k = maps.shape[:2]
    label = threshold_label(threshold, k)
    threshold = token_threshold(threshold, k)
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(b, k + 2, figsize=(1.4 * (k + 2), 1.4 * b), squeeze=False)
    for i in range(b):
        img = _hwc(images[i])
        axes[i, 0].imshow(img)
        part = maps[i].argmax(0)
        axes[i, 1].imshow(np.clip(cmap(part % 20)[..., :3] * 0.6 + img * 0.4, 0, 1))
        for j in range(k):
            axes[i, j + 2].imshow(_overlay(img, maps[i, j], threshold))
            if i == 0:
                axes[i, j + 2].set_title(f"token {j}", fontsize=7)
    axes[0, 0].set_title("image", fontsize=7)
    axes[0, 1].set_title("argmax A", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"token spatial maps A, shown where {label}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def plot_reconstructions(model, images, path) -> Path:
    plt = _plt()
    rec = model.reconstruct(images)
    b = len(images)
    fig, axes = plt.subplots(2, b, figsize=(1.4 * b, 3.0), squeeze=False)
    for i in range(b):
        axes[0, i].imshow(_hwc(images[i]))
        axes[1, i].imshow(_hwc(rec[i]))
    axes[0, 0].set_title("original", fontsize=7, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=7, loc="left")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def plot_retrieval(
    model,
    query: torch.Tensor,
    gallery_dataset,
    path,
    top: int = 5,
    max_gallery: int = 512,
    threshold: float | None = None,
    progress: bool = True,
) -> Path:
    """Query: one image (3, H, W); each of its tokens retrieves the `top` gallery images."""
    plt = _plt()
    device = next(model.parameters()).device
    q = model.encode(query[None].to(device))
    q_tokens = F.normalize(q["sparse"][0].float(), dim=-1)  # (K, D)
    q_maps = token_maps(model, query[None].to(device))[0].cpu().numpy()
    sims, owners, images = [], [], []
    n = 0
    for batch in batches(gallery_dataset, 64, "retrieval", progress):
        imgs = batch["image"][: max_gallery - n].to(device)
        g = F.normalize(model.encode(imgs)["sparse"].float(), dim=-1)  # (B, K, D)
        s = torch.einsum("kd,bjd->bkj", q_tokens, g)  # (B, Kq, Kg)
        best, which = s.max(-1)  # (B, Kq)
        sims.append(best.cpu())
        owners.append(which.cpu())
        images.append(imgs.cpu())
        n += len(imgs)
        if n >= max_gallery:
            break
    sims_t, owners_t, images_t = torch.cat(sims), torch.cat(owners), torch.cat(images)
    k = q_tokens.shape[0]
    threshold = token_threshold(threshold, k)
    top = min(top, len(images_t))
    fig, axes = plt.subplots(k, top + 1, figsize=(1.4 * (top + 1), 1.4 * k), squeeze=False)
    qimg = _hwc(query)
    for j in range(k):
        axes[j, 0].imshow(_overlay(qimg, q_maps[j], threshold))
        axes[j, 0].set_ylabel(f"token {j}", fontsize=7)
        order = sims_t[:, j].argsort(descending=True)[:top]
        sel = images_t[order].to(device)
        maps = token_maps(model, sel).cpu().numpy()
        for c, (idx, img) in enumerate(zip(order.tolist(), sel)):
            tok = int(owners_t[idx, j])
            axes[j, c + 1].imshow(_overlay(_hwc(img), maps[c, tok], threshold))
            axes[j, c + 1].set_title(f"{sims_t[idx, j]:.2f}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("query token", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def visualize(
    model,
    data,
    output_dir,
    num_images: int = 6,
    threshold: float | None = None,
    top: int = 5,
    max_gallery: int = 512,
    progress: bool = True,
) -> dict:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    images = _first_images(data.val, num_images).to(device)
    files = [
        plot_token_maps(model, images, out / "token_maps.png", threshold),
        plot_reconstructions(model, images, out / "reconstructions.png"),
        plot_retrieval(
            model,
            images[0],
            data.train,
            out / "retrieval.png",
            top,
            max_gallery,
            threshold,
            progress,
        ),
    ]
    k = model.encode(images[:1])["spatial"].shape[-1]
    return {
        "files": [str(f) for f in files],
        "threshold": token_threshold(threshold, k),
        "threshold_rule": threshold_label(threshold, k),
        "num_images": len(images),
    }


def line_plot(path, x, series: dict, xlabel: str, ylabel: str, title: str, styles=None) -> Path:
    """One figure of several curves: series maps a label to y values (same length as x)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for i, (label, y) in enumerate(series.items()):
        style = (styles or {}).get(label, "-o")
        ax.plot(x, y, style, label=label, markersize=4, color=f"C{i}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
