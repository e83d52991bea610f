"""The GPU-compile helper: compiles for sm_80/sm_90 without a GPU and catches what the interpreter lets pass."""

from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from stellar_kernels.testing import compile_for_gpu, run_in_fresh_processes  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)


@triton.jit
def _small_dot_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # tl.dot needs every dimension >= 16 on NVIDIA GPUs; the interpreter does not care.
    i = tl.arange(0, BLOCK)
    a = tl.load(x_ptr + i[:, None] * BLOCK + i[None, :])
    tl.store(y_ptr + i[:, None] * BLOCK + i[None, :], tl.dot(a, a))


@pytest.mark.parametrize("arch", [80, 90])
def test_valid_kernel_compiles(arch):
    x = torch.empty(4, dtype=torch.float32)
    compiled = compile_for_gpu(
        _scale_kernel, {"x_ptr": x, "y_ptr": x, "n": 4, "BLOCK": 128}, arch=arch
    )
    assert ".target sm_" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0


def test_catches_kernel_only_the_gpu_compiler_rejects():
    x = torch.randn(8, 8, dtype=torch.float16)
    if not torch.cuda.is_available():
        # The interpreter runs it happily ...
        y = torch.empty_like(x)
        _small_dot_kernel[(1,)](x, y, BLOCK=8)
        torch.testing.assert_close(y.float(), (x.float() @ x.float()), rtol=1e-2, atol=1e-2)
    # ... but the GPU compiler rejects it.
    with pytest.raises(Exception, match="K >= 16|16"):
        compile_for_gpu(_small_dot_kernel, {"x_ptr": x, "y_ptr": x, "BLOCK": 8}, arch=90)


def test_missing_argument_is_reported():
    with pytest.raises(ValueError, match="BLOCK"):
        compile_for_gpu(_scale_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": 4})


OPERATORS = ["sinkhorn_match", "match_tokens", "sinkhorn_knopp", "localization"]


@pytest.mark.parametrize("operator", OPERATORS)
def test_every_kernel_configuration_compiles_for_sm80_and_sm90(operator):
    """Every kernel with every constexpr configuration its launcher can choose (the tables
    in gpu_compile_cases.py), compiled in fresh processes without TRITON_INTERPRET (see
    run_in_fresh_processes)."""
    tests_dir = str(Path(__file__).parent)
    arg_sets = [("gpu_compile_cases", f"{operator}_cases", arch) for arch in (80, 90)]
    outputs = run_in_fresh_processes(
        "stellar_kernels.testing", "compile_cases", arg_sets, python_path=(tests_dir,)
    )
    for arch, out in zip((80, 90), outputs):
        assert f"compiled for sm_{arch}" in out
