"""The STELLAR objectives against direct computations, and the ablation switches of Table 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import stellar_kernels as sk
from stellar.loss import (
    cluster_cross_entropy,
    gather_targets,
    koleo_loss,
    match_to_targets,
    reconstruction_loss,
    sinkhorn_targets,
)
from stellar.testing import mini_config
from stellar.train.config import validate
from stellar.train.ssl_meta_arch import TERMS, StellarSSL

# ------------------------------------------------------------------------- single terms


def _koleo_float64(tokens: torch.Tensor) -> float:
    total, count = 0.0, 0
    for group in tokens.double():
        x = group / group.norm(dim=-1, keepdim=True)
        for k in range(len(x)):
            d = min((x[k] - x[j]).norm().item() for j in range(len(x)) if j != k)
            total += -np.log(d)
            count += 1
    return total / count


@pytest.mark.parametrize("shape", [(3, 4, 8), (2, 16, 32), (1, 2, 5)])
def test_koleo_matches_float64(shape, rng_seed):
    tokens = torch.randn(shape)
    assert koleo_loss(tokens).item() == pytest.approx(_koleo_float64(tokens), rel=1e-5)


def test_koleo_grows_as_tokens_collapse_and_has_finite_gradients():
    torch.manual_seed(0)
    spread = torch.randn(2, 8, 16, requires_grad=True)
    collapsed = (torch.randn(2, 1, 16) + 0.01 * torch.randn(2, 8, 16)).requires_grad_()
    assert koleo_loss(collapsed) > koleo_loss(spread) + 2
    loss = koleo_loss(spread)
    loss.backward()
    assert torch.isfinite(spread.grad).all()
    dup = torch.randn(1, 3, 4).repeat(1, 2, 1).requires_grad_()  # exact duplicates
    koleo_loss(dup).backward()
    assert torch.isfinite(dup.grad).all()


def test_cluster_cross_entropy_matches_direct():
    torch.manual_seed(1)
    logits = torch.randn(6, 10)
    q = torch.softmax(torch.randn(6, 10), dim=-1)
    ref = -(q.double() * torch.log_softmax(logits.double() / 0.12, dim=-1)).sum(-1).mean()
    assert cluster_cross_entropy(q, logits, 0.12).item() == pytest.approx(ref.item(), rel=1e-6)


def test_sinkhorn_targets_are_the_kernels_sk_of_scaled_logits():
    torch.manual_seed(2)
    logits = torch.rand(3, 5, 12) * 2 - 1
    q = sinkhorn_targets(logits, 0.06, 3)
    assert q.shape == (3, 5, 12) and not q.requires_grad
    # The public code's sum term (eps 1e-8) by default, as the training loop passes it.
    want = sk.sinkhorn_knopp(logits.view(15, 12) / 0.06, 3, eps=1e-8)
    assert torch.equal(q.view(15, 12), want)
    assert not torch.equal(want, sk.sinkhorn_knopp(logits.view(15, 12) / 0.06, 3))
    torch.testing.assert_close(q.sum(-1), torch.ones(3, 5))


def test_gather_targets_matches_loop():
    torch.manual_seed(3)
    b, t, p, v, k = 3, 5, 7, 2, 4
    q = torch.rand(b, t, p)
    index = torch.randint(0, t, (b * v, k))
    out = gather_targets(q, index)
    for row in range(b * v):
        for j in range(k):
            torch.testing.assert_close(out[row, j], q[row // v, index[row, j]])


def test_matchers():
    torch.manual_seed(4)
    b, v, k, d = 3, 2, 6, 16
    target = torch.randn(b, k, d) * 3
    perm = torch.stack([torch.randperm(k) for _ in range(b * v)])
    pred = target.repeat_interleave(v, 0).gather(1, perm[..., None].expand(-1, -1, d))
    pred = pred + 0.01 * torch.randn_like(pred)
    for matcher in ("sinkhorn", "hungarian"):
        assert torch.equal(match_to_targets(pred, target, matcher), perm), matcher
    assert torch.equal(match_to_targets(pred, target, "none"), torch.arange(k).expand(b * v, k))
    # Hungarian is the exact optimum (scipy) on a random cost.
    pred = torch.randn(b * v, k, d)
    index = match_to_targets(pred, target, "hungarian")
    cost = torch.cdist(pred, target.repeat_interleave(v, 0)).numpy()
    for row in range(b * v):
        r, c = linear_sum_assignment(cost[row])
        assert cost[row][r, c].sum() == pytest.approx(cost[row][np.arange(k), index[row]].sum())
    with pytest.raises(ValueError, match="matcher"):
        match_to_targets(pred, target, "greedy")


def test_reconstruction_loss():
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    assert reconstruction_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item())
    with pytest.raises(ValueError):
        reconstruction_loss(a, b[:, :, :4])


# ------------------------------------------------------------------------- the objective


def _batch(cfg: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, d = cfg["train"]["batch_size"], cfg["data"]
    return {
        "global": torch.randint(0, 256, (b, 2, 3, 32, 32), generator=g, dtype=torch.uint8),
        "local": torch.randint(
            0, 256, (b, d["num_local_crops"], 3, 16, 16), generator=g, dtype=torch.uint8
        ),
    }


def _losses(cfg: dict, seed: int = 0) -> dict:
    torch.manual_seed(0)
    ssl = StellarSSL(cfg)
    out = ssl(_batch(cfg), torch.Generator().manual_seed(seed))
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("teacher", ["ema", "none"])
def test_every_term_is_finite(teacher):
    out = _losses(mini_config(teacher=teacher))
    assert set(out) == {"loss", *TERMS}
    for name, value in out.items():
        assert torch.isfinite(value), name
    w = mini_config()["loss"]
    total = sum(w[t] * out[t] for t in TERMS)
    torch.testing.assert_close(out["loss"], total)


@pytest.mark.parametrize("term", TERMS)
def test_ablation_switch_removes_exactly_its_term(term):
    full = _losses(mini_config())
    off = _losses(mini_config(f"loss.{term}=false"))
    assert term not in off
    assert set(off) == set(full) - {term}
    for other in set(off) - {"loss"}:
        torch.testing.assert_close(off[other], full[other], rtol=1e-5, atol=1e-6)
    weight = mini_config()["loss"][term]
    torch.testing.assert_close(
        off["loss"], full["loss"] - weight * full[term], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("matcher", ["hungarian", "none"])
def test_other_matchers_give_finite_losses(matcher):
    out = _losses(mini_config(f"loss.matcher={matcher}"))
    assert all(torch.isfinite(v) for v in out.values())


def test_hungarian_match_rounding_reaches_match_tokens(monkeypatch):
    cfg = mini_config("loss.match_rounding=hungarian")
    validate(cfg)  # the schema takes the value
    calls = []
    original = sk.match_tokens

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((kwargs.get("rounding"), result.index))
        return result

    monkeypatch.setattr(sk, "match_tokens", spy)
    out = _losses(cfg)
    assert all(torch.isfinite(v) for v in out.values())
    assert calls and all(rounding == "hungarian" for rounding, _ in calls)
    for _, index in calls:
        assert all(len(set(row.tolist())) == index.shape[1] for row in index)


def test_every_student_parameter_gets_a_gradient():
    """DDP runs without find_unused_parameters when every term is on."""
    cfg = mini_config()
    torch.manual_seed(0)
    ssl = StellarSSL(cfg)
    ssl(_batch(cfg), torch.Generator().manual_seed(0))["loss"].backward()
    missing = [n for n, p in ssl.student.named_parameters() if p.grad is None]
    assert not missing
    assert all(p.grad is None for p in ssl.teacher.parameters())


def test_teacher_ema_update():
    cfg = mini_config()
    ssl = StellarSSL(cfg)
    with torch.no_grad():
        for p in ssl.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ssl.teacher.encoder.parameters()]
    ssl.teacher.update(ssl.student, 0.9)
    for b, t, s in zip(before, ssl.teacher.encoder.parameters(), ssl.student.encoder.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_ema_stage_then_the_students_own_targets(monkeypatch):
    import stellar.train.ssl_meta_arch as arch

    ratios = []
    real_mask = arch.StellarSSL.mask

    def recording_mask(self, n, grid, ratio, *args):
        ratios.append(ratio)
        return real_mask(self, n, grid, ratio, *args)

    monkeypatch.setattr(arch.StellarSSL, "mask", recording_mask)
    cfg = mini_config("teacher.ema_steps=1", "teacher.ema_mask_ratio=0.5")
    torch.manual_seed(0)
    ssl = StellarSSL(cfg)
    torch.manual_seed(0)
    own = StellarSSL(mini_config(teacher="none"))
    batch = _batch(cfg)
    ref = own(batch, torch.Generator().manual_seed(0))
    after = ssl(batch, torch.Generator().manual_seed(0), step=2)
    for key in ref:
        torch.testing.assert_close(after[key], ref[key])
    during = ssl(batch, torch.Generator().manual_seed(0), step=1)
    assert not torch.allclose(during["cluster"], ref["cluster"])
    assert ssl.ema_phase(1) and not ssl.ema_phase(2) and not own.ema_phase(1)
    assert ratios == [0.8, 0.8, 0.5]  # own, after the EMA stage, during it


@pytest.mark.parametrize("masked_views", ["crops", "copies"])
def test_colour_changes_reach_the_masked_views_the_teachers_view_and_the_local_crops(
    monkeypatch, masked_views
):
    import stellar.train.ssl_meta_arch as arch

    seen = []  # (input, output) of each photometric call
    real = arch.photometric

    def recording(x, generator, **kwargs):
        y = real(x, generator, **kwargs)
        seen.append((x.clone(), y.clone()))
        return y

    monkeypatch.setattr(arch, "photometric", recording)
    cfg = mini_config(
        "data.jitter_prob=1.0", "data.brightness=0.5", f"data.masked_views={masked_views}"
    )
    torch.manual_seed(0)
    ssl = StellarSSL(cfg)
    teacher_inputs = []
    ssl.teacher.encoder.register_forward_pre_hook(lambda m, a: teacher_inputs.append(a[0]))
    batch = _batch(cfg)
    ssl(batch, torch.Generator().manual_seed(0))
    views, local = batch["global"].float() / 255, batch["local"].float() / 255
    v = cfg["data"]["num_masked_views"]
    inputs = [x for x, _ in seen]
    assert len(seen) == 3
    torch.testing.assert_close(inputs[0], views[:, 1])
    if masked_views == "crops":  # view v of image b is crop v, row b*V + v
        torch.testing.assert_close(inputs[1], views[:, :v].flatten(0, 1))
    else:
        torch.testing.assert_close(inputs[1], views[:, 0].repeat_interleave(v, dim=0))
    torch.testing.assert_close(inputs[2], local.flatten(0, 1))
    # The teacher encodes the changed second view, not the clean one.
    torch.testing.assert_close(teacher_inputs[0], ssl.student.normalize(seen[0][1]))
    assert not torch.allclose(seen[0][1], views[:, 1])


def test_view_groups_sum_their_means_or_pool_every_row():
    from stellar.train.ssl_meta_arch import combine_view_groups

    rows = [torch.rand(n) for n in (3, 12, 5)]
    groups = [(r.mean(), len(r)) for r in rows]
    torch.testing.assert_close(
        combine_view_groups(groups, "per_group"), sum(r.mean() for r in rows)
    )
    torch.testing.assert_close(combine_view_groups(groups, "pooled"), torch.cat(rows).mean())


@pytest.mark.parametrize("views", ["per_group", "pooled"])
def test_cls_and_koleo_terms_follow_the_view_weighting(monkeypatch, views):
    """The CLS term from its three groups (global, masked, local) and KoLeo from its two
    (global, masked), recomputed from the head outputs the forward pass produced."""
    import stellar.train.ssl_meta_arch as arch

    cfg = mini_config(f"loss.views={views}", teacher="none")
    calls = {"ce": [], "koleo": []}
    real_ce, real_koleo = arch.cluster_cross_entropy, arch.koleo_loss

    def ce(targets, logits, t):
        value = real_ce(targets, logits, t)
        calls["ce"].append((value, len(targets)))
        return value

    def koleo(tokens):
        value = real_koleo(tokens)
        calls["koleo"].append((value, len(tokens)))
        return value

    monkeypatch.setattr(arch, "cluster_cross_entropy", ce)
    monkeypatch.setattr(arch, "koleo_loss", koleo)
    out = _losses(cfg)
    b, v, n_local = 4, cfg["data"]["num_masked_views"], cfg["data"]["num_local_crops"]
    cls_groups = calls["ce"][-3:]  # global, masked, local: the last three CE calls
    assert [n for _, n in cls_groups] == [b, b * v, b * n_local]
    koleo_groups = calls["koleo"]
    assert [n for _, n in koleo_groups] == [b, b * v]
    if views == "per_group":
        want_cls = sum(x for x, _ in cls_groups)
        want_koleo = sum(x for x, _ in koleo_groups)
    else:
        want_cls = sum(x * n for x, n in cls_groups) / sum(n for _, n in cls_groups)
        want_koleo = sum(x * n for x, n in koleo_groups) / sum(n for _, n in koleo_groups)
    torch.testing.assert_close(out["cls"], want_cls.detach())
    torch.testing.assert_close(out["koleo"], want_koleo.detach())
