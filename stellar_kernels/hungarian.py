"""Exact linear assignment, batched: the C++ solver on CPU, the CUDA kernel on GPU.

Both run the one shortest-augmenting-path solver of csrc/hungarian.h: one CPU
thread per problem, or one CUDA warp per problem whose lanes sweep the columns.
Forbidden pairs are +inf when minimizing and -inf when maximizing (scipy's
convention; +inf is forbidden when maximizing too).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from . import _build
from ._backend import environment_backend, resolve_backend
from ._extension import cuda_extension_built, ensure_loaded, fix_command
from ._validation import check_tensor, checking
from .reference import hungarian_scipy

HUNGARIAN_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
)
_STATUS_INFEASIBLE = 1
_STATUS_INVALID = 2

Solver = Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]


def _check_cost(cost: object) -> torch.Tensor:
    # check_tensor's message speaks of floating dtypes only; integer and bool costs are
    # welcome here, as scipy takes them.
    if isinstance(cost, torch.Tensor) and cost.dtype not in HUNGARIAN_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in HUNGARIAN_DTYPES)
        raise ValueError(f"cost must have a real or bool dtype ({names}), got {cost.dtype}")
    return check_tensor("cost", cost, (2, 3), HUNGARIAN_DTYPES)


def _prepare(cost: torch.Tensor, maximize: bool) -> torch.Tensor:
    if not cost.is_floating_point():
        # scipy solves integer and bool costs in float64, so int64 beyond 2^53 rounds as it
        # does there; they hold no infinity to remap.
        return cost.double()
    if maximize:
        # -inf marks a forbidden pair when maximizing; the solver sees +inf after negation.
        cost = cost.masked_fill(cost == float("inf"), float("-inf"))
    if cost.dtype in (torch.float16, torch.bfloat16):
        cost = cost.float()
    return cost


def _solve(solver: Solver, cost: torch.Tensor, maximize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (B, Q), status (B,)) for any Q and T from a solver op that needs Q <= T."""
    b, q, t = cost.shape
    if q <= t:
        return solver(cost, maximize)
    # The transposed problem gives each column a row; the optimum is the same. A scatter
    # turns that into each row's column on the tensor's own device (no host round trip).
    row_of_col, status = solver(cost.transpose(1, 2), maximize)
    # A problem without a solution names no row (all -1): its writes land in a spare
    # slot q, dropped below, and its rows stay -1.
    rows = row_of_col.masked_fill(row_of_col < 0, q)
    cols = torch.arange(t, device=cost.device).expand(b, t)
    index = torch.full((b, q + 1), -1, dtype=torch.int64, device=cost.device)
    return index.scatter_(1, rows, cols)[:, :q].contiguous(), status


def _scipy_status(cost: torch.Tensor, index: torch.Tensor, maximize: bool) -> torch.Tensor:
    # scipy leaves every row of a problem it could not solve at -1; which reason it was
    # is read off the prepared cost, as the compiled solver classifies it.
    invalid = cost.isnan()
    if not maximize:
        invalid |= cost == float("-inf")
    unsolved = ~(index >= 0).any(dim=1) & (min(cost.shape[1:]) > 0)
    status = unsolved.to(torch.int32) * _STATUS_INFEASIBLE
    return status.masked_fill(invalid.flatten(1).any(dim=1), _STATUS_INVALID)


@functools.cache  # every call on a CUDA tensor asks; finding the toolkit may run nvcc
def _no_cuda_kernels() -> str:
    """Why the loaded extension holds no CUDA kernels, and how to build them."""
    # On a GPU machine the build on first use adds them wherever a toolkit is found, so
    # what stands in the way is what cuda_plan reports.
    why = _build.cuda_plan(torch, need_gpu=True)[1] or "it was built without them"
    if why.startswith("STELLAR_NO_CUDA"):
        how = "unset STELLAR_NO_CUDA"
    else:
        how = (
            "install a CUDA toolkit and set CUDA_HOME to it (a folder with bin/nvcc and "
            "lib64/libcudart.so): the extension then rebuilds with them on first use, or "
            f"at install time with `{fix_command()}`"
        )
    return f"the compiled extension holds no CUDA kernels ({why}); to build them, {how}"


def _cannot_serve(impl: str, device: torch.device) -> str | None:
    if impl == "cpp" and device.type != "cpu":
        return f"the C++ solver takes CPU tensors, got a {device.type} tensor"
    if impl == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernel takes CUDA tensors, got a {device.type} tensor"
        if not cuda_extension_built():
            return _no_cuda_kernels()
    return None


_warned_host_solve = False


