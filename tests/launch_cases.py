"""Every Triton kernel of the package as real calls launch it, and the checks that compare
BoundLaunch's direct launch with Triton's `JITFunction.run` on them.

(The modules are imported by name: the package exports functions of the same names.)

`real_calls(device)` drives each kernel through the public operators with the arguments
that training passes (contiguous strides of 1, sizes divisible by 16, 16-byte aligned
pointers) and some that it may (odd sizes, an unaligned view, half precision). On a GPU
test_launch.py runs them with the launch cache on and off and compares the results bitwise.

Without a GPU, `check_launches_match_triton` and `check_configurations_match_triton` run in
a fresh process without TRITON_INTERPRET (`stellar_kernels.testing.run_in_fresh_processes`):
the kernels are real JITFunctions, compiled for sm_90 by Triton's own `JITFunction.run`,
and only the driver underneath is `RecordingDriver`, which loads nothing and records what
Triton's launcher would receive. Each launch of the package then goes both ways, and the
two records must be the same: the same compiled kernel, grid, stream, hooks and arguments.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

# ----------------------------------------------------------------------------- the calls


def _uniform(shape: tuple[int, ...], device: torch.device, offset: int = 0) -> torch.Tensor:
    """Uniform [0, 1) values; `offset` > 0 gives a view whose pointer is not 16-byte aligned."""
    n = 1
    for size in shape:
        n *= size
    flat = torch.rand(n + offset, generator=torch.Generator().manual_seed(n)).to(device)
    return flat[offset:].view(shape)


def _normal(shape: tuple[int, ...], device: torch.device, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def real_calls(device: torch.device) -> list[tuple[str, Callable[[], list[torch.Tensor]]]]:
    """(label, call returning its output tensors): together, every kernel of the package."""
    import stellar_kernels as sk

    skm = importlib.import_module("stellar_kernels.sinkhorn_knopp")

    def match(cost: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
        return lambda: list(sk.sinkhorn_match(cost, rounding="permutation", validate=False))

    def tokens(pred: torch.Tensor, target: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
        return lambda: list(sk.match_tokens(pred, target, validate=False))

    def tokens_per_image(
        pred: torch.Tensor, target: torch.Tensor, config: tuple[int, int]
    ) -> Callable[[], list[torch.Tensor]]:
        """match_tokens launched with the per-image `config`: only timing on a GPU picks
        that form, so the call sets it as the tuner's choice for its key, then restores."""
        mt = importlib.import_module("stellar_kernels.match_tokens")
        tuned = importlib.import_module("stellar_kernels._triton").TUNED

        def call() -> list[torch.Tensor]:
            key = mt.match_tokens_tune_key(pred, target)
            before = tuned.get(key)
            tuned[key] = config
            try:
                return list(sk.match_tokens(pred, target, validate=False))
            finally:
                if before is None:
                    del tuned[key]
                else:
                    tuned[key] = before

        return call

    def knopp(scores: torch.Tensor, eps: float) -> Callable[[], list[torch.Tensor]]:
        return lambda: [sk.sinkhorn_knopp(scores, n_iters=3, eps=eps, validate=False)]

    def factorize() -> list[torch.Tensor]:
        shapes = ((2, 48, 64), (2, 16, 64), (2, 16, 64))
        inputs = [_normal(s, device, i).requires_grad_() for i, s in enumerate(shapes)]
        spatial, lowrank = sk.factorize(*inputs, validate=False)
        grads = torch.autograd.grad(lowrank.sum() + spatial.square().sum(), inputs)
        return [spatial.detach(), lowrank.detach(), *grads]

    wide = skm.MAX_RESIDENT_P + 16  # beyond the resident kernel: the chunked one
    return [
        ("sinkhorn_match tile", match(_uniform((64, 16, 16), device))),
        ("sinkhorn_match tile, odd and unaligned", match(_uniform((5, 3, 7), device, 1))),
        ("sinkhorn_match tile, float16", match(_uniform((32, 16, 16), device).half())),
        # Tiles of 32 and 64: calls whose configurations differ in the value of an int
        # constexpr (BK) and in nothing that Triton's specialization of runtime arguments sees.
        ("sinkhorn_match tile 32", match(_uniform((8, 32, 32), device))),
        ("sinkhorn_match tile 64", match(_uniform((8, 64, 64), device))),
        ("sinkhorn_match loop", match(_uniform((2, 130, 144), device))),
        ("match_tokens", tokens(_normal((32, 16, 64), device), _normal((16, 16, 64), device))),
        # Three views in groups of four (one masked), Q < T, D not a multiple of the chunk.
        (
            "match_tokens per image",
            tokens_per_image(
                _normal((12, 13, 40), device), _normal((4, 16, 40), device, 1), (4, 4)
            ),
        ),
        ("sinkhorn_knopp resident", knopp(_normal((64, 256), device), 1e-8)),
        ("sinkhorn_knopp resident exact", knopp(_normal((64, 256), device), 0.0)),
        ("sinkhorn_knopp chunked", knopp(_normal((16, wide), device), 0.0)),
        ("factorize forward and backward", factorize),
    ]


