"""What every Triton operator shares: the import of triton (optional), the device guard,
the multiprocessor count, the launcher that binds a kernel once per configuration, and the
tuner of launch configurations.

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


# ----------------------------------------------------------------------------- launching

LAUNCH_CACHE = os.environ.get("STELLAR_KERNELS_LAUNCH_CACHE", "1") != "0"
"""Whether `bound_launch` kernels launch through their cached compiled kernel (else always
through Triton's own `kernel[grid](...)`); read at import."""

_NORMAL_PATH = object()
"""The cache entry of a configuration whose compiled kernel offers no launcher to call."""


def _spec(arg: object) -> object:
    """What Triton specializes a kernel on for one argument (a superset is safe: it only
    splits the cache): a tensor's dtype and 16-byte alignment, an integer's width,
    equality to one and divisibility by 16; the value of anything else."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if type(arg) is int:
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31, arg >= 2**63
    if type(arg) is float:
        return float
    return arg


class BoundLaunch:
    """A @triton.jit kernel launched through its compiled kernel, bound once per configuration.

    `kernel[grid](*args, **constexprs)` through Triton binds every argument, computes its
    specialization key and looks the compiled kernel up on each call: host time that exceeds
    the GPU time of a small kernel. Here the first call of a configuration (the constexprs,
    launch options and what Triton specializes each argument on) goes through Triton and
    keeps the compiled kernel that it returns; later calls with that configuration call the
    compiled kernel's launcher as Triton itself does, with the launch hooks that Triton would
    pass (so profilers still see each launch).

    Where the call does not return a compiled kernel with a launcher (the interpreter, a
    Triton release whose internals moved), that configuration keeps the normal path.
    """

    def __init__(self, kernel: Callable) -> None:
        self.fn = kernel  # testing.compile_for_gpu and the interpreter reach the kernel here
        self.bound: dict[tuple, object] = {}
        self.arg_names = tuple(getattr(kernel, "arg_names", ()))
        # The interpreter's kernels (TRITON_INTERPRET=1 when they were defined) run on the CPU.
        self.compiles = HAS_TRITON and isinstance(kernel, triton.runtime.jit.JITFunction)

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return functools.partial(self.launch, grid)

    def launch(self, grid: tuple[int, ...], *args: object, **meta: object) -> None:
        if not (LAUNCH_CACHE and self.compiles):
            self.fn[grid](*args, **meta)
            return
        device = torch.cuda.current_device()
        key = (device, *map(_spec, args), *meta.items())
        bound = self.bound.get(key)
        if bound is None:
            self.bound[key] = self._bind(self.fn[grid](*args, **meta), len(args), meta)
            return
        if bound is _NORMAL_PATH:
            self.fn[grid](*args, **meta)
            return
        run, function, packed, metadata, tail, current_stream, hooks = bound
        full = (*args, *(meta[name] for name in tail))
        stream = current_stream(device)
        run(
            grid[0],
            grid[1] if len(grid) > 1 else 1,
            grid[2] if len(grid) > 2 else 1,
            stream,
            function,
            packed,
            metadata(grid, stream, *full),
            hooks.launch_enter_hook,
            hooks.launch_exit_hook,
            *full,
        )

    def _bind(self, compiled: object, n_args: int, meta: dict) -> object:
        """What `launch` calls for one configuration, from the compiled kernel Triton returned."""
        tail = self.arg_names[n_args:]
        if not self.arg_names or set(tail) - set(meta):
            return _NORMAL_PATH
        try:
            from triton import knobs

            return (
                compiled.run,
                compiled.function,
                compiled.packed_metadata,
                compiled.launch_metadata,
                tail,
                stream_getter(),
                knobs.runtime,
            )
        except (AttributeError, ImportError):
            return _NORMAL_PATH


def stream_getter() -> Callable[[int], int]:
    """Triton's function from a device index to the raw handle of its current stream."""
    from triton.runtime import driver

    return driver.active.get_current_stream


def bound_launch(kernel: Callable) -> BoundLaunch:
    """Decorator (above @triton.jit): launch `kernel` through `BoundLaunch`."""
    return BoundLaunch(kernel)


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
