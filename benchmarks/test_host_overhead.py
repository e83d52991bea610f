"""Host overhead of one eager call into each Triton operator, at the paper's sizes.

For each call: `eager_ms` (one call between two CUDA events, as a training loop that waits
for the result sees it), `graph_ms` (the same call replayed from a CUDA graph: the GPU
alone) and `overhead_ms` = eager - graph. Beside them the same with the launch cache off
(`STELLAR_KERNELS_LAUNCH_CACHE=0`: every launch through Triton's own binder), and the host
time of one call (`host_us`: calls issued back to back without waiting, the host's time
per call) split into the public entry point and the launcher alone (`launcher_host_us`:
the internal function the entry point calls after its checks). For the two matchings also
the launcher with its outputs from two allocations (`launcher_host_us_two_allocations`,
`stellar_kernels.sinkhorn_match.ONE_OUTPUT_ALLOCATION` off) and the allocation alone, both
ways (`outputs_host_us`).

`autotune_first_call/<operator>/<size>`: what the first call of a new tuning key costs the
caller, tuning included (timing every launch candidate, `stellar_kernels._triton.autotune`),
compile excluded: `overhead_ms` = first call - a later call, both wall-clock to the GPU's end.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from functools import partial

import pytest
import torch

import stellar_kernels as sk
from benchmarks import test_factorize, test_match_tokens, test_sinkhorn_knopp, test_sinkhorn_match
from benchmarks.common import graph_ms, median_ms, reported

TARGET_MS = 0.025
launching = importlib.import_module("stellar_kernels._triton")


def host_us(fn: Callable[[], object], calls: int = 50) -> float:
    """Host time of one call: `calls` calls issued without waiting, then one wait outside."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def cases(device: torch.device, quick: bool) -> list[tuple[str, Callable, Callable | None]]:
    """(figure name, public call, launcher-only call) at the paper's sizes."""
    sm = importlib.import_module("stellar_kernels.sinkhorn_match")
    mt = importlib.import_module("stellar_kernels.match_tokens")
    batch = 16 if quick else 512
    cost = test_sinkhorn_match._cost(batch, 16, device)
    eps, iters = test_sinkhorn_match.EPS, test_sinkhorn_match.N_ITERS
    images = 8 if quick else test_match_tokens.IMAGES
    pred, target = test_match_tokens._tokens(
        images, test_match_tokens.VIEWS, test_match_tokens.K, test_match_tokens.D, device
    )
    rows = 256 if quick else 2048
    scores = test_sinkhorn_knopp._scores(rows, 16384, torch.float32, device)
    case = (8 if quick else 128, 196, 16, 768)
    inputs = test_factorize.make_inputs(case, torch.bfloat16, device, requires_grad=False)
    temperature = test_factorize.TEMPERATURE
    sk_iters = test_sinkhorn_knopp.N_ITERS
    mt_eps, mt_iters = test_match_tokens.EPS, test_match_tokens.N_ITERS
    return [
        (
            f"sinkhorn_match/B{batch}_K16",
            partial(sk.sinkhorn_match, cost, eps, iters, validate=False),
            partial(sm.sinkhorn_match_triton, cost, eps, iters, "permutation"),
        ),
        (
            f"match_tokens/B{images * test_match_tokens.VIEWS}_K16_D768",
            partial(sk.match_tokens, pred, target, mt_eps, mt_iters, validate=False),
            partial(mt.match_tokens_triton, pred, target, mt_eps, mt_iters, "permutation"),
        ),
        (
            f"sinkhorn_knopp/N{rows}_P16384_fp32",
            partial(sk.sinkhorn_knopp, scores, n_iters=sk_iters, validate=False),
            None,
        ),
        (
            f"factorize_fwd/{test_factorize.case_name(case, torch.bfloat16)}",
            partial(sk.factorize, *inputs, temperature=temperature, validate=False),
            None,
        ),
    ]


def outputs_host_us(shape: tuple[int, int, int], device: torch.device) -> dict:
    """Host time of a matching's output allocation, from one buffer and from two."""
    sm = importlib.import_module("stellar_kernels.sinkhorn_match")
    return {
        f"{way}_allocation{'s' if way == 'two' else ''}": round(
            host_us(partial(sm.match_outputs, *shape, device, way == "one")), 2
        )
        for way in ("one", "two")
    }


def measure(
    name: str,
    call: Callable,
    internal: Callable | None,
    device: torch.device,
    outputs: tuple[int, int, int] | None = None,
) -> dict:
    sm = importlib.import_module("stellar_kernels.sinkhorn_match")
    values: dict = {"bound_launch": launching.bound_launch_reason() or "on"}
    for cache in (True, False):
        launching.LAUNCH_CACHE = cache
        suffix = "" if cache else "_normal_launch"
        with torch.no_grad():
            eager = median_ms(call, device, warmup=5, rep=30)
            graph = graph_ms(call)
            values[f"eager_ms{suffix}"] = round(eager, 6)
            values[f"graph_ms{suffix}"] = round(graph, 6)
            values[f"overhead_ms{suffix}"] = round(eager - graph, 6)
            values[f"host_us{suffix}"] = round(host_us(call), 2)
            if internal is not None:
                values[f"launcher_host_us{suffix}"] = round(host_us(internal), 2)
    launching.LAUNCH_CACHE = True
    if outputs is not None:  # the launcher with two output allocations, in the same process
        sm.ONE_OUTPUT_ALLOCATION = False
        try:
            values["launcher_host_us_two_allocations"] = round(host_us(internal), 2)
        finally:
            sm.ONE_OUTPUT_ALLOCATION = True
        values["outputs_host_us"] = outputs_host_us(outputs, device)
    values["target_overhead_ms"] = TARGET_MS
    values["meets_target"] = values["overhead_ms"] <= TARGET_MS
    return reported(f"host_overhead/{name}", values["eager_ms"], **values)


