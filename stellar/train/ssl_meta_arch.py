"""The self-supervised objective of STELLAR around a student model and an optional EMA teacher.

One forward pass on a batch of multi-crop views computes (paper eq. 12-13):

- recon: the decoder's reconstruction of the first global view from its
  low-rank features A S, MSE against the [0, 1] image; with model.recon_target=vq
  (term recon_vq) the decoder's code logits against the codes a frozen MaskGIT-VQGAN
  tokenizer gives the view (cross-entropy), the view resized to 16 pixels per patch first.
- cluster: the sparse tokens of the first global view against balanced
  Sinkhorn-Knopp assignments of the target tokens (matched to them).
- align: the sparse tokens of V masked views (data.masked_views: V global-scale
  crops of the image, the public code's, or V copies of the first global view;
  colour-jittered; data.masking: mixed random / Gaussian-biased masks, or all
  Gaussian-focal) against the target assignments gathered by the matching
  (match_tokens, hungarian_match or none).
- cls: the CLS token of the global view, of the masked views and of the
  local crops against the target CLS assignment (loss.views=per_group: the sum
  of the three groups' means, the public code's; pooled: one mean).
- koleo: KoLeo on the sparse tokens of each image (global and masked views;
  per_group: the sum of the two, pooled: one mean).

Colour jitter, grayscale and blur (`photometric`) change the masked views,
the teacher's view and the local crops, as in the public code; the student's
first global view stays clean, since the decoder reconstructs it. Each image
has its own draw, or with data.photometric_draw=batch each of the three groups
one draw for all its images (the public code's transforms on a stacked tensor).

Targets: with an EMA teacher (random prior) the teacher encodes the second
global view; without one (MAE prior) they are the student's own first global
view, detached. The paper's random-prior recipe uses the teacher for a
warm-up stage only (teacher.ema_steps, at masking ratio teacher.ema_mask_ratio)
and the student's own targets afterwards. A weight of 0 removes a term.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..data.augment import photometric
from ..layers import focal_mask, mixed_mask
from ..loss import (
    cluster_cross_entropy,
    code_cross_entropy,
    gather_targets,
    koleo_loss,
    match_to_targets,
    reconstruction_loss,
    sinkhorn_targets,
)
from ..models import Stellar
from ..models.vq import MaskGITVQGAN

TERMS = ("recon", "cluster", "align", "cls", "koleo")
"""The loss terms; with model.recon_target=vq the first is "recon_vq" instead (`terms`)."""
PHOTOMETRIC_KEYS = (
    "jitter_prob",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grayscale_prob",
    "blur_prob",
    "blur_sigma",
)


def teacher_mode(cfg: dict) -> str:
    mode = cfg["teacher"]["mode"]
    if mode == "auto":
        return "none" if cfg.get("init") else "ema"
    return mode


class Teacher(nn.Module):
    """The EMA copy of the student's encoder (ViT, latent queries, projections) and heads."""

    def __init__(self, student: Stellar) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(student.encoder)
        self.proj_dense = copy.deepcopy(student.proj_dense)
        self.proj_sparse = copy.deepcopy(student.proj_sparse)
        self.sparse_head = copy.deepcopy(student.sparse_head)
        self.cls_head = copy.deepcopy(student.cls_head)
        for p in self.parameters():
            p.requires_grad_(False)

    def student_pairs(self, student: Stellar) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mine, theirs = [], []
        for name in ("encoder", "proj_dense", "proj_sparse", "sparse_head", "cls_head"):
            for (n1, p1), (n2, p2) in zip(
                getattr(self, name).named_parameters(), getattr(student, name).named_parameters()
            ):
                assert n1 == n2
                mine.append(p1)
                theirs.append(p2)
        return mine, theirs

    @torch.no_grad()
    def update(self, student: Stellar, momentum: float) -> None:
        mine, theirs = self.student_pairs(student)
        torch._foreach_mul_(mine, momentum)
        torch._foreach_add_(mine, [p.detach() for p in theirs], alpha=1.0 - momentum)


def momentum_at(cfg: dict, step: int) -> float:
    """EMA momentum after `step` updates: cosine from teacher.momentum to teacher.momentum_end."""
    m0, m1 = cfg["teacher"]["momentum"], cfg["teacher"]["momentum_end"]
    t = min(1.0, step / max(1, cfg["train"]["total_steps"]))
    return m1 - (m1 - m0) * (math.cos(math.pi * t) + 1) / 2


