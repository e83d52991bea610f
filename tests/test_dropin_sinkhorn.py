"""sinkhorn_knopp swapped into the Sinkhorn-Knopp that SSL code runs today, against the clients.

Each client is the installed package, called on its own calling convention: lightly's
SwAV, MSN and CAPI forms, DINOv2's DINO and iBOT teachers, solo-learn's SinkhornKnopp.
dinov2 and solo-learn pin torch releases from before 2.0, so the README installs them with
--no-deps; only their Sinkhorn-Knopp modules are imported (solo-learn's by file: its
package __init__ imports every method and its training stack). Inputs are drawn per test
and include rows whose scores sit far below every prototype's best (the rows a term added
to the sums leaves unnormalized), kept where the client's own float32 exp stays finite.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os

import pytest
import torch
from dinov2.loss import DINOLoss, iBOTPatchLoss
from lightly.loss import capi_loss, msn_loss, swav_loss
from ranks import spawn_ranks

import stellar_kernels as sk
from stellar_kernels._triton import HAS_TRITON

BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")),
]
F32 = {"rtol": 0.0, "atol": 1e-5}  # the drop-in promise for float32
F64 = {"rtol": 0.0, "atol": 1e-12}


def solo_sinkhorn_knopp():
    """solo-learn's SinkhornKnopp class, from the installed distribution's file."""
    path = importlib.metadata.distribution("solo-learn").locate_file("solo/utils/sinkhorn_knopp.py")
    spec = importlib.util.spec_from_file_location("solo_sinkhorn_knopp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SinkhornKnopp


def prototype_scores(n: int, k: int, dtype=torch.float32, outliers: float = 1.4) -> torch.Tensor:
    """Cosine-like similarities in [-1, 1] with a few rows pushed `outliers` below the rest:
    divided by a temperature of 0.03-0.05 they sit 25 or more below every column's best."""
    out = torch.rand(n, k, dtype=torch.float64) * 2 - 1
    rows = torch.randperm(n)[: max(1, n // 10)]
    out[rows] = out[rows] * 0.1 - outliers
    return out.to(dtype)


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n,k,iterations,epsilon,dtype",
    [
        (3, 2, 3, 0.03, torch.float32),
        (64, 100, 3, 0.05, torch.float32),
        (37, 19, 1, 0.03, torch.float32),
        (50, 300, 5, 0.05, torch.float64),
        (20, 33, 0, 0.05, torch.float32),
    ],
)
def test_swav_lightly(rng_seed, backend, n, k, iterations, epsilon, dtype):
    out = prototype_scores(n, k, dtype)
    theirs = swav_loss.sinkhorn(out, iterations=iterations, epsilon=epsilon)
    ours = sk.sinkhorn_knopp(out / epsilon, n_iters=iterations, backend=backend)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, **(F64 if dtype == torch.float64 else F32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_swav_the_issue_example(backend):
    out = torch.tensor([[1.0, 0.9], [0.9, 1.0], [-1.0, -0.9]])
    for epsilon in (0.03, 0.05):
        theirs = swav_loss.sinkhorn(out, epsilon=epsilon)
        ours = sk.sinkhorn_knopp(out / epsilon, backend=backend)
        torch.testing.assert_close(ours, theirs, **F32)
        torch.testing.assert_close(ours.sum(dim=1), torch.ones(3), **F32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,iterations", [(40, 25, 3), (9, 70, 1), (64, 16, 4)])
def test_dinov2_dino_teacher(rng_seed, backend, n, k, iterations):
    teacher_output = prototype_scores(n, k) * 2
    temp = 0.07
    theirs = DINOLoss(k).sinkhorn_knopp_teacher(teacher_output, temp, n_iterations=iterations)
    ours = sk.sinkhorn_knopp(teacher_output / temp, n_iters=iterations, backend=backend)
    torch.testing.assert_close(ours, theirs, **F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dinov2_the_issue_example(backend):
    scores = torch.tensor([[30.0, 30.0], [0.0, 2.0]])
    theirs = DINOLoss(2).sinkhorn_knopp_teacher(scores, 1.0, n_iterations=3)
    torch.testing.assert_close(sk.sinkhorn_knopp(scores, n_iters=3, backend=backend), theirs, **F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_solo_learn(rng_seed, backend):
    out = prototype_scores(48, 30)
    theirs = solo_sinkhorn_knopp()(num_iters=3, epsilon=0.05)(out)
    torch.testing.assert_close(sk.sinkhorn_knopp(out / 0.05, 3, backend=backend), theirs, **F32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,iterations", [(32, 20, 3), (17, 45, 1)])
def test_msn_lightly_with_exact_zeros(rng_seed, backend, n, k, iterations):
    probabilities = torch.softmax(torch.randn(n, k) / 0.25, dim=1)
    keep = probabilities >= 1e-3  # sharpened targets hold exact zeros,
    keep[probabilities.argmax(dim=0), torch.arange(k)] = True  # every prototype some mass
    probabilities = probabilities * keep
    theirs = msn_loss.sinkhorn(probabilities, iterations=iterations)
    assert torch.isfinite(theirs).all()  # a case the client itself can solve
    ours = sk.sinkhorn_knopp(probabilities.log(), n_iters=iterations, backend=backend)
    torch.testing.assert_close(ours, theirs, **F32)
    assert torch.equal(ours[probabilities == 0], theirs[probabilities == 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,s,c,iterations", [(16, 5, 30, 3), (40, 3, 17, 2)])
def test_capi_lightly_one_problem_per_position(rng_seed, backend, b, s, c, iterations):
    logits = prototype_scores(b * s, c).view(b, s, c) * 20
    theirs = capi_loss.sinkhorn_knopp(logits, iterations=iterations)
    ours = torch.stack(
        [sk.sinkhorn_knopp(logits[:, p], iterations, eps=1e-8, backend=backend) for p in range(s)],
        dim=1,
    )
    torch.testing.assert_close(ours, theirs, **F32)


# ----------------------------------------------------------------------------- two processes


def _clients_worker(rank, world, port, uneven, even, logits, backend, queue):
    """Every all-reducing client and ours on this rank's rows; numpy results by name."""
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        rows, same, seq = uneven[rank], even[rank], logits[rank]
        k = rows.shape[1]
        res = {
            "ibot": iBOTPatchLoss(k).sinkhorn_knopp_teacher(
                rows, 0.05, torch.tensor(rows.shape[0]), n_iterations=3
            ),
            "ours": sk.sinkhorn_knopp(rows / 0.05, backend=backend),
            "swav": swav_loss.sinkhorn(same, epsilon=0.05, gather_distributed=True),
            "dino": DINOLoss(k).sinkhorn_knopp_teacher(same, 0.05, n_iterations=3),
            "solo": solo_sinkhorn_knopp()(num_iters=3, epsilon=0.05, world_size=2)(same),
            "ours_even": sk.sinkhorn_knopp(same / 0.05, backend=backend),
            "swav_local": swav_loss.sinkhorn(same, epsilon=0.05),
            "ours_local": sk.sinkhorn_knopp(same / 0.05, backend=backend, local=True),
            "capi": capi_loss.sinkhorn_knopp(seq, gather_distributed=True),
            "ours_capi": torch.stack(
                [sk.sinkhorn_knopp(seq[:, p], eps=1e-8, backend=backend) for p in range(3)], 1
            ),
        }
        queue.put((rank, {name: q.numpy() for name, q in res.items()}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_reducing_clients_on_two_ranks(rng_seed, monkeypatch, backend):
    """DINOv2 and iBOT all-reduce whenever torch.distributed is initialized, solo-learn with
    world_size > 1, lightly with gather_distributed=True: sinkhorn_knopp's default. lightly's
    default (gather_distributed=False) is local=True. SwAV's form (lightly, DINOv2's DINO
    teacher, solo-learn) counts the rows as local rows x world size, which holds for the
    equal per-rank batches of their training loops; iBOT counts them, as sinkhorn_knopp
    does, so it agrees on uneven ranks too."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    uneven = [prototype_scores(n, 24) for n in (13, 20)]
    even = [prototype_scores(16, 24) for _ in range(2)]
    logits = [prototype_scores(n * 3, 11).view(n, 3, 11) * 20 for n in (9, 6)]
    results = {
        rank: {name: torch.from_numpy(q) for name, q in res.items()}
        for rank, res in spawn_ranks(_clients_worker, (uneven, even, logits, backend)).items()
    }
    for rank in (0, 1):
        r = results[rank]
        torch.testing.assert_close(r["ours"], r["ibot"], **F32)
        for client in ("swav", "dino", "solo"):
            torch.testing.assert_close(r["ours_even"], r[client], **F32, msg=client)
        torch.testing.assert_close(r["ours_local"], r["swav_local"], **F32)
        torch.testing.assert_close(r["ours_capi"], r["capi"], **F32)
        # The all-reduce matters here: one rank's rows alone give another answer.
        assert (r["ours_even"] - r["ours_local"]).abs().max() > 1e-3