def figures(device: torch.device, quick: bool = False) -> list[dict]:
    """host_overhead/<operator>/<size> for the four Triton operators at the paper's sizes."""
    if device.type != "cuda" or not launching.HAS_TRITON:
        return [
            reported(
                f"host_overhead/{name}",
                not_measured="no CUDA device: host overhead is launch cost on a GPU",
            )
            for name, _, _ in cases(device, quick=True)
        ]
    previous = launching.LAUNCH_CACHE
    try:
        out = []
        for name, call, internal in cases(device, quick):
            outputs = None
            if internal is not None:  # a matching: (problems, Q, T) of its outputs
                index, plan = internal()
                outputs = tuple(plan.shape)
                del index, plan
            out.append(measure(name, call, internal, device, outputs))
        return out
    finally:
        launching.LAUNCH_CACHE = previous


def wall_ms(call: Callable[[], object]) -> float:
    """Milliseconds from the call's start to the end of its GPU work (host waits included)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def first_call(name: str, call: Callable[[], object], repeats: int = 5, **extra) -> dict:
    """autotune_first_call/<name>: the first call of `call`'s tuning keys against a later call.

    A call with the tuning cache emptied compiles every candidate (Triton's compile, not
    timed: the first call of a process pays it once per binary, not per key); then, `repeats`
    times, its keys are forgotten and the call timed (it times every candidate again, with
    binaries and bound launches warm), then a later call; medians of both. Other keys in the
    cache are put back afterwards."""
    saved = dict(launching.TUNED)
    launching.TUNED.clear()
    try:
        with torch.no_grad():
            wall_ms(call)  # compiles and binds every candidate, tunes
            keys = list(launching.TUNED)
            chosen = [launching.TUNED[k] for k in keys]
            firsts, laters = [], []
            for _ in range(repeats):
                for key in keys:
                    del launching.TUNED[key]
                firsts.append(wall_ms(call))
                laters.append(wall_ms(call))
    finally:
        launching.TUNED.clear()
        launching.TUNED.update(saved)
    first, later = statistics.median(firsts), statistics.median(laters)
    return reported(
        f"autotune_first_call/{name}",
        first,
        later_ms=round(later, 6),
        overhead_ms=round(first - later, 6),
        tuned_keys=[list(map(str, k)) for k in keys],
        chosen=[list(c) if isinstance(c, tuple) else c for c in chosen],
        includes="timing every launch candidate at the key's first call (each run twice, "
        "then 20 times behind a stream hold; one host wait for the last event) and the call",
        excludes="Triton's compile of the candidates (done by an earlier call)",
        timing=f"wall clock from the call's start to its GPU work's end, median of {repeats}",
        **extra,
    )


def autotune_figures(device: torch.device, quick: bool = False) -> list[dict]:
    """autotune_first_call/sinkhorn_knopp/N2048_P16384_fp32 (the figure sinkhorn_knopp/...
    times, eps=1e-8) and autotune_first_call/match_tokens/B512_K16_D768 (N256 and 8 images
    under --quick, named by the size)."""
    rows = 256 if quick else 2048
    images = 8 if quick else test_match_tokens.IMAGES
    names = [
        f"sinkhorn_knopp/N{rows}_P16384_fp32",
        f"match_tokens/B{images * test_match_tokens.VIEWS}_K16_D768",
    ]
    if device.type != "cuda" or not launching.HAS_TRITON:
        why = "no CUDA device: only a GPU times launch candidates (elsewhere the first runs)"
        return [reported(f"autotune_first_call/{name}", not_measured=why) for name in names]
    scores = test_sinkhorn_knopp._scores(rows, 16384, torch.float32, device)
    pred, target = test_match_tokens._tokens(
        images, test_match_tokens.VIEWS, test_match_tokens.K, test_match_tokens.D, device
    )
    mt = importlib.import_module("stellar_kernels.match_tokens")
    sk_call = partial(test_sinkhorn_knopp.ours, scores)
    mt_call = partial(test_match_tokens.ours, pred, target)
    candidates = mt.match_tokens_candidates(16, test_match_tokens.VIEWS)
    return [
        first_call(
            names[0], sk_call, n_iters=test_sinkhorn_knopp.N_ITERS, eps=test_sinkhorn_knopp.EPS
        ),
        first_call(names[1], mt_call, candidates=[list(c) for c in candidates]),
    ]


@pytest.mark.gpu
@pytest.mark.benchmark(group="host_overhead_sinkhorn_match_B512_K16")
@pytest.mark.parametrize("cache", [True, False], ids=["bound_launch", "triton_launch"])
def test_host_overhead_sinkhorn_match_B512_K16(run, device, cache, monkeypatch):
    monkeypatch.setattr(launching, "LAUNCH_CACHE", cache)
    cost = test_sinkhorn_match._cost(512, 16, device)
    run(sk.sinkhorn_match, cost, validate=False)
