"""What every Triton operator shares: the import of triton (optional), the device guard,
the multiprocessor count, the launcher that binds a kernel once per configuration, and the
tuner of launch configurations.

Without triton the package still imports: `triton.jit` then returns the function
unchanged, so the kernel definitions stay importable, and only backend="torch" works.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import time
import types
from collections.abc import Callable, Hashable, Sequence

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


try:  # the launch entry and switches that BoundLaunch uses (Triton >= 3.4 has them all)
    from triton import knobs as _knobs
    from triton.compiler import CompiledKernel as _CompiledKernel
    from triton.runtime import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:
    _knobs = _CompiledKernel = _driver = _JITFunction = None


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
"""Whether `bound_launch` kernels may launch through their cached compiled kernel (else
always through Triton's own `kernel[grid](...)`); read at import."""

TESTED_TRITON = ((3, 6), (3, 10))
"""Triton releases from the first up to (excluding) the second, as pyproject states them:
the ones whose launch entry `BoundLaunch` was tested against `JITFunction.run`. Under any
other release every launch takes Triton's own path (the same results, more host time)."""

_NORMAL_PATH = object()
"""The cache entry of a configuration that launches through Triton's own path."""


def _release(version: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


@functools.cache
def _triton_reason() -> str | None:
    """Why the installed Triton offers no launch entry that `BoundLaunch` relies on; None
    where it does. Cached: the tests clear it after changing what it reads."""
    if not HAS_TRITON:
        return "triton is not installed"
    low, high = TESTED_TRITON
    if not low <= _release(triton.__version__) < high:
        tested = f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"
        return f"triton {triton.__version__} is outside the tested range {tested}"
    if _knobs is None or not callable(getattr(_CompiledKernel, "__getitem__", None)):
        return f"triton {triton.__version__} has no launch entry on its compiled kernels"
    return None


def bound_launch_reason(kernel: BoundLaunch | None = None) -> str | None:
    """Why launches take Triton's own path on every call; None where, after the first call
    of a configuration, they launch through its compiled kernel (of `kernel`, or of every
    kernel compiled here). The benchmarks' host-overhead figures and the tests read it."""
    if not LAUNCH_CACHE:
        return "STELLAR_KERNELS_LAUNCH_CACHE=0"
    if (why := _triton_reason()) is not None:
        return why
    if kernel is not None and kernel.is_jit:
        if kernel.fn.pre_run_hooks:
            return "the kernel has pre-run hooks, which only Triton's path runs"
    elif _knobs.runtime.interpret:
        return "the Triton interpreter runs the kernels (TRITON_INTERPRET=1)"
    elif kernel is not None:
        return f"{type(kernel.fn).__name__} is no JITFunction"
    if _knobs.runtime.add_stages_inspection_hook is not None:
        return "knobs.runtime.add_stages_inspection_hook is set"
    return None


def _spec(arg: object) -> object:
    """What Triton specializes a kernel on for one runtime argument (a superset is safe: it
    only splits the cache): a tensor's dtype and 16-byte alignment, an integer's width,
    equality to one and divisibility by 16; the value of anything else."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if type(arg) is int:
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31, arg >= 2**63
    if type(arg) is float:
        return float
    return arg


def _call(function: Callable[[object], object], arg: object) -> object:
    return function(arg)


def _value(arg: object) -> object:
    """A constexpr or launch option: its value, and its type (True == 1 and 1 == 1.0 in a
    dict, but each compiles to another kernel)."""
    return type(arg), arg


class BoundLaunch:
    """A @triton.jit kernel launched through its compiled kernel, bound once per configuration.

    `kernel[grid](*args, **constexprs)` through Triton binds every argument, computes its
    specialization key and looks the compiled kernel up on each call: host time that exceeds
    the GPU time of a small kernel. Here the first call of a configuration goes through
    Triton's `JITFunction.run` and keeps the compiled kernel that it returns; later calls
    with that configuration launch it through Triton's own entry on a compiled kernel,
    `compiled[grid](*every parameter in signature order)`, as `JITFunction.run` does (with
    the current stream and Triton's launch hooks, so profilers still see each launch).

    A configuration is what selects the binary: the device, Triton's debug and
    instrumentation switches (and, from 3.9, fpsan_homomorphic_casts), every constexpr's
    value (passed by position or by keyword), every launch option, and what Triton
    specializes each runtime argument on (`_spec`).
    Triton's own path runs every call where `bound_launch_reason` names a reason (Triton
    outside TESTED_TRITON, the interpreter, STELLAR_KERNELS_LAUNCH_CACHE=0), while the
    kernel has pre-run hooks or a stage-inspection hook is set (they run only there), for a
    callable grid, and where a global value that the kernel read has changed (Triton then
    raises).
    """

    def __init__(self, kernel: Callable) -> None:
        self.fn = kernel  # testing.compile_for_gpu and the interpreter reach the kernel here
        self.bound: dict[tuple, object] = {}
        # The interpreter's kernels (TRITON_INTERPRET=1 when they were defined) run on the CPU.
        self.is_jit = _JITFunction is not None and isinstance(kernel, _JITFunction)
        self.arg_names: tuple[str, ...] = ()
        self.keyers: tuple[Callable[[object], object], ...] = ()
        self.runtime_names: frozenset[str] = frozenset()
        self.defaults: dict[str, object] = {}
        self.key_functions: dict[int, Callable[[tuple, dict], tuple]] = {}
        if self.is_jit:
            constexprs = {p.name for p in kernel.params if p.is_constexpr}
            params = inspect.signature(kernel.fn).parameters
            self.arg_names = tuple(params)
            self.keyers = tuple(_value if n in constexprs else _spec for n in params)
            self.runtime_names = frozenset(params) - constexprs
            self.defaults = {
                n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty
            }

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return functools.partial(self.launch, grid)

    def launch(self, grid: tuple[int, ...], *args: object, **meta: object) -> None:
        fn = self.fn
        if (
            not (LAUNCH_CACHE and self.is_jit)
            or _triton_reason() is not None
            or fn.pre_run_hooks
            or _knobs.runtime.add_stages_inspection_hook is not None
            or callable(grid)
        ):
            fn[grid](*args, **meta)
            return
        try:
            key = (
                _driver.active.get_current_device(),
                fn.debug,
                _knobs.runtime.debug,
                _knobs.compilation.instrumentation_mode,
                # Triton 3.9's JITFunction.run passes this switch to the compiler too.
                getattr(_knobs.compilation, "fpsan_homomorphic_casts", None),
                *self.key(args, meta),
            )
            entry = self.bound.get(key)
        except TypeError:  # an unhashable argument: Triton's path takes it as it may
            fn[grid](*args, **meta)
            return
        if entry is None:
            self.bound[key] = self._bind(fn[grid](*args, **meta), len(args))
            return
        if entry is _NORMAL_PATH:
            fn[grid](*args, **meta)
            return
        for (name, _), (value, scope) in fn.used_global_vals.items():
            if scope.get(name, _NORMAL_PATH) != value:
                fn[grid](*args, **meta)  # raises Triton's error about the changed global
                return
        compiled, names, defaults = entry
        if len(grid) != 3:
            grid = (grid[0], grid[1] if len(grid) > 1 else 1, 1)
        compiled[grid](*args, *map(meta.get, names, defaults))

    def key(self, args: tuple, meta: dict) -> tuple:
        """What selects the binary among the arguments and launch options of a call."""
        if not self.runtime_names.isdisjoint(meta):  # a runtime argument by keyword (rare)
            named = [
                (n, _spec(v) if n in self.runtime_names else _value(v)) for n, v in meta.items()
            ]
            return len(args), *map(_call, self.keyers, args), "by keyword", *named
        make = self.key_functions.get(len(args))
        if make is None:
            make = self.key_functions[len(args)] = self._key_function(len(args))
        return make(args, meta)

    def _key_function(self, n_args: int) -> Callable[[tuple, dict], tuple]:
        """`key` for calls with `n_args` arguments by position and constexprs and launch
        options by keyword, as one generated expression: a function call per argument
        (`_spec`) would cost more host time than the rest of a bound launch together."""
        names = [f"a{i}" for i in range(n_args)]
        parts = [f"{n_args}"]
        for a, keyer in zip(names, self.keyers):
            if keyer is _value:
                parts.append(f"({a}.__class__, {a})")
            else:  # _spec, with the two common cases first
                parts.append(
                    f"(({a}.dtype, {a}.data_ptr() % 16 == 0) if {a}.__class__ is Tensor "
                    f"else ({a} == 1, {a} % 16 == 0, -{2**31} <= {a} < {2**31}, {a} >= {2**63})"
                    f" if {a}.__class__ is int else spec({a}))"
                )
        unpack = f"    {', '.join(names)}, = args\n" if names else ""
        source = (
            "def key(args, meta):\n"
            f"{unpack}"
            f"    return ({', '.join(parts)}, *meta.items(), *map(type, meta.values()))\n"
        )
        scope = {"Tensor": torch.Tensor, "spec": _spec}
        exec(source, scope)  # the source holds parameter positions and constants only
        return scope["key"]

    def _bind(self, compiled: object, n_args: int) -> object:
        """The cache entry of a configuration, from what `JITFunction.run` returned for it."""
        if not isinstance(compiled, _CompiledKernel):  # a jit_cache_hook skipped the launch
            return _NORMAL_PATH
        # The entry takes every parameter in signature order, constexprs included, as the
        # compiled kernel's signature lists them; a compiled kernel whose signature lists
        # something else comes from a Triton whose launchers take another layout.
        if tuple(getattr(compiled.src, "signature", ())) != self.arg_names:
            return _NORMAL_PATH
        names = self.arg_names[n_args:]
        return compiled, names, tuple(self.defaults.get(n) for n in names)


def bound_launch(kernel: Callable) -> BoundLaunch:
    """Decorator (above @triton.jit): launch `kernel` through `BoundLaunch`."""
    return BoundLaunch(kernel)


# ----------------------------------------------------------------------------- tuning

TUNED: dict[tuple, object] = {}
"""The candidate chosen in this process, by `tune_key` (by ("rank0", *key) where the ranks
agree on rank 0's choice)."""

AUTOTUNE = "STELLAR_KERNELS_AUTOTUNE"
AUTOTUNE_MODES = ("1", "0", "rank0")
"""Values of STELLAR_KERNELS_AUTOTUNE: "1" (the default) times in a single process and
launches the first candidate under torch.distributed with more than one rank; "0" never
times; "rank0" times on rank 0 and every rank launches its choice."""

HOLD_HZ = 3e9
"""A clock rate no GPU exceeds: `torch.cuda._sleep(seconds * HOLD_HZ)` holds a stream for
at least `seconds`."""


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


def autotune_mode() -> str:
    """STELLAR_KERNELS_AUTOTUNE, checked (see AUTOTUNE_MODES)."""
    mode = os.environ.get(AUTOTUNE, "1") or "1"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE}={mode!r}: valid values are {AUTOTUNE_MODES}")
    return mode


def world_size() -> int:
    """Ranks of torch.distributed's default group; 1 where it is not initialized."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def autotune(
    key: tuple, candidates: Sequence, launch: Callable[[object], None], device: torch.device
) -> object:
    """The candidate to launch with for `key` (see `tune_key`).

    The configuration sets the reduction order, so the bits of a result depend on it.
    In a single process: the fastest candidate, timed at the key's first call
    (`time_candidates`: CUDA events on the caller's stream; the host waits for the tuner's
    own last event only) and cached. Under torch.distributed with more than one rank: the
    first candidate on every rank, untimed, so the same everywhere with no collective that
    a rank could miss (uneven batches, a call on some ranks only); with
    STELLAR_KERNELS_AUTOTUNE=rank0, rank 0 times and every rank launches its choice
    (`broadcast_choice` at the first call of each key: every rank must then make the same
    calls, in the same order, with the same tuning keys). The first candidate, untimed and
    uncached, also on the CPU (the interpreter), during CUDA-graph capture, and with
    STELLAR_KERNELS_AUTOTUNE=0 (two runs then give the same bits too).
    """
    ranks = world_size()
    if ranks > 1:
        if autotune_mode() != "rank0":
            return candidates[0]
        key = ("rank0", *key)  # never a choice this rank made alone
    found = TUNED.get(key)  # before the environment: a cached key costs a lookup only
    if found is not None:
        return found
    mode = autotune_mode()
    if (
        len(candidates) == 1
        or mode == "0"
        or device.type != "cuda"
        or torch.cuda.is_current_stream_capturing()
    ):
        return candidates[0]
    best = 0
    if ranks == 1 or torch.distributed.get_rank() == 0:
        times = time_candidates(launch, candidates)
        best = min(range(len(candidates)), key=times.__getitem__)
    if ranks > 1:
        best = broadcast_choice(best, device)
    TUNED[key] = candidates[best]
    return candidates[best]


def broadcast_choice(index: int, device: torch.device) -> int:
    """Rank 0's `index` on every rank, over the default group: a CPU tensor where that group
    has a CPU backend (gloo), else one on `device` (NCCL takes the rank's own GPU)."""
    dist = torch.distributed
    backend = str(dist.get_backend())
    where = torch.device("cpu") if "gloo" in backend or "mpi" in backend else device
    choice = torch.tensor([index], dtype=torch.int64, device=where)
    dist.broadcast(choice, src=0)
    return int(choice.item())


def time_candidates(
    launch: Callable[[object], None], candidates: Sequence, reps: int = 20
) -> list[float]:
    """GPU milliseconds of one `launch(candidate)` for each candidate, on the current stream.

    Each candidate runs twice first: the first call compiles and binds it, the second gives
    the host time of a call. Before each candidate's `reps` timed calls the stream is held
    (`torch.cuda._sleep`) for twice the host time they take, so that the GPU runs them back
    to back: the events then time the kernels, not the host's launches. Everything runs on
    the caller's stream, in its order, and the host waits for the last event only: no
    device-wide synchronize, no graph capture, nothing released from the caching allocator.
    """
    host = 0.0
    for cfg in candidates:
        launch(cfg)
        start = time.perf_counter()
        launch(cfg)
        host = max(host, time.perf_counter() - start)
    hold = getattr(torch.cuda, "_sleep", None)
    cycles = int(min(2 * reps * host, 0.05) * HOLD_HZ)
    events = []
    for cfg in candidates:
        if hold is not None and cycles > 0:
            hold(cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            launch(cfg)
        end.record()
        events.append((start, end))
    events[-1][1].synchronize()
    return [start.elapsed_time(end) / reps for start, end in events]
