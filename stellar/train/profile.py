"""Timing of one STELLAR training step and of its components (paper appendix B.5).

    from stellar.train.profile import component_times, train_step_ms
    component_times("base", batch=64, device="cuda")
    # {"encoder": ms, "decoder": ms, "masked_encoding": ms, "sk_clustering": ms,
    #  "sinkhorn_matching": ms, "hungarian_matching": ms}

Components are forward passes on synthetic inputs of the preset's shapes (as
the paper's table times them): the student encoding B global views, the
factorization plus decoder, the encoding of the B*V masked views,
Sinkhorn-Knopp on the (B*K, P) sparse-token logits, and the matching of the
masked views' tokens by Sinkhorn (match_tokens) and by the exact Hungarian
solver. train_step_ms times a whole step (forward, backward, optimizer, EMA).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

import stellar_kernels as sk
from stellar_kernels.testing import median_ms

from .config import apply_overrides, load_preset
from .ssl_meta_arch import StellarSSL, momentum_at


def resolve_config(
    preset: str | dict,
    batch: int | None = None,
    kernels: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    cfg = copy.deepcopy(preset) if isinstance(preset, dict) else load_preset(preset)
    cfg = apply_overrides(cfg, overrides or [])
    if batch is not None:
        cfg["train"]["batch_size"] = batch
    cfg["kernels"] = kernels
    if cfg["teacher"]["mode"] == "auto":
        cfg["teacher"]["mode"] = "ema"
    return cfg


def synthetic_batch(cfg: dict, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, d = cfg["train"]["batch_size"], cfg["data"]
    gs, ls, nl = d["global_size"], d["local_size"], d["num_local_crops"]
    return {
        "global": torch.randint(0, 256, (b, 2, 3, gs, gs), generator=g, dtype=torch.uint8).to(
            device
        ),
        "local": torch.randint(0, 256, (b, nl, 3, ls, ls), generator=g, dtype=torch.uint8).to(
            device
        ),
    }


def _autocast(cfg: dict, device: torch.device):
    enabled = device.type == "cuda" and cfg["train"].get("amp") == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def component_times(
    preset: str | dict = "base",
    batch: int = 64,
    device: str | torch.device = "cuda",
    kernels: str | None = None,
    overrides: list[str] | None = None,
    rep: int = 10,
) -> dict[str, float]:
    """Forward milliseconds of each component of a step at `batch` images per device."""
    device = torch.device(device)
    cfg = resolve_config(preset, batch, kernels, overrides)
    cfg["teacher"]["mode"] = "none"  # the student alone is timed: no EMA copy in memory
    torch.manual_seed(0)
    ssl = StellarSSL(cfg).to(device).eval()
    s = ssl.student
    d, lc = cfg["data"], cfg["loss"]
    v = d["num_masked_views"]
    x = torch.rand(batch, 3, d["global_size"], d["global_size"], device=device)
    grid = s.encoder.grid_size(x.shape[-2], x.shape[-1])
    keep = ssl.mask(batch * v, grid, d["mask_ratio"], torch.Generator().manual_seed(0), device)
    xv = x.repeat_interleave(v, dim=0)
    times: dict[str, float] = {}
    with torch.no_grad(), _autocast(cfg, device):
        g1 = s.features(x)
        times["encoder"] = median_ms(lambda: s.features(x), device, rep=rep)
        times["decoder"] = median_ms(
            lambda: s.decode(s.factorize(g1.dense, g1.sparse)[1], grid), device, rep=rep
        )
        times["masked_encoding"] = median_ms(lambda: s.features(xv, keep), device, rep=rep)
        masked = s.features(xv, keep)
        logits = s.sparse_head(g1.sparse).flatten(0, 1).float()
    scores = logits / lc["sk_temperature"]
    times["sk_clustering"] = median_ms(
        lambda: sk.sinkhorn_knopp(
            scores, n_iters=lc["sk_iters"], eps=lc["sk_eps"], backend=kernels
        ),
        device,
        rep=rep,
    )
    pred, target = masked.sparse.float(), g1.sparse.float()
    times["sinkhorn_matching"] = median_ms(
        lambda: sk.match_tokens(
            pred, target, lc["match_eps"], lc["match_iters"], lc["match_rounding"], backend=kernels
        ),
        device,
        rep=rep,
    )
    times["hungarian_matching"] = median_ms(
        lambda: sk.hungarian_match(torch.cdist(pred, target.repeat_interleave(v, dim=0))),
        device,
        rep=max(3, rep // 2),
    )
    return times


def make_train_step(
    preset: str | dict = "base",
    batch: int = 64,
    device: str | torch.device = "cuda",
    kernels: str | None = None,
    overrides: list[str] | None = None,
) -> Callable[[], float]:
    """A closure running one full training step (forward, backward, clip, AdamW, EMA) on a
    fixed synthetic batch; it returns the loss."""
    device = torch.device(device)
    cfg = resolve_config(preset, batch, kernels, overrides)
    torch.manual_seed(0)
    ssl = StellarSSL(cfg).to(device).train()
    if cfg["train"].get("compile"):
        ssl.compile_models()
    opt = torch.optim.AdamW(ssl.student.parameters(), lr=1e-5, weight_decay=0.04)
    data = synthetic_batch(cfg, device)
    step = [0]

    def one_step() -> float:
        step[0] += 1
        g = torch.Generator().manual_seed(step[0])
        with _autocast(cfg, device):
            loss = ssl(data, g, step[0])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ssl.student.parameters(), cfg["train"]["clip_grad"])
        opt.step()
        if ssl.teacher is not None:
            ssl.teacher.update(ssl.student, momentum_at(cfg, step[0]))
        return loss.detach()

    return one_step


def train_step_ms(
    preset: str | dict = "base",
    batch: int = 64,
    device: str | torch.device = "cuda",
    kernels: str | None = None,
    overrides: list[str] | None = None,
    rep: int = 5,
) -> float:
    """Median milliseconds of one full training step (forward, backward, AdamW, EMA)."""
    device = torch.device(device)
    one_step = make_train_step(preset, batch, device, kernels, overrides)
    return median_ms(one_step, device, warmup=2, rep=rep)
