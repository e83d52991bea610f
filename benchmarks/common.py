"""Timing and result-figure helpers shared by the benchmark modules.

Every speed figure is a ratio of two medians measured in the same process: ours
against a baseline, or ours against the memory floor at the copy bandwidth
measured in the same run (docs/benchmarks.md).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from stellar_kernels._triton import HAS_TRITON

# The benchmark modules time with these two (they live with the package, which times too).
from stellar_kernels.testing import median_ms, sync  # noqa: F401


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 26)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, rep=10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def vs_baseline(name: str, ours_ms: float, baseline: str, baseline_ms: float, **extra) -> dict:
    return {
        "name": name,
        "ours_ms": round(ours_ms, 6),
        "baseline": baseline,
        "baseline_ms": round(baseline_ms, 6),
        "speedup": round(baseline_ms / ours_ms, 3),
        **extra,
    }


def interleaved_ms(
    fns: list[Callable[[], object]], device: torch.device, rounds: int = 5, rep: int = 5
) -> list[float]:
    """Eager medians of several functions timed in alternating rounds: each function's
    median over its rounds' medians, so that a drift of the machine during the run (a shared
    GPU host, clocks) moves every function alike instead of deciding a ratio."""
    per_fn: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        median_ms(fn, device, warmup=2, rep=1)
    for _ in range(rounds):
        for times, fn in zip(per_fn, fns):
            times.append(median_ms(fn, device, warmup=0, rep=rep))
    return [statistics.median(times) for times in per_fn]


def maybe_graph_ms(fn: Callable[[], object], device: torch.device) -> float | None:
    """graph_ms on a CUDA device, None on the CPU or where fn cannot be captured (a host
    loop such as scipy's, a synchronizing call)."""
    if device.type != "cuda":
        return None
    try:
        return graph_ms(fn)
    except RuntimeError:
        torch.cuda.synchronize()
        return None


def compare(
    name: str,
    ours: Callable[[], object],
    baseline_name: str,
    baseline: Callable[[], object],
    device: torch.device,
    rounds: int = 5,
    rep: int = 5,
    **extra,
) -> dict:
    """One figure, ours against a baseline: eager medians from interleaved rounds, and on a
    GPU the CUDA-graph times of both beside them (`cuda_graph_ms`, `baseline_cuda_graph_ms`,
    `cuda_graph_speedup`), which leave the host out."""
    ours_ms, base_ms = interleaved_ms([ours, baseline], device, rounds=rounds, rep=rep)
    graph = {}
    ours_graph = maybe_graph_ms(ours, device)
    base_graph = maybe_graph_ms(baseline, device) if ours_graph is not None else None
    if ours_graph is not None:
        graph["cuda_graph_ms"] = round(ours_graph, 6)
    if base_graph is not None:
        graph["baseline_cuda_graph_ms"] = round(base_graph, 6)
        graph["cuda_graph_speedup"] = round(base_graph / ours_graph, 3)
    return vs_baseline(
        name, ours_ms, baseline_name, base_ms, timing="interleaved", **graph, **extra
    )


def vs_floor(name: str, ours_ms: float, floor_bytes: int, bandwidth_gbs: float, **extra) -> dict:
    floor_ms = floor_bytes / (bandwidth_gbs * 1e9) * 1e3
    return {
        "name": name,
        "ours_ms": round(ours_ms, 6),
        "floor_ms": round(floor_ms, 6),
        "bandwidth_fraction": round(floor_ms / ours_ms, 4),
        **extra,
    }


def reported(name: str, ours_ms: float | None = None, **values) -> dict:
    """A figure that is reported, not compared (a quality fraction, a scaling curve)."""
    out: dict = {"name": name}
    if ours_ms is not None:
        out["ours_ms"] = round(ours_ms, 6)
    out.update(values)
    return out


def default_backend(device: torch.device) -> str:
    """What sinkhorn_match, match_tokens and sinkhorn_knopp run with backend=None on `device`."""
    return "triton" if device.type == "cuda" and HAS_TRITON else "torch"


def paper_sinkhorn_match(cost: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """The baseline matching: the paper's algorithm as eager PyTorch code writes it.

    n_iters log-domain updates of the duals (two logsumexp each), the plan, then its
    row-wise argmax. Nothing is masked or checked, so the baseline does no more work than
    the algorithm needs (the library's reference also handles forbidden pairs).
    """
    c = cost.float()
    u = c.new_zeros(c.shape[:-1])
    v = c.new_zeros(c.shape[:-2] + c.shape[-1:])
    for _ in range(n_iters):
        u = -eps * torch.logsumexp((v.unsqueeze(-2) - c) / eps, dim=-1)
        v = -eps * torch.logsumexp((u.unsqueeze(-1) - c) / eps, dim=-2)
    plan = torch.exp((u.unsqueeze(-1) + v.unsqueeze(-2) - c) / eps)
    return plan.argmax(dim=-1)


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def graph_ms(fn: Callable[[], object], reps: int = 20, repeats: int = 5) -> float:
    """GPU time of one fn() without the host: median over `repeats` replays of a CUDA graph
    holding `reps` calls (the caller warms fn up first, so nothing compiles during capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)
