"""BoundLaunch: after its first call, a configuration launches through Triton's own entry on
its compiled kernel, and launches exactly what Triton's `JITFunction.run` would.

Without a GPU the package's real kernels are compiled for sm_90 by `JITFunction.run` in a
fresh process, on a driver that records what Triton's launcher receives instead of
launching (tests/launch_cases.py): every launch of every kernel, as the operators make
it, goes both ways and must hand the launcher the same. On a GPU the same calls run with
the launch cache on and off, and their results must be bitwise equal.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from stellar_kernels.testing import run_in_fresh_processes

triton = pytest.importorskip("triton")
launching = importlib.import_module("stellar_kernels._triton")
TESTS = str(Path(__file__).parent)


@pytest.fixture
def fresh_reason():
    """`_triton_reason` caches what it reads from the installed Triton: read it again."""
    launching._triton_reason.cache_clear()
    yield
    launching._triton_reason.cache_clear()


def test_pyproject_states_the_tested_triton_range():
    pyproject = (Path(TESTS).parent / "pyproject.toml").read_text()
    [spec] = re.findall(r'^\s*"(triton[^"]*)"', pyproject, re.MULTILINE)
    low, high = launching.TESTED_TRITON
    bounds = f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    assert spec.startswith(f"triton{bounds};"), (spec, bounds)
    # The CPU checks below compare the bound path with Triton's: CI must install a tested release.
    assert low <= launching._release(triton.__version__) < high, triton.__version__


@pytest.mark.parametrize("version", ["3.0.0", "3.5.1", "3.10.0", "4.0.0+git1234"])
def test_an_untested_triton_takes_tritons_path(monkeypatch, fresh_reason, version):
    monkeypatch.setattr(triton, "__version__", version)
    why = launching.bound_launch_reason()
    assert why is not None and f"triton {version} is outside the tested range" in why


def test_the_switch_turns_the_cache_off(monkeypatch):
    monkeypatch.setattr(launching, "LAUNCH_CACHE", False)
    assert launching.bound_launch_reason() == "STELLAR_KERNELS_LAUNCH_CACHE=0"


def test_every_kernel_launches_what_jitfunction_run_launches():
    """Each launch of the operators' kernels (tests/launch_cases.py: real_calls), once its
    configuration is bound, hands Triton's launcher what JITFunction.run hands it for the
    same call: the same compiled kernel, grid, stream, hooks and arguments. Under a Triton
    outside the tested range every launch goes through JITFunction.run."""
    [out] = run_in_fresh_processes(
        "launch_cases", "check_launches_match_triton", [()], python_path=(TESTS,)
    )
    assert "launches of 10 kernels matched JITFunction.run" in out, out
    assert "outside the tested range: every launch through JITFunction.run" in out, out


def test_every_configuration_launches_what_jitfunction_run_launches():
    """A constexpr passed by position keys by its value (BLOCK=32, then 64, launches two
    binaries); an int equal to 1, divisible by 16 or beyond 32 bits, an unaligned pointer
    and TRITON_DEBUG's switch each select the binary JITFunction.run selects; pre-run hooks
    run on every launch."""
    [out] = run_in_fresh_processes(
        "launch_cases", "check_configurations_match_triton", [()], python_path=(TESTS,)
    )
    assert "every configuration matched JITFunction.run" in out, out


def test_interpreted_kernels_take_the_normal_path():
    """Under TRITON_INTERPRET=1 (tests/conftest.py on a machine without a GPU) the
    operators' kernels are no JITFunctions: nothing is bound, the reason says so, and the
    results are right."""
    import stellar_kernels as sk

    module = importlib.import_module("stellar_kernels.sinkhorn_match")
    if torch.cuda.is_available():
        pytest.skip("the kernels compile on this machine")
    kernel = module._sinkhorn_tile_kernel
    assert not kernel.is_jit
    assert "interpreter" in launching.bound_launch_reason(kernel)
    cost = torch.rand(3, 4, 5)
    got = sk.sinkhorn_match(cost, backend="triton")
    want = sk.sinkhorn_match(cost, backend="torch")
    torch.testing.assert_close(got.plan, want.plan, rtol=1e-5, atol=1e-6)
    assert not kernel.bound


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_gpu_bound_launches_are_bitwise_jitfunction_run_on_every_kernel(monkeypatch):
    """Every call of launch_cases.real_calls, through JITFunction.run on every launch, then
    through the compiled kernels' entry (no JITFunction.run at all): bitwise equal."""
    import launch_cases
    from triton.runtime.jit import JITFunction

    assert launching.bound_launch_reason() is None, launching.bound_launch_reason()
    monkeypatch.setenv("STELLAR_KERNELS_AUTOTUNE", "0")  # the same configuration both ways
    runs = [0]
    run = JITFunction.run

    def counted(self, *args, **kwargs):
        runs[0] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counted)
    for label, call in launch_cases.real_calls(torch.device("cuda")):
        monkeypatch.setattr(launching, "LAUNCH_CACHE", False)
        want = [t.cpu() for t in call()]
        monkeypatch.setattr(launching, "LAUNCH_CACHE", True)
        call()  # binds each configuration
        before = runs[0]
        got = [t.cpu() for t in call()]
        assert runs[0] == before, f"{label}: {runs[0] - before} launches through JITFunction.run"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(g, w), f"{label}: output {i} differs"