def _choose_backend(backend: str | None, device: torch.device) -> str:
    """The backend for a problem on `device`; warns once per process when backend=None
    sends a CUDA tensor to scipy on the host, which copies and synchronizes (an explicit
    "scipy", by argument or STELLAR_KERNELS_BACKEND, asks for that and is not warned)."""
    global _warned_host_solve
    impl = resolve_backend(
        "hungarian_match",
        backend,
        device,
        ("cpp", "cuda", "scipy"),
        "cuda",
        "cpp",
        cannot_serve=lambda name: _cannot_serve(name, device),
        fallbacks=("scipy",),
        hint="the exact solver's reference implementation is 'scipy'",
    )
    asked = backend == "scipy" or (backend is None and environment_backend() == "scipy")
    if impl == "scipy" and device.type == "cuda" and not asked and not _warned_host_solve:
        _warned_host_solve = True
        warnings.warn(
            "stellar_kernels: hungarian_match solves CUDA tensors on the host with scipy (a "
            f"copy and a synchronization per call): {_no_cuda_kernels()}; backend='scipy' "
            "asks for the host solver without this warning",
            stacklevel=3,
        )
    return impl


def hungarian_match(
    cost: torch.Tensor,
    maximize: bool = False,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Minimum (or maximum) total cost one-to-one assignment of Q rows to T columns.

    What scipy.optimize.linear_sum_assignment computes, batched, on the same inputs: min(Q, T)
    pairs, each row and each column in at most one, with the optimal total.

    Args:
        cost: (B, Q, T) or (Q, T), any Q and T (B, Q or T may be 0). float16, bfloat16,
            float32 or float64; or int8, int16, int32, int64, uint8 or bool, solved in
            float64 exactly as scipy solves them (int64 beyond 2^53 rounds as scipy rounds
            it). +inf entries are forbidden pairs, and so are -inf entries when maximizing
            (+inf stays forbidden then too); NaN, and -inf when minimizing, are invalid.
            With Q > T a row forbidden everywhere is allowed: it is left without a column.
        maximize: maximize the total instead of minimizing it (integer and bool costs too).
        backend: None (the C++ solver on CPU tensors, the CUDA kernel on CUDA tensors; a
            loop of scipy's solver on a host copy, with a warning on the first call, where
            the extension holds no CUDA kernels because no CUDA toolkit was found),
            "cpp", "cuda" or "scipy" (the reference: scipy's linear_sum_assignment per
            problem, without that warning). A backend that cannot serve the input raises
            ValueError.
        validate: raise ValueError naming `cost` and its shape on NaN or an invalid
            infinity, or on a problem with no assignment that gives every row a column
            (Q <= T) or every column a row (Q > T): one host read of the per-problem
            status. Skipped while torch.compile traces and while a CUDA graph captures, and
            everywhere with validate=False, which never raises for the data and leaves
            every row of such a problem at -1.

    Returns:
        index (B, Q) int64 ((Q,) for 2-D cost), on cost's device: the column assigned to
        each row. With Q > T the T rows of an optimal assignment get their columns and the
        other Q - T rows get -1 (all rows when T = 0); every row of a problem that cannot
        be solved gets -1 (only with validate=False, or while checks are skipped).
    """
    _check_cost(cost)
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    impl = _choose_backend(backend, cost.device)
    check = checking(validate, cost)
    batched = _prepare((cost if cost.dim() == 3 else cost.unsqueeze(0)).detach(), maximize)
    if impl == "scipy":
        index = hungarian_scipy(batched, maximize)
        if check:
            _raise_on_status(_scipy_status(batched, index, maximize), cost.shape)
    else:
        ensure_loaded()
        index, status = _solve(torch.ops.stellar_ext.hungarian, batched, maximize)
        if check:
            _raise_on_status(status, cost.shape)
    return index if cost.dim() == 3 else index[0]


def hungarian_emulated_warp(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """Test aid: the CUDA kernel's 32-lane decomposition of the solver, run on the CPU.

    Same contract as hungarian_match on a CPU tensor with validate=True (Q > T handled the
    same way, ValueError on NaN or infeasible problems); its result equals the CUDA kernel's.
    """
    _check_cost(cost)
    if cost.device.type != "cpu":
        raise ValueError(
            f"hungarian_emulated_warp runs on the CPU, got a {cost.device.type} tensor"
        )
    ensure_loaded()
    batched = _prepare(cost if cost.dim() == 3 else cost.unsqueeze(0), maximize)
    index, status = _solve(torch.ops.stellar_ext.hungarian_emulated_warp, batched, maximize)
    _raise_on_status(status, cost.shape)
    return index if cost.dim() == 3 else index[0]


def _raise_on_status(status: torch.Tensor, shape: torch.Size) -> None:
    # One flag read (one host synchronization on a GPU); details only on failure.
    if not bool(status.any()):
        return
    bad = status.nonzero().flatten().tolist()
    codes = status[bad].tolist()
    first = bad[0]
    if _STATUS_INVALID in codes:
        raise ValueError(
            f"cost (shape {tuple(shape)}) contains NaN or an infinity that makes the optimum "
            f"unbounded (problem {bad[codes.index(_STATUS_INVALID)]})"
        )
    if shape[-2] > shape[-1]:
        need = "every column a row (Q > T)"
    else:
        need = "every row a column (Q <= T)"
    raise ValueError(
        f"cost (shape {tuple(shape)}): {len(bad)} problem(s) have no finite assignment that "
        f"gives {need}: forbidden pairs rule every one out; first is problem {first}"
    )
