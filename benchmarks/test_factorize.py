"""factorize: the fused Triton forward + backward against PyTorch eager and torch.compile.

Baselines are the paper's operator sequence in the input dtype: normalize, bmm, divide,
softmax, bmm, and autograd's backward of it (eager, and the same function under
torch.compile). The forward alone is also measured against the memory floor: one read of
dense, sparse and values and one write of spatial and lowrank.
"""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import stellar_kernels as sk
from benchmarks.common import (
    compare,
    copy_bandwidth_gbs,
    maybe_graph_ms,
    median_ms,
    reported,
    vs_floor,
)
from stellar_kernels.reference import factorize_reference

loc = importlib.import_module("stellar_kernels.localization")

TEMPERATURE = 0.06
VIT_B = (128, 196, 16, 768)  # B, N, K, d = D
CPU_CASE = (8, 49, 8, 64)


def eager_factorize(dense, sparse, values, temperature=TEMPERATURE):
    """The operator as PyTorch code writes it, in the input dtype."""
    cos = F.normalize(dense, dim=-1, eps=1e-7) @ F.normalize(sparse, dim=-1, eps=1e-7).transpose(
        1, 2
    )
    spatial = torch.softmax(cos / temperature, dim=-1)
    return spatial, spatial @ values


def ours_factorize(dense, sparse, values, temperature=TEMPERATURE):
    return sk.factorize(dense, sparse, values, temperature)


def ours_backend(device) -> str:
    """What sk.factorize runs for a bfloat16 input on `device` with the default backend."""
    x = torch.empty(1, 1, 1, dtype=torch.bfloat16, device=device)
    return loc._pick("factorize", None, x, x, x)


def make_inputs(case, dtype, device, requires_grad=True):
    b, n, k, d = case
    gen = torch.Generator(device="cpu").manual_seed(0)
    tensors = [
        torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
        for shape in ((b, n, d), (b, k, d), (b, k, d))
    ]
    return [t.requires_grad_(requires_grad) for t in tensors]


def fwd_bwd(fn, inputs, out_grads):
    """Forward and the three input gradients (autograd.grad: nothing accumulates in .grad)."""
    spatial, lowrank = fn(*inputs)
    return torch.autograd.grad((spatial, lowrank), inputs, out_grads)


def out_grads(case, dtype, device):
    b, n, k, d = case
    gen = torch.Generator(device="cpu").manual_seed(1)
    return (
        torch.randn(b, n, k, generator=gen).to(device=device, dtype=dtype),
        torch.randn(b, n, d, generator=gen).to(device=device, dtype=dtype),
    )


def fwd_floor_bytes(case, dtype) -> int:
    b, n, k, d = case
    elems = b * n * d + b * k * d + b * k * d + b * n * k + b * n * d
    return elems * torch.empty(0, dtype=dtype).element_size()


def case_name(case, dtype) -> str:
    b, n, k, d = case
    return f"B{b}_N{n}_K{k}_D{d}_{'bf16' if dtype == torch.bfloat16 else 'fp32'}"


# ----------------------------------------------------------------------------- pytest-benchmark

GROUP_FWD_BWD = "factorize_fwd_bwd_B128_N196_K16_D768_bf16"
GROUP_FWD = "factorize_fwd_B128_N196_K16_D768"


@pytest.mark.gpu
@pytest.mark.benchmark(group=GROUP_FWD_BWD)
def test_factorize_fwd_bwd_ours_B128_N196_K16_D768_bf16(run, device):
    inputs = make_inputs(VIT_B, torch.bfloat16, device)
    run(fwd_bwd, ours_factorize, inputs, out_grads(VIT_B, torch.bfloat16, device), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group=GROUP_FWD_BWD)
def test_factorize_fwd_bwd_torch_eager_B128_N196_K16_D768_bf16(run, device):
    inputs = make_inputs(VIT_B, torch.bfloat16, device)
    run(fwd_bwd, eager_factorize, inputs, out_grads(VIT_B, torch.bfloat16, device), rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group=GROUP_FWD_BWD)
def test_factorize_fwd_bwd_torch_compile_B128_N196_K16_D768_bf16(run, device):
    inputs = make_inputs(VIT_B, torch.bfloat16, device)
    grads = out_grads(VIT_B, torch.bfloat16, device)
    compiled = torch.compile(eager_factorize)
    fwd_bwd(compiled, inputs, grads)  # compile outside the timed rounds
    run(fwd_bwd, compiled, inputs, grads, rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group=GROUP_FWD)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_factorize_fwd_ours_B128_N196_K16_D768(run, device, dtype):
    inputs = make_inputs(VIT_B, dtype, device, requires_grad=False)
    run(ours_factorize, *inputs, rounds=20)


