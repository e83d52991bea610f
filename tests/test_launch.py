"""BoundLaunch: a kernel launched through its cached compiled kernel, or Triton's normal path.

On the CPU the bind logic runs against stand-ins for a Triton kernel and its compiled
kernel (what Triton's launcher receives is what `JITFunction.run` would pass it); the
gpu-marked tests launch the real kernels both ways and compare the results.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import stellar_kernels as sk

pytest.importorskip("triton")
launching = importlib.import_module("stellar_kernels._triton")


class FakeCompiled:
    """What Triton returns from `kernel[grid](...)`: a launcher and its handles."""

    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.function = "function-handle"
        self.packed_metadata = "packed"

    def run(self, *launch_args):
        self.calls.append(("direct", launch_args))

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream, args)


class FakeKernel:
    """A JIT kernel stand-in: `fake[grid](*args, **meta)` records a normal-path launch."""

    arg_names = ["x_ptr", "n", "scale", "BLOCK"]

    def __init__(self, compiled: bool = True) -> None:
        self.calls: list = []
        self.compiled = compiled

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls.append(("normal", grid, args, meta))
            return FakeCompiled(self.calls) if self.compiled else object()

        return launch


@pytest.fixture
def fake_cuda(monkeypatch):
    """The current device and stream that the direct launch asks for, without a GPU."""
    monkeypatch.setattr(launching, "LAUNCH_CACHE", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(launching, "stream_getter", lambda: lambda device: 1000 + device)


def bound(kernel: FakeKernel) -> launching.BoundLaunch:
    wrapped = launching.bound_launch(kernel)
    wrapped.compiles = True  # the stand-in is no JITFunction
    return wrapped


def test_second_call_launches_directly_with_triton_arguments(fake_cuda):
    from triton import knobs

    kernel = FakeKernel()
    launch = bound(kernel)
    x = torch.zeros(64)
    launch[(5,)](x, 40, 0.5, BLOCK=32, num_warps=2)
    assert kernel.calls == [("normal", (5,), (x, 40, 0.5), {"BLOCK": 32, "num_warps": 2})]
    launch[(7, 2)](x, 44, 0.25, BLOCK=32, num_warps=2)  # same specialization: cached
    kind, args = kernel.calls[1]
    assert kind == "direct"
    full = (x, 44, 0.25, 32)  # every parameter in signature order, constexprs included
    assert args == (
        7,
        2,
        1,
        1003,
        "function-handle",
        "packed",
        ("metadata", (7, 2), 1003, full),
        knobs.runtime.launch_enter_hook,
        knobs.runtime.launch_exit_hook,
        *full,
    )


@pytest.mark.parametrize(
    "other",
    [
        dict(n=48),  # divisible by 16 now
        dict(n=1),  # equal to one (Triton makes it a constant)
        dict(n=2**40),  # 64-bit
        dict(offset=1),  # a tensor not 16-byte aligned
        dict(dtype=torch.float16),
        dict(block=64),  # another constexpr
        dict(num_warps=4),  # another launch option
    ],
)
def test_a_new_specialization_goes_through_triton_again(fake_cuda, other):
    kernel = FakeKernel()
    launch = bound(kernel)
    x = torch.zeros(64)
    launch[(1,)](x, 40, 0.5, BLOCK=32, num_warps=2)
    y = x.to(other.get("dtype", x.dtype))[other.get("offset", 0) :]
    n = other.get("n", 40)
    block, warps = other.get("block", 32), other.get("num_warps", 2)
    launch[(1,)](y, n, 0.5, BLOCK=block, num_warps=warps)
    assert [c[0] for c in kernel.calls] == ["normal", "normal"]
    launch[(1,)](y, n, 0.5, BLOCK=block, num_warps=warps)
    assert [c[0] for c in kernel.calls] == ["normal", "normal", "direct"]


def test_no_launcher_keeps_the_normal_path(fake_cuda):
    kernel = FakeKernel(compiled=False)  # a release whose compiled kernel has no .run
    launch = bound(kernel)
    x = torch.zeros(16)
    for n in (3, 3, 3):
        launch[(2,)](x, n, 1.0, BLOCK=16)
    assert [c[0] for c in kernel.calls] == ["normal"] * 3


def test_switched_off_always_takes_the_normal_path(fake_cuda, monkeypatch):
    monkeypatch.setattr(launching, "LAUNCH_CACHE", False)
    kernel = FakeKernel()
    launch = bound(kernel)
    x = torch.zeros(16)
    for _ in range(3):
        launch[(2,)](x, 3, 1.0, BLOCK=16)
    assert [c[0] for c in kernel.calls] == ["normal"] * 3
    assert not launch.bound


def test_interpreted_kernels_take_the_normal_path():
    """Under TRITON_INTERPRET=1 (tests/conftest.py on a machine without a GPU) the
    operators' kernels are no JITFunctions: nothing is bound and the results are right."""
    module = importlib.import_module("stellar_kernels.sinkhorn_match")

    if torch.cuda.is_available():
        pytest.skip("the kernels compile on this machine")
    assert not module._sinkhorn_tile_kernel.compiles
    cost = torch.rand(3, 4, 5)
    got = sk.sinkhorn_match(cost, backend="triton")
    want = sk.sinkhorn_match(cost, backend="torch")
    torch.testing.assert_close(got.plan, want.plan, rtol=1e-5, atol=1e-6)
    assert not module._sinkhorn_tile_kernel.bound


# ----------------------------------------------------------------------------- on a GPU

SCRIPT = """
import torch, stellar_kernels as sk
torch.manual_seed(0)
out = []
for b, q, t, off in [(64, 16, 16, 0), (64, 16, 16, 0), (5, 3, 7, 1), (5, 3, 7, 1), (64, 16, 16, 3)]:
    cost = torch.rand(b * q * t + off, device="cuda")[off:].view(b, q, t)
    r = sk.sinkhorn_match(cost, validate=False)
    out += [r.index.cpu(), r.plan.cpu()]
    pred, target = torch.randn(2 * b, q, 32, device="cuda"), torch.randn(b, t, 32, device="cuda")
    r = sk.match_tokens(pred, target, validate=False)
    out += [r.index.cpu(), r.plan.cpu()]
    s = torch.randn(b * 9 + off, 33, device="cuda")[off:]
    out.append(sk.sinkhorn_knopp(s, validate=False).cpu())
torch.save(out, {path!r})
"""


@pytest.mark.gpu
def test_bound_launches_give_the_normal_paths_results(tmp_path):
    """The same calls (repeated configurations, unaligned pointers, odd sizes) in two
    processes, launch cache on and off: the results are bitwise equal."""
    results = []
    for cache in ("1", "0"):
        path = tmp_path / f"cache{cache}.pt"
        env = {"STELLAR_KERNELS_LAUNCH_CACHE": cache, "STELLAR_KERNELS_AUTOTUNE": "0"}
        subprocess.run(
            [sys.executable, "-c", SCRIPT.format(path=str(path))],
            check=True,
            env={**os.environ, **env},
        )
        results.append(torch.load(path))
    for on, off in zip(*results, strict=True):
        assert torch.equal(on, off)


@pytest.mark.gpu
def test_bound_launches_are_used_on_a_gpu():
    module = importlib.import_module("stellar_kernels.sinkhorn_match")

    cost = torch.rand(8, 16, 16, device="cuda")
    for _ in range(3):
        sk.sinkhorn_match(cost, validate=False)
    entries = list(module._sinkhorn_tile_kernel.bound.values())
    assert entries and all(e is not launching._NORMAL_PATH for e in entries)