# ----------------------------------------------------------------------------- without a GPU


class RecordingLauncher:
    """In place of Triton's CUDA launcher: records the arguments of every launch."""

    launches: list[tuple] = []

    def __init__(self, src: object, metadata: object) -> None:
        self.n_params = len(src.signature)

    def __call__(self, *launch_args: object) -> None:
        # grid x, y, z, stream, function, packed metadata, launch metadata, the two hooks,
        # then one argument per parameter of the kernel, as the CUDA launcher reads them.
        assert len(launch_args) == 9 + self.n_params, "not one argument per parameter"
        RecordingLauncher.launches.append(launch_args)


class RecordingDriver:
    """The driver underneath Triton on a machine without a GPU: an sm_90 target, device 0
    and one stream; it loads no binary (each load gets a handle of its own) and launches
    nothing. Triton's JITFunction.run, compiler and CompiledKernel run as they are."""

    launcher_cls = RecordingLauncher
    stream = 0x5EED

    def __init__(self) -> None:
        self.utils = self

    def get_current_target(self) -> object:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return self.stream

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_properties(self, device: int) -> dict:
        return {"max_shared_mem": 227 * 1024, "multiprocessor_count": 132}

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple:
        return object(), object(), 64, 0, 1024  # module, function, registers, spills, threads

    def unload_module(self, module: object) -> None:
        pass


