"""What every Triton operator shares: the import of triton (optional), the device guard,
the multiprocessor count, and the tuner of launch configurations.

Without triton the package still imports: `triton.jit` then returns the function
unchanged, so the kernel definitions stay importable, and only backend="torch" works.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from collections.abc import Callable, Hashable

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the PyTorch references still work

    def _jit(fn=None, **options):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_jit)
    tl = types.SimpleNamespace(constexpr=None)
    HAS_TRITON = False


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes `device` current for the launches inside.

    Triton launches on the current CUDA device and that device's current stream, so a
    tensor on another device needs its device made current first (the stream that is
    current there then is the one the kernels run on).
    """
    if device.type == "cuda" and device.index is not None:
        if device.index != torch.cuda.current_device():
            return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; on the CPU (the interpreter runs programs
    one after another) a small number, so that launch grids stay few and long."""
    if device.type != "cuda":
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


# ----------------------------------------------------------------------------- tuning

TUNED: dict[tuple, object] = {}
"""The fastest candidate measured in this process, by `tune_key`."""


def tune_key(
    op: str, device: torch.device, dtype: torch.dtype, batch: int, *shape: int
) -> tuple[Hashable, ...]:
    """Everything that changes the best launch configuration: the operator, the device
    (cards differ), the dtype, the problem shape, and the batch size rounded up to a power
    of two (how many programs fill the card)."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return (op, device.type, index, dtype, triton.next_power_of_2(max(batch, 1)), *shape)


def autotune(
    key: tuple, candidates: list, launch: Callable[[object], None], device: torch.device
) -> object:
    """The candidate to launch with: cached, else timed once on CUDA (one host sync), else the first.

    No timing happens on the CPU (the interpreter), during CUDA-graph capture or with
    STELLAR_KERNELS_AUTOTUNE=0; the first candidate is used then and nothing is cached.
    """
    found = TUNED.get(key)
    if found is not None:
        return found
    if (
        len(candidates) == 1
        or device.type != "cuda"
        or os.environ.get("STELLAR_KERNELS_AUTOTUNE", "1") == "0"
        or torch.cuda.is_current_stream_capturing()
    ):
        return candidates[0]
    times = [gpu_ms(lambda cfg=cfg: launch(cfg)) for cfg in candidates]
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    TUNED[key] = best
    return best


def gpu_ms(fn: Callable[[], None], reps: int = 20) -> float:
    """GPU time of one fn() call: `reps` calls replayed from a CUDA graph, so that the Python
    launch overhead (the same for every configuration) does not hide the kernel's own time.

    The graph is captured in thread-local mode on a side stream: CUDA work that other
    threads do meanwhile is neither refused nor recorded.
    """
    fn()  # compiles
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            for _ in range(reps):
                fn()
        graph.replay()
        start.record()
        graph.replay()
        end.record()
    except RuntimeError:  # no graph capture here: time plain launches
        start.record()
        for _ in range(reps):
            fn()
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps
