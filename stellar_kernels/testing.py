"""Helpers for testing Triton kernels without a GPU, and for timing operators.

The interpreter (TRITON_INTERPRET=1) runs kernels on the CPU but accepts code
that the GPU compiler rejects (tl.dot shapes under 16, mixed operand dtypes).
`compile_for_gpu` compiles a kernel to PTX and cubin for an NVIDIA
architecture through `triton.compile`, which needs no GPU (in a fresh process where
the interpreter is on in this one).
"""

from __future__ import annotations

import importlib
import pickle
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_TRITON_DTYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def _jit_function(kernel: Any) -> Any:
    """The JITFunction behind autotune/heuristics wrappers (and the interpreter's)."""
    from triton.runtime.jit import JITFunction

    wrapped = kernel
    while not isinstance(kernel, JITFunction):
        if hasattr(kernel, "fn"):
            kernel = kernel.fn
        elif callable(kernel) and kernel is not wrapped:
            # Under TRITON_INTERPRET=1, @triton.jit wraps the plain function instead.
            return JITFunction(kernel)
        else:
            raise TypeError(f"{wrapped!r} is not a Triton kernel")
    return kernel


def _arg_type(name: str, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPES[value.dtype]
    if isinstance(value, str) and value.startswith(("*", "i", "u", "fp", "bf")):
        return value  # an explicit Triton type such as "*fp32" or "i64"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: cannot infer a Triton type from {type(value).__name__}")


def compile_for_gpu(
    kernel: Any,
    args: dict[str, Any],
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
) -> Any:
    """Compiles `kernel` for sm_`arch`; returns the compiled kernel: `.asm` holds "ptx" and
    "cubin" (and the IRs), `.metadata` what Triton records (`.shared`: bytes of shared memory).

    Where the interpreter is on in this process (TRITON_INTERPRET=1, as the tests set it
    without a GPU), the compile runs in a fresh process without it: the interpreter patches
    triton.language while it runs a kernel, and what it leaves behind breaks a later compile
    in the same process (on a cold Triton cache). The kernel must then be importable by its
    module and name, constexprs must be Python literals, and the result is a snapshot: a
    namespace with `.name`, `.hash`, `.asm` and `.metadata`. (Neither way has `.n_regs` or
    `.n_spills`: Triton reads those when it loads the binary on a GPU.)

    Args:
        kernel: a @triton.jit function (autotune/heuristics wrappers are unwrapped).
        args: every parameter by name: a tensor (its dtype gives the pointer type),
            a Python int/float/bool, or an explicit Triton type string ("*fp32", "i64");
            constexpr parameters take their value.
        arch: compute capability times ten (80 for A100, 90 for H100/H200).

    Raises:
        triton.compiler.CompilationError (or another compiler error) if the GPU compiler
        rejects it; in a fresh process, RuntimeError with the compiler's error output.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(kernel)
    missing = [p.name for p in fn.params if p.name not in args]
    if missing:
        raise ValueError(f"compile_for_gpu: no value for parameter(s) {missing} of {fn.__name__}")
    signature, constexprs = {}, {}
    for p in fn.params:
        value = args[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        else:
            signature[p.name] = _arg_type(p.name, value)
    if triton.knobs.runtime.interpret:
        return _compile_in_fresh_process(
            fn.fn, {**signature, **constexprs}, arch, num_warps, num_stages
        )
    source = ASTSource(fn, signature, constexprs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    if "cubin" not in compiled.asm:
        raise RuntimeError(f"compile_for_gpu: no cubin produced for {fn.__name__} on sm_{arch}")
    return compiled


def _compile_in_fresh_process(
    function: Callable, args: dict[str, Any], arch: int, num_warps: int, num_stages: int
) -> types.SimpleNamespace:
    """`compile_for_gpu` of the kernel defined as `function`, in a fresh process without
    TRITON_INTERPRET (`run_in_fresh_processes`); `args` hold type strings and constexprs."""
    module = sys.modules[function.__module__]
    name = function.__qualname__
    if "<locals>" in name or getattr(module, "__file__", None) is None:
        raise ValueError(
            f"compile_for_gpu: {name} must be defined at the top of an importable module "
            "to compile it while the Triton interpreter is on"
        )
    # The directory from which `module` imports by its name.
    path = Path(module.__file__).resolve()
    root = path.parents[module.__name__.count(".") + (path.stem == "__init__")]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "compiled.pickle")
        job = (module.__name__, name, args, arch, num_warps, num_stages, out)
        try:
            run_in_fresh_processes(__name__, "_compile_to_file", [job], python_path=(str(root),))
        except AssertionError as err:  # the child's error output
            raise RuntimeError(f"compile_for_gpu: {name} for sm_{arch}: {err}") from None
        snapshot = pickle.loads(Path(out).read_bytes())
    snapshot["metadata"] = types.SimpleNamespace(**snapshot["metadata"])
    return types.SimpleNamespace(**snapshot)


def _compile_to_file(
    module: str, name: str, args: dict, arch: int, num_warps: int, num_stages: int, out: str
) -> None:
    """In the fresh process: compiles `module.name` and pickles a snapshot into `out`."""
    kernel = importlib.import_module(module)
    for part in name.split("."):
        kernel = getattr(kernel, part)
    compiled = compile_for_gpu(kernel, args, arch, num_warps, num_stages)
    snapshot = {
        "name": compiled.name,
        "hash": compiled.hash,
        "asm": dict(compiled.asm),
        "metadata": compiled.metadata._asdict(),
    }
    Path(out).write_bytes(pickle.dumps(snapshot))


# Shared memory a block may use (bytes): the kernels must fit on A100 and H100/H200.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def compile_cases(module_name: str, function: str, arch: int) -> int:
    """Compiles every case of `module_name.function()` for sm_`arch`; returns the count.

    `function` returns (label, kernel, arguments for `compile_for_gpu`, num_warps) tuples:
    every kernel with every configuration its launcher can choose. Run it where
    TRITON_INTERPRET is unset (see `run_in_fresh_processes`).
    """
    cases = getattr(importlib.import_module(module_name), function)()
    for label, kernel, args, num_warps in cases:
        try:
            compiled = compile_for_gpu(kernel, args, arch=arch, num_warps=num_warps)
        except Exception as err:
            msg = f"{function}: {label} does not compile for sm_{arch}: {err}"
            raise AssertionError(msg) from err
        assert f".target sm_{arch}" in compiled.asm["ptx"], label
        shared = compiled.metadata.shared
        assert shared <= SHARED_MEMORY_LIMIT[arch], f"{label}: {shared} bytes of shared memory"
    print(f"{function}: {len(cases)} configurations compiled for sm_{arch}")
    return len(cases)


def run_in_fresh_processes(
    module_name: str,
    function: str,
    arg_sets: list[tuple],
    timeout: float = 600,
    python_path: tuple[str, ...] = (),
) -> list[str]:
    """Calls `module_name.function(*args)` for each args in `arg_sets`, in parallel processes.

    GPU compilation must happen where TRITON_INTERPRET is unset: under the interpreter,
    triton's own @jit helpers are interpreter objects the GPU compiler rejects.
    `python_path` is prepended to the processes' PYTHONPATH. Returns each process's
    standard output; raises AssertionError with the error output of a failure.
    """
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join([*python_path, env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import importlib; importlib.import_module({module_name!r}).{function}(*{args!r})",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in arg_sets
    ]
    outputs = []
    for args, proc in zip(arg_sets, procs):
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{function}{args} failed:\n{err[-6000:]}"
        outputs.append(out)
    return outputs


def sync(device: torch.device | str) -> None:
    """Waits for the device (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(
    fn: Callable[[], object],
    device: torch.device | str,
    warmup: int = 3,
    rep: int = 20,
    max_seconds: float = 5.0,
) -> float:
    """Median wall time of fn() in milliseconds; CUDA events on a GPU, perf_counter on the CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(rep):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return statistics.median(times)
