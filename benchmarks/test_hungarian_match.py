"""hungarian_match: our batched exact solver against a loop of scipy's linear_sum_assignment,
and on a GPU against both versions of torch-linear-assignment ("TLA").

On a GPU the scipy baseline includes the device-to-host copy of the costs (and
the copy of the result back), as a training loop that calls scipy pays it.

TLA 0.1.0 (a Triton kernel on sm_80+ cards) is the `torch_linear_assignment` package of
the environment; TLA 0.0.6 (its legacy compiled CUDA kernel, one thread per problem) is
the same package name installed into a folder of its own, which STELLAR_TLA006_PATH names
(benchmarks/gpu_check.sh installs both from the anchors folder) and which is loaded
beside 0.1.0 under another module name.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

import stellar_kernels as sk
from benchmarks.common import graph_ms, interleaved_ms, median_ms, reported, vs_baseline
from stellar_kernels.reference import hungarian_scipy

CASES = [(512, 16), (64, 196)]
# The paper's timing table (appendix B.5, A100): exact Hungarian matching of the
# 8 views of each image, K = 16 tokens, at these batch sizes.
SCALING_BATCHES = (4, 8, 16, 32, 64)
SCALING_VIEWS = 8
SCALING_K = 16
PAPER_A100_MS = {8: 17.0, 16: 40.0, 32: 90.0, 64: 180.0}

TLA_PACKAGE = "torch_linear_assignment"
TLA_DIST = "torch-linear-assignment"
# The folder holding TLA 0.0.6 (`pip install --target`), and the name it is kept under.
TLA006_ENV = "STELLAR_TLA006_PATH"
TLA006_ALIAS = "_stellar_tla006"
# Why a figure of the last figures() call was not measured ("name: skipped: why"), as printed.
PROBLEMS: list[str] = []


def _problem(text: str) -> None:
    print(text)
    PROBLEMS.append(text)


def _cost(batch: int, k: int, device) -> torch.Tensor:
    return torch.rand(batch, k, k, device=device)


def _torch_linear_assignment():
    """The batch_linear_assignment function of torch-linear-assignment, or None and why not."""
    try:
        from torch_linear_assignment import batch_linear_assignment
    except ImportError as err:
        return None, f"torch-linear-assignment is not installed ({err})"
    return batch_linear_assignment, ""


def _tla_version(path: str | None = None) -> str:
    """The installed version of torch-linear-assignment (in `path` if given), or "unknown"."""
    try:
        if path is None:
            return importlib.metadata.version(TLA_DIST)
        dist = next(iter(importlib.metadata.distributions(name=TLA_DIST, path=[path])), None)
        return dist.version if dist is not None else "unknown"
    except Exception:  # metadata is only a label
        return "unknown"


def _is_tla(name: str) -> bool:
    return name == TLA_PACKAGE or name.startswith(TLA_PACKAGE + ".")


@functools.cache
def _tla006() -> tuple[Callable | None, str]:
    """TLA 0.0.6's batch_linear_assignment, loaded from the folder STELLAR_TLA006_PATH names
    beside whatever `torch_linear_assignment` the environment has; or None and why not.

    0.0.6 imports itself by its absolute name (`import torch_linear_assignment._backend`),
    so it is imported with its folder first on sys.path and the environment's
    torch_linear_assignment modules out of sys.modules; afterwards its modules are kept
    as _stellar_tla006[.*] and sys.path and sys.modules are as before.
    """
    folder = os.environ.get(TLA006_ENV)
    if not folder:
        return None, (
            f"{TLA006_ENV} is not set (benchmarks/gpu_check.sh sets it after installing "
            "torch-linear-assignment 0.0.6 into a folder of its own)"
        )
    package = Path(folder) / TLA_PACKAGE
    if not (package / "__init__.py").is_file():
        return None, f"{TLA006_ENV}={folder} holds no {TLA_PACKAGE} package"
    saved = {name: sys.modules.pop(name) for name in [n for n in sys.modules if _is_tla(n)]}
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(TLA_PACKAGE)
        where = Path(module.__file__).resolve().parent
        if where != package.resolve():
            return None, f"{TLA_PACKAGE} was imported from {where}, not from {folder}"
        backend = sys.modules.get(f"{TLA_PACKAGE}._backend")
        if backend is None:
            return None, f"{TLA_PACKAGE} from {folder} has no compiled _backend module"
        if not backend.has_cuda():
            return None, f"{TLA_PACKAGE} from {folder} was built without its CUDA kernel"
        return module.batch_linear_assignment, ""
    except Exception as err:  # a broken build must not cost the other figures
        return None, f"{TLA_PACKAGE} from {folder} failed to import ({type(err).__name__}: {err})"
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
        for name in [n for n in sys.modules if _is_tla(n)]:
            sys.modules[TLA006_ALIAS + name[len(TLA_PACKAGE) :]] = sys.modules.pop(name)
        sys.modules.update(saved)
        importlib.invalidate_caches()


def _tla_uses_triton(cost: torch.Tensor) -> bool | None:
    """Whether TLA 0.1.0 solves this CUDA cost with its Triton kernel (False: its scipy
    fallback on the host); None where the installed version does not say."""
    assignment = sys.modules.get(f"{TLA_PACKAGE}.assignment")
    check = getattr(assignment, "_cuda_uses_triton", None)
    return None if check is None else bool(check(cost))


def _graph_time(fn: Callable[[], object], eager_ms: float) -> tuple[float | None, str]:
    """CUDA-graph milliseconds of one fn() (warmed up already), or None and why not.

    A call that reads the host cannot be captured; it is found out with torch's sync
    debug mode first, so that no capture fails halfway.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "a prototype feature"
            before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(before)
        torch.cuda.synchronize()
    except RuntimeError as err:
        return None, f"reads the host, so no CUDA graph can capture it ({err})"
    reps = max(1, min(20, int(50.0 / max(eager_ms, 1e-3))))
    try:
        return round(graph_ms(fn, reps=reps, repeats=5 if reps > 1 else 3), 6), ""
    except Exception as err:
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        return None, f"CUDA-graph capture failed ({type(err).__name__}: {err})"