@pytest.mark.gpu
@pytest.mark.benchmark(group=GROUP_FWD)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_factorize_fwd_torch_eager_B128_N196_K16_D768(run, device, dtype):
    inputs = make_inputs(VIT_B, dtype, device, requires_grad=False)
    run(eager_factorize, *inputs, rounds=20)


# Small CPU cases: sk.factorize on a CPU tensor runs the PyTorch reference (float32 math).
@pytest.mark.benchmark(group="factorize_fwd_bwd_cpu_B8_N49_K8_D64")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_factorize_fwd_bwd_cpu_ours(run, dtype):
    inputs = make_inputs(CPU_CASE, dtype, "cpu")
    run(fwd_bwd, ours_factorize, inputs, out_grads(CPU_CASE, dtype, "cpu"), rounds=5)


@pytest.mark.benchmark(group="factorize_fwd_bwd_cpu_B8_N49_K8_D64")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_factorize_fwd_bwd_cpu_torch_eager(run, dtype):
    inputs = make_inputs(CPU_CASE, dtype, "cpu")
    run(fwd_bwd, eager_factorize, inputs, out_grads(CPU_CASE, dtype, "cpu"), rounds=5)


# ----------------------------------------------------------------------------- result figures


def _check_agrees(device, dtype) -> None:
    """The timed implementation computes the operator (small input, against the reference)."""
    inputs = make_inputs((2, 20, 5, 64), dtype, device, requires_grad=False)
    spatial, lowrank = ours_factorize(*inputs)
    ref_spatial, ref_lowrank = factorize_reference(*inputs, TEMPERATURE)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(spatial.float(), ref_spatial.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lowrank.float(), ref_lowrank.float(), rtol=tol, atol=tol * 10)


def figures(device: torch.device, quick: bool = False) -> list[dict]:
    """Fixed-name figures for the ViT-B case (B=128, N=196, K=16, d=D=768).

    On a GPU sk.factorize runs the Triton kernels. On the CPU it runs the PyTorch
    reference (Triton kernels run there only in the interpreter, which says nothing about
    speed): the figures carry "ours_backend": "torch", the torch.compile comparison is
    reported as not measured, and quick/CPU runs use B=8 (the name says so).
    """
    device = torch.device(device)
    backend = ours_backend(device)
    on_gpu = device.type == "cuda"
    batch = VIT_B[0] if on_gpu and not quick else 8
    case = (batch, *VIT_B[1:])
    bf16 = torch.bfloat16
    out: list[dict] = []
    for dtype in (bf16, torch.float32):
        _check_agrees(device, dtype)

    inputs = make_inputs(case, bf16, device)
    grads = out_grads(case, bf16, device)
    rep = dict(rep=20 if on_gpu else 5, max_seconds=5.0 if on_gpu else 3.0)
    rounds = {} if on_gpu else {"rounds": 2, "rep": 2}
    name = case_name(case, bf16)
    ours_fn = partial(fwd_bwd, ours_factorize, inputs, grads)
    out.append(
        compare(
            f"factorize_fwd_bwd/{name}",
            ours_fn,
            "torch_eager",
            partial(fwd_bwd, eager_factorize, inputs, grads),
            device,
            ours_backend=backend,
            **rounds,
        )
    )
    if on_gpu:
        compiled = torch.compile(eager_factorize)
        fwd_bwd(compiled, inputs, grads)  # compile before timing
        out.append(
            compare(
                f"factorize_fwd_bwd_vs_compile/{name}",
                ours_fn,
                "torch_compile",
                partial(fwd_bwd, compiled, inputs, grads),
                device,
                ours_backend=backend,
            )
        )
    else:
        out.append(
            reported(
                f"factorize_fwd_bwd_vs_compile/{name}",
                not_measured="CPU run: the Triton kernels need a GPU (torch.compile on the CPU "
                "would time inductor's CPU code against the PyTorch reference)",
                ours_backend=backend,
            )
        )

    bandwidth = copy_bandwidth_gbs(device)
    for dtype in (bf16, torch.float32):
        inputs = make_inputs(case, dtype, device, requires_grad=False)
        with torch.no_grad():
            ours = median_ms(partial(ours_factorize, *inputs), device, **rep)
            eager = median_ms(partial(eager_factorize, *inputs), device, **rep)
            graph = maybe_graph_ms(partial(ours_factorize, *inputs), device)
        graph_extra = {} if graph is None else {"cuda_graph_ms": round(graph, 6)}
        out.append(
            vs_floor(
                f"factorize_fwd/{case_name(case, dtype)}",
                ours,
                fwd_floor_bytes(case, dtype),
                bandwidth,
                ours_backend=backend,
                torch_eager_ms=round(eager, 6),
                copy_bandwidth_gbs=round(bandwidth, 1),
                **graph_extra,
            )
        )
    return out