class StellarSSL(nn.Module):
    """Student (a Stellar model), optional EMA teacher, and the loss of one training step."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = Stellar.from_config(cfg["model"], kernels=cfg.get("kernels"))
        self.tokenizer: MaskGITVQGAN | None = None
        if cfg["model"].get("recon_target") == "vq":
            # A submodule here (it moves with .to()), never in the student's saved state.
            self.tokenizer = MaskGITVQGAN.from_file(cfg["model"]["vq_checkpoint"])
            self.student.set_tokenizer(self.tokenizer)
        self.teacher: Teacher | None = None
        if teacher_mode(cfg) == "ema":
            self.teacher = Teacher(self.student)

    def reset_teacher(self) -> None:
        """Copies the student into the teacher (after loading initial weights)."""
        if self.teacher is not None:
            self.teacher.update(self.student, 0.0)

    def compile_models(self) -> list[str]:
        """torch.compile of the networks that dominate a step: the student's and the teacher's
        encoders and the pixel decoder, in place (`nn.Module.compile`, so that parameter names,
        checkpoints and the EMA update are unchanged). The losses, the matching and the
        Sinkhorn-Knopp targets stay eager: our operators launch their own kernels."""
        compiled = {
            "student.encoder": self.student.encoder,
            "student.decoder": self.student.decoder,
        }
        if self.teacher is not None:
            compiled["teacher.encoder"] = self.teacher.encoder
        for module in compiled.values():
            module.compile()
        return list(compiled)

    @property
    def terms(self) -> tuple[str, ...]:
        if self.tokenizer is not None:
            return ("recon_vq", *TERMS[1:])
        return TERMS

    @property
    def weights(self) -> dict[str, float]:
        return {t: float(self.cfg["loss"][t]) for t in self.terms}

    def active_terms(self) -> list[str]:
        return [t for t, w in self.weights.items() if w > 0]

    def _match(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        lc = self.cfg["loss"]
        return match_to_targets(
            pred,
            target,
            lc["matcher"],
            lc["match_eps"],
            lc["match_iters"],
            lc["match_rounding"],
            backend=self.cfg.get("kernels"),
        )

    def _sk(self, logits: torch.Tensor) -> torch.Tensor:
        lc = self.cfg["loss"]
        return sinkhorn_targets(
            logits,
            lc["sk_temperature"],
            lc["sk_iters"],
            lc["sk_eps"],
            backend=self.cfg.get("kernels"),
        )

    def mask(
        self, n: int, grid: tuple[int, int], ratio: float, generator: torch.Generator, device
    ) -> torch.Tensor:
        """Kept-patch indices (n, n_keep) of n masked views, by data.masking."""
        dc = self.cfg["data"]
        if dc.get("masking", "focal") == "mixed":
            lo, hi = dc["mask_sigma_range"]
            return mixed_mask(n, *grid, ratio, dc["focal_prob"], (lo, hi), generator, device)
        return focal_mask(n, *grid, ratio, dc["mask_sigma"], generator, device)

    def ema_phase(self, step: int | None) -> bool:
        """Whether the EMA teacher gives the targets at `step` (teacher.ema_steps: its last step)."""
        if self.teacher is None:
            return False
        last = self.cfg["teacher"].get("ema_steps")
        return last is None or step is None or step <= last

    def forward(
        self, batch: dict, generator: torch.Generator, step: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss terms of a batch: {"loss": weighted sum, term: unweighted value, ...}.

        batch["global"] (B, 2, 3, G, G) and batch["local"] (B, L, 3, l, l),
        uint8 (or float in [0, 1]) on the model's device; `generator` (CPU)
        draws the photometric changes and the masks; `step` (1-based)
        selects the EMA or the self-target phase of teacher.ema_steps.
        """
        cfg, w = self.cfg, self.weights
        teacher = self.teacher if self.ema_phase(step) else None
        mask_ratio = cfg["data"]["mask_ratio"]
        if teacher is not None and cfg["teacher"].get("ema_mask_ratio") is not None:
            mask_ratio = cfg["teacher"]["ema_mask_ratio"]
        lc, dc = cfg["loss"], cfg["data"]
        s = self.student
        views = _as_float(batch["global"])
        x1, x2 = views[:, 0], views[:, 1]
        b = x1.shape[0]
        grid = s.encoder.grid_size(x1.shape[-2], x1.shape[-1])
        out: dict[str, torch.Tensor] = {}

        g1 = s.features(x1)
        if w.get("recon"):
            _, lowrank = s.factorize(g1.dense, g1.sparse)
            out["recon"] = reconstruction_loss(s.decode(lowrank, grid), x1)
        elif w.get("recon_vq"):
            _, lowrank = s.factorize(g1.dense, g1.sparse)
            out["recon_vq"] = code_cross_entropy(s.decode(lowrank, grid), s.vq_targets(x1, grid))

        # Draws in a fixed order, the optional local crops last, so that switching a term
        # off leaves the random changes of the others as they were.
        jitter = {k: dc[k] for k in PHOTOMETRIC_KEYS}
        # Runs from before these keys drew per image and scaled the blur (config.BEFORE_THE_KEY).
        jitter["blur_sigma_scaled"] = dc.get("blur_sigma_scaled", True)
        jitter["draw"] = dc.get("photometric_draw", "image")
        targets_needed = w["cluster"] or w["align"] or w["cls"]
        if teacher is not None and targets_needed:
            x2 = photometric(x2, generator, **jitter)
        n_views = int(dc["num_masked_views"])
        masked = None
        if n_views and (w["align"] or w["cls"] or w["koleo"]):
            if dc.get("masked_views", "copies") == "crops":
                mv = views[:, :n_views].flatten(0, 1)  # row b*V + v: crop v of image b
            else:
                mv = x1.repeat_interleave(n_views, dim=0)
            mv = photometric(mv, generator, **jitter)
            keep = self.mask(b * n_views, grid, mask_ratio, generator, mv.device)
            masked = s.features(mv, keep)

        n_local = batch["local"].shape[1] if "local" in batch else 0
        local = None
        if n_local and w["cls"]:
            crops = _as_float(batch["local"]).flatten(0, 1)
            local = s.features(photometric(crops, generator, **jitter))

        if targets_needed:
            sparse_logits = s.sparse_head(g1.sparse) if (w["cluster"] or not teacher) else None
            cls_logits = s.cls_head(g1.cls) if (w["cls"] or not teacher) else None
            with torch.no_grad():
                if teacher is not None:
                    t = teacher.encoder(s.normalize(x2))
                    target_tokens = t.sparse
                    q_sparse = self._sk(teacher.sparse_head(t.sparse))
                    q_cls = self._sk(teacher.cls_head(t.cls))
                else:
                    target_tokens = g1.sparse.detach()
                    q_sparse = self._sk(sparse_logits)
                    q_cls = self._sk(cls_logits)
            pt = lc["pred_temperature"]
            if w["cluster"]:
                if teacher is not None:
                    tgt = gather_targets(q_sparse, self._match(g1.sparse, target_tokens))
                else:
                    tgt = q_sparse
                out["cluster"] = cluster_cross_entropy(tgt, sparse_logits, pt)
            if w["align"] and masked is not None:
                tgt = gather_targets(q_sparse, self._match(masked.sparse, target_tokens))
                out["align"] = cluster_cross_entropy(tgt, s.sparse_head(masked.sparse), pt)
            if w["cls"]:
                logits, targets = [cls_logits], [q_cls]
                for extra, n in ((masked, n_views), (local, n_local)):
                    if extra is not None:
                        logits.append(s.cls_head(extra.cls))
                        targets.append(q_cls.repeat_interleave(n, dim=0))
                groups = [
                    (cluster_cross_entropy(t.flatten(0, 1), lg.flatten(0, 1), pt), len(t))
                    for t, lg in zip(targets, logits)
                ]
                out["cls"] = combine_view_groups(groups, lc.get("views", "pooled"))

        if w["koleo"]:
            sets = [g1.sparse] + ([masked.sparse] if masked is not None else [])
            groups = [(koleo_loss(x), len(x)) for x in sets]
            out["koleo"] = combine_view_groups(groups, lc.get("views", "pooled"))

        total = sum(w[k] * v for k, v in out.items())
        return {"loss": total, **out}


def combine_view_groups(groups: list[tuple[torch.Tensor, int]], views: str) -> torch.Tensor:
    """One term from the means of its view groups [(mean, rows), ...] (global, masked,
    local): their sum ("per_group", each group weighing 1 as in the public code) or the
    mean over every row ("pooled")."""
    if views == "per_group":
        return sum(mean for mean, _ in groups)
    rows = sum(n for _, n in groups)
    return sum(mean * (n / rows) for mean, n in groups)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
