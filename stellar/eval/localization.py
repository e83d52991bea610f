"""Token localization against object masks (the embedded scenes carry them).

Each patch is assigned to its most likely token (argmax over K of the
localization matrix A), the assignment map is upsampled to pixels (nearest),
and every object is scored by its best-matching token region:

    IoU(object m) = max_k |mask_m & region_k| / |mask_m | region_k|

mIoU is the mean over all objects of all images (empty masks are skipped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .features import batches


def token_regions(spatial: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]):
    """(B, H, W) int64 token index per pixel from A (B, N, K)."""
    b = spatial.shape[0]
    assign = spatial.argmax(-1).view(b, 1, *grid).float()
    return F.interpolate(assign, size=size, mode="nearest")[:, 0].long()


def best_iou(regions: torch.Tensor, masks: torch.Tensor, num_tokens: int) -> list[float]:
    """Best IoU over tokens of each non-empty mask; regions (B, H, W), masks (B, M, H, W) bool."""
    onehot = F.one_hot(regions, num_tokens).permute(0, 3, 1, 2).bool()  # (B, K, H, W)
    m = masks.bool()
    inter = (m[:, :, None] & onehot[:, None]).flatten(3).sum(-1).float()  # (B, M, K)
    union = (m[:, :, None] | onehot[:, None]).flatten(3).sum(-1).float()
    iou = (inter / union.clamp_min(1)).amax(-1)  # (B, M)
    valid = m.flatten(2).any(-1)
    return iou[valid].tolist()


@torch.no_grad()
def evaluate_localization(model, dataset, batch_size: int = 64, progress: bool = True) -> dict:
    device = next(model.parameters()).device
    ious: list[float] = []
    dominant: list[float] = []
    top_sum, confident, patches = 0.0, 0, 0
    for batch in batches(dataset, batch_size, "localization", progress):
        if "masks" not in batch:
            raise ConfigError("localization needs object masks: use --data shapes")
        images = batch["image"].to(device)
        out = model.encode(images)
        top = out["spatial"].float().amax(dim=-1)  # each patch's largest A over the tokens
        top_sum += top.sum().item()
        confident += int((top > 0.5).sum())
        patches += top.numel()
        grid = model.encoder.grid_size(images.shape[-2], images.shape[-1])
        regions = token_regions(out["spatial"].float().cpu(), grid, tuple(images.shape[-2:]))
        masks = batch["masks"]
        if masks.shape[-2:] != images.shape[-2:]:
            masks = F.interpolate(masks.float(), size=images.shape[-2:], mode="nearest") > 0.5
        ious += best_iou(regions, masks, out["spatial"].shape[-1])
        dominant += best_iou(regions, masks[:, :1], out["spatial"].shape[-1])
    return {
        "miou": 100.0 * sum(ious) / max(1, len(ious)),
        "miou_dominant": 100.0 * sum(dominant) / max(1, len(dominant)),
        # How sharp A is: the mean over patches of max_k A, and the share of patches whose
        # top token takes more than half (what the thresholded token maps can show).
        "a_max_mean": top_sum / max(1, patches),
        "a_max_above_half": 100.0 * confident / max(1, patches),
        "num_objects": len(ious),
        "num_images": len(dominant),
    }