def _install() -> tuple[object, list[int]]:
    """Triton on the recording driver, the operators' Triton path on CPU tensors, and a
    counter of `JITFunction.run` calls; returns (the _triton module, the counter)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    launching = importlib.import_module("stellar_kernels._triton")
    backend = importlib.import_module("stellar_kernels._backend")
    assert not launching._knobs.runtime.interpret, "run without TRITON_INTERPRET"
    driver.set_active(RecordingDriver())
    # The operators' Triton path on CPU tensors: nothing runs them, the launcher records.
    backend._triton_reason = lambda device: None
    os.environ[backend.ENV_VAR] = "triton"
    runs = [0]
    run = JITFunction.run

    def counted(self, *args, **kwargs):
        runs[0] += 1
        return run(self, *args, **kwargs)

    JITFunction.run = counted
    return launching, runs


def _same(got: tuple, want: tuple, what: str) -> None:
    """Two launches hand Triton's launcher the same: grid, stream, compiled kernel (its
    function handle), metadata, hooks, and the very same argument objects."""
    assert got[:4] == want[:4], f"{what}: grid or stream {got[:4]} != {want[:4]}"
    assert got[4] is want[4], f"{what}: another compiled kernel than JITFunction.run's"
    assert got[5] == want[5], f"{what}: packed metadata"
    meta = [getattr(m, "data", m) for m in (got[6], want[6])]
    assert meta[0] == meta[1], f"{what}: launch metadata {meta}"
    assert got[7] is want[7] and got[8] is want[8], f"{what}: launch hooks"
    assert len(got) == len(want), f"{what}: {len(got) - 9} arguments, not {len(want) - 9}"
    for i, (a, b) in enumerate(zip(got[9:], want[9:])):
        assert a is b, f"{what}: argument {i}: {a!r} is not {b!r}"


def _launch_both_ways(
    launch: Callable,
    kernel: object,
    grid: tuple,
    args: tuple,
    meta: dict,
    runs: list[int],
    what: str,
) -> None:
    """Launches through `kernel` (a BoundLaunch whose configuration is bound; `launch` is
    BoundLaunch.launch) without calling JITFunction.run, then through JITFunction.run; the
    two launches must agree."""
    launches = RecordingLauncher.launches
    before, n = runs[0], len(launches)
    launch(kernel, grid, *args, **meta)
    assert runs[0] == before, f"{what}: went through JITFunction.run"
    assert len(launches) == n + 1, f"{what}: launched {len(launches) - n} times"
    kernel.fn[grid](*args, **meta)
    assert runs[0] == before + 1 and len(launches) == n + 2
    _same(launches[-2], launches[-1], what)


def check_launches_match_triton() -> None:
    """Every launch of `real_calls`, once its configuration is bound, launches exactly what
    JITFunction.run launches for the same call."""
    launching, runs = _install()
    assert launching.bound_launch_reason() is None, launching.bound_launch_reason()
    checking: list[str | None] = [None]  # the label of the call being checked
    launch = launching.BoundLaunch.launch
    seen: dict[str, int] = {}

    def spy(self, grid, *args, **meta):
        name = self.fn.__name__
        if checking[0] is None:
            return launch(self, grid, *args, **meta)
        seen[name] = seen.get(name, 0) + 1
        _launch_both_ways(launch, self, grid, args, meta, runs, f"{checking[0]}: {name}")

    launching.BoundLaunch.launch = spy
    for label, call in real_calls(torch.device("cpu")):
        checking[0] = None
        call()  # binds each configuration (through JITFunction.run)
        checking[0] = label
        call()
    kernels = {
        name
        for module in ("sinkhorn_match", "match_tokens", "sinkhorn_knopp", "localization")
        for name, value in vars(importlib.import_module(f"stellar_kernels.{module}")).items()
        if isinstance(value, launching.BoundLaunch)
    }
    assert set(seen) == kernels, f"not launched: {sorted(kernels - set(seen))}"
    print(f"{sum(seen.values())} launches of {len(seen)} kernels matched JITFunction.run")

    # Under a Triton outside the tested range, every launch goes through JITFunction.run.
    import triton

    launching.BoundLaunch.launch = launch
    installed = triton.__version__
    _, call = real_calls(torch.device("cpu"))[0]
    (low_major, low_minor), (high_major, high_minor) = launching.TESTED_TRITON
    try:
        # The releases just below and at the end of the range (never the installed one).
        for untested in (f"{low_major}.{low_minor - 1}.0", f"{high_major}.{high_minor}.0"):
            triton.__version__ = untested
            launching._triton_reason.cache_clear()
            n, before = len(RecordingLauncher.launches), runs[0]
            call()
            call()
            launched = len(RecordingLauncher.launches) - n
            assert launched and runs[0] - before == launched, f"triton {untested}"
    finally:
        triton.__version__ = installed
        launching._triton_reason.cache_clear()
    print("outside the tested range: every launch through JITFunction.run")


def check_configurations_match_triton() -> None:
    """What selects a binary: constexprs passed by position, each runtime argument's
    specialization, TRITON_DEBUG's switch (and 3.9's fpsan_homomorphic_casts), pre-run
    hooks. Each call, once bound, launches what JITFunction.run launches for it."""
    from triton import knobs

    launching, runs = _install()
    calls: dict[str, list] = {}
    launch = launching.BoundLaunch.launch

    def recorder(self, grid, *args, **meta):
        calls.setdefault(self.fn.__name__, []).append((self, grid, args, meta))
        return launch(self, grid, *args, **meta)

    launching.BoundLaunch.launch = recorder
    for _, call in real_calls(torch.device("cpu")):
        call()
    launching.BoundLaunch.launch = launch

    def positional(kernel, args: tuple, meta: dict) -> tuple[tuple, dict]:
        names = kernel.arg_names[len(args) :]
        extra = tuple(meta[n] if n in meta else kernel.defaults[n] for n in names)
        return (*args, *extra), {k: v for k, v in meta.items() if k not in kernel.arg_names}

    def both(kernel, grid, args, meta, what) -> None:
        kernel.launch(grid, *args, **meta)  # binds, where this configuration is new
        _launch_both_ways(launch, kernel, grid, args, meta, runs, what)

    # Every constexpr by position: calls that differ only in a constexpr's value (a pass
    # with FIRST or LAST set and one without) must still launch different binaries.
    checked = 0
    for name, launches in calls.items():
        variants = {}
        for kernel, grid, args, meta in launches:
            args, meta = positional(kernel, args, meta)
            constexprs = tuple(
                (type(a), a) for a, keyer in zip(args, kernel.keyers) if keyer is launching._value
            )
            variants.setdefault(constexprs, (kernel, grid, args, meta))
        for kernel, grid, args, meta in variants.values():
            both(kernel, grid, args, meta, f"{name} with its constexprs by position")
        checked += len(variants) > 1
    assert checked >= 2, "no kernel was called with two constexpr configurations"

    # A block size by position, then twice it: the same specialization of every runtime
    # argument and the same launch options, another binary.
    kernel, grid, args, meta = calls["_sk_reduce_kernel"][0]
    args, meta = positional(kernel, args, meta)
    blocks = [
        i
        for i, (a, keyer) in enumerate(zip(args, kernel.keyers))
        if keyer is launching._value and type(a) is int
    ]
    assert blocks, "the reduce kernel has no int constexpr"
    for i in blocks:
        changed = list(args)
        changed[i] *= 2
        both(kernel, grid, args, meta, f"reduce with {kernel.arg_names[i]}={args[i]} by position")
        label = f"reduce with {kernel.arg_names[i]}={changed[i]} by position"
        both(kernel, grid, tuple(changed), meta, label)

    # Runtime arguments: an integer equal to one, divisible by 16 or beyond 32 bits, a
    # pointer off 16-byte alignment, each in turn (the small reduce kernel compiles fast).
    kernel, grid, args, meta = calls["_sk_reduce_kernel"][0]
    ints = [i for i, a in enumerate(args) if type(a) is int]
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    assert ints and tensors
    for value in (1, 48, 3 * 2**33, 17):
        changed = list(args)
        changed[ints[0]] = value
        both(kernel, grid, tuple(changed), meta, f"reduce with {kernel.arg_names[ints[0]]}={value}")
    changed = list(args)
    changed[tensors[0]] = torch.empty(65, dtype=args[tensors[0]].dtype)[1:]
    both(kernel, grid, tuple(changed), meta, "reduce with an unaligned pointer")

    # Every argument by keyword, runtime ones included.
    every, options = positional(kernel, args, meta)
    named = dict(zip(kernel.arg_names, every))
    name = kernel.arg_names[ints[0]]
    for value in (1, 48, 17):
        both(
            kernel,
            grid,
            (),
            {**named, name: value, **options},
            f"reduce by keyword, {name}={value}",
        )

    # TRITON_DEBUG's switch (knobs.runtime.debug) compiles a binary with device checks.
    knobs.runtime.debug = True
    try:
        both(kernel, grid, args, meta, "reduce under TRITON_DEBUG")
    finally:
        knobs.runtime.debug = False
    both(kernel, grid, args, meta, "reduce after TRITON_DEBUG")

    # Triton 3.9's TRITON_FPSAN_HOMOMORPHIC_CASTS switch is a compiler option as well.
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        knobs.compilation.fpsan_homomorphic_casts = True
        try:
            both(kernel, grid, args, meta, "reduce under TRITON_FPSAN_HOMOMORPHIC_CASTS")
        finally:
            knobs.compilation.fpsan_homomorphic_casts = False
        both(kernel, grid, args, meta, "reduce after TRITON_FPSAN_HOMOMORPHIC_CASTS")

    # A pre-run hook runs on every launch (they run only in JITFunction.run).
    seen = []
    kernel.fn.add_pre_run_hook(lambda *a, **k: seen.append(a))
    try:
        for _ in range(3):
            kernel.launch(grid, *args, **meta)
    finally:
        kernel.fn.pre_run_hooks.clear()
    assert len(seen) == 3, f"the pre-run hook ran {len(seen)} times in 3 launches"
    print("every configuration matched JITFunction.run")