def _total_cost(cost: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
    """Sum of cost at the assigned columns in float64; None if some row is unmatched."""
    index = index.to(cost.device)
    if index.shape != cost.shape[:-1] or bool((index < 0).any()):
        return None
    return cost.double().gather(-1, index[..., None]).sum()


def _vs_tla_figure(
    name: str,
    cost: torch.Tensor,
    solve: Callable[[torch.Tensor], torch.Tensor],
    baseline: str,
    validate: bool,
    kernel_only: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Ours against a TLA solve on the same cost: interleaved eager medians, CUDA-graph times
    beside, and whether the two assignments have equal total cost.

    `validate` is ours' validate flag for the eager time, chosen to do what the baseline
    does (TLA 0.1.0 checks its input and the result on the host, 0.0.6 checks nothing);
    while a CUDA graph captures ours skips the check, so its graph time is the solver
    alone. `kernel_only` is an extra solve timed by graph only (TLA without its checks).
    """
    device = cost.device
    ours = partial(sk.hungarian_match, cost, validate=validate)
    theirs = partial(solve, cost)
    ours_total = _total_cost(cost, ours())
    theirs_total = _total_cost(cost, theirs())
    equal = (
        ours_total is not None
        and theirs_total is not None
        and bool(torch.allclose(ours_total, theirs_total, rtol=1e-5))
    )
    ours_ms, theirs_ms = interleaved_ms([ours, theirs], device)
    extra: dict = {}
    ours_graph, why_ours = _graph_time(partial(sk.hungarian_match, cost, validate=False), ours_ms)
    theirs_graph, why_theirs = _graph_time(theirs, theirs_ms)
    if why_ours:
        extra["cuda_graph_note"] = why_ours
    if why_theirs:
        extra["baseline_cuda_graph_note"] = why_theirs
    if kernel_only is not None and theirs_graph is None:
        fn = partial(kernel_only, cost)
        with contextlib.suppress(Exception):
            fn()
            got, why = _graph_time(fn, theirs_ms)
            extra["baseline_cuda_graph_ms_unchecked"] = got
            if why:
                extra["baseline_cuda_graph_unchecked_note"] = why
    return vs_baseline(
        name,
        ours_ms,
        baseline,
        theirs_ms,
        timing="interleaved",
        ours_validate=validate,
        cuda_graph_ms=ours_graph,
        baseline_cuda_graph_ms=theirs_graph,
        cuda_graph_speedup=(
            round(theirs_graph / ours_graph, 3) if ours_graph and theirs_graph else None
        ),
        equal_cost=equal,
        ours_total_cost=None if ours_total is None else round(ours_total.item(), 6),
        baseline_total_cost=None if theirs_total is None else round(theirs_total.item(), 6),
        **extra,
    )


def _tla_figures(batch: int, k: int, cost: torch.Tensor) -> list[dict]:
    """hungarian_cuda_vs_tla/* (TLA 0.1.0's Triton kernel) and hungarian_cuda_vs_tla006/*
    (TLA 0.0.6's CUDA kernel) on a CUDA cost; a missing or unusable TLA is printed as
    skipped, and one failing comparison does not cost the other."""
    out = []
    size = f"B{batch}_K{k}"
    solve, why = _torch_linear_assignment()
    version = _tla_version()
    triton_path = None
    if solve is not None:
        triton_path = _tla_uses_triton(cost)
        if triton_path is False:
            solve, why = None, f"torch-linear-assignment {version} falls back to scipy here"
    if solve is None:
        _problem(f"hungarian_cuda_vs_tla/{size}: skipped: {why}")
    else:
        unchecked = None
        if triton_path:
            with contextlib.suppress(Exception):
                private = importlib.import_module(f"{TLA_PACKAGE}._triton").batch_linear_assignment
                unchecked = partial(private, validation="off")
        label = f"torch_linear_assignment {version}" + (" (triton)" if triton_path else "")
        try:
            out.append(
                _vs_tla_figure(f"hungarian_cuda_vs_tla/{size}", cost, solve, label, True, unchecked)
            )
        except Exception as err:
            _problem(f"hungarian_cuda_vs_tla/{size}: failed: {type(err).__name__}: {err}")
    solve006, why006 = _tla006()
    if solve006 is None:
        _problem(f"hungarian_cuda_vs_tla006/{size}: skipped: {why006}")
    else:
        label = f"torch_linear_assignment {_tla_version(os.environ[TLA006_ENV])} (cuda)"
        try:
            out.append(
                _vs_tla_figure(f"hungarian_cuda_vs_tla006/{size}", cost, solve006, label, False)
            )
        except Exception as err:
            _problem(f"hungarian_cuda_vs_tla006/{size}: failed: {type(err).__name__}: {err}")
    return out


@pytest.mark.benchmark(group="hungarian_match_B512_K16")
def test_hungarian_match_ours_B512_K16(run, device):
    cost = _cost(512, 16, device)
    run(sk.hungarian_match, cost)


@pytest.mark.benchmark(group="hungarian_match_B512_K16")
def test_hungarian_match_scipy_loop_B512_K16(run, device):
    cost = _cost(512, 16, device)
    run(hungarian_scipy, cost, rounds=5)


@pytest.mark.gpu
@pytest.mark.benchmark(group="hungarian_match_B512_K16")
def test_hungarian_match_torch_linear_assignment_B512_K16(run, device):
    solve, why = _torch_linear_assignment()
    if solve is None:
        pytest.skip(why)
    cost = _cost(512, 16, device)
    run(solve, cost)


@pytest.mark.gpu
@pytest.mark.benchmark(group="hungarian_match_B512_K16")
def test_hungarian_match_torch_linear_assignment_006_B512_K16(run, device):
    solve, why = _tla006()
    if solve is None:
        pytest.skip(why)
    cost = _cost(512, 16, device)
    run(solve, cost)


@pytest.mark.benchmark(group="hungarian_match_B64_K196")
def test_hungarian_match_ours_B64_K196(run, device):
    cost = _cost(64, 196, device)
    run(sk.hungarian_match, cost, rounds=3)


@pytest.mark.benchmark(group="hungarian_match_B64_K196")
def test_hungarian_match_scipy_loop_B64_K196(run, device):
    cost = _cost(64, 196, device)
    run(hungarian_scipy, cost, rounds=3)


@pytest.mark.gpu
@pytest.mark.benchmark(group="hungarian_match_cuda_scaling")
@pytest.mark.parametrize("batch", SCALING_BATCHES)
def test_hungarian_match_cuda_scaling(run, device, batch):
    cost = _cost(batch * SCALING_VIEWS, SCALING_K, device)
    run(sk.hungarian_match, cost)


def _scaling_figure(device: torch.device, quick: bool) -> dict:
    """hungarian_cuda_scaling: our time per batch beside scipy's (same run) and the paper's."""
    ours, scipy_loop = {}, {}
    for batch in SCALING_BATCHES:
        cost = _cost(batch * SCALING_VIEWS, SCALING_K, device)
        ours[batch] = round(median_ms(partial(sk.hungarian_match, cost), device), 6)
        if not quick:
            scipy_loop[batch] = round(
                median_ms(partial(hungarian_scipy, cost), device, warmup=1, rep=5), 6
            )
    return reported(
        "hungarian_cuda_scaling",
        ours_ms=ours[SCALING_BATCHES[-1]],
        views=SCALING_VIEWS,
        k=SCALING_K,
        ours_ms_by_batch=ours,
        scipy_loop_ms_by_batch=scipy_loop,
        paper_a100_ms_by_batch=PAPER_A100_MS,
    )


def figures(device: torch.device, quick: bool = False) -> list[dict]:
    """Fixed-name figures: hungarian_cpu/* on the CPU; hungarian_cuda/*,
    hungarian_cuda_vs_tla/* and hungarian_cuda_vs_tla006/* on a GPU (each TLA figure that
    could not be measured is printed, and listed in PROBLEMS)."""
    PROBLEMS.clear()
    out = []
    prefix = "hungarian_cuda" if device.type == "cuda" else "hungarian_cpu"
    for batch, k in CASES:
        if quick:
            batch = min(batch, 16)
        cost = _cost(batch, k, device)
        ours = median_ms(partial(sk.hungarian_match, cost), device)
        # The scipy baseline includes the device-to-host copy.
        base = median_ms(partial(hungarian_scipy, cost), device, warmup=1, rep=5)
        out.append(vs_baseline(f"{prefix}/B{batch}_K{k}", ours, "scipy_loop", base))
        if device.type == "cuda":
            out += _tla_figures(batch, k, cost)
    # Sanity: the timed solver is exact on this input.
    cost = _cost(8, 16, device)
    same = sk.hungarian_match(cost).cpu()
    ref = hungarian_scipy(cost).cpu()
    assert torch.allclose(
        cost.cpu().gather(2, same[..., None]).sum(), cost.cpu().gather(2, ref[..., None]).sum()
    )
    return out


def extra_figures(device: torch.device, quick: bool = False) -> list[dict]:
    """hungarian_cuda_scaling on a GPU (no target: the paper's batch sizes)."""
    return [_scaling_figure(device, quick)] if device.type == "cuda" else []
