"""Exact linear assignment, batched: the C++ solver on CPU, the CUDA kernel on GPU.

Both run the one shortest-augmenting-path solver of csrc/hungarian.h: one CPU
thread per problem, or one CUDA warp per problem whose lanes sweep the columns.
Forbidden pairs are +inf when minimizing and -inf when maximizing (scipy's
convention; +inf is forbidden when maximizing too).
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._extension import cuda_extension_built, ensure_loaded, fix_command
from ._validation import check_no_nan, check_rows_fit, check_tensor, checking
from .reference import hungarian_scipy

HUNGARIAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATUS_INFEASIBLE = 1
_STATUS_INVALID = 2


def _prepare(cost: torch.Tensor, maximize: bool) -> torch.Tensor:
    if maximize:
        # -inf marks a forbidden pair when maximizing; the solver sees +inf after negation.
        cost = cost.masked_fill(cost == float("inf"), float("-inf"))
    if cost.dtype in (torch.float16, torch.bfloat16):
        cost = cost.float()
    return cost


def _cannot_serve(impl: str, device: torch.device) -> str | None:
    if impl == "cpp" and device.type != "cpu":
        return f"the C++ solver takes CPU tensors, got a {device.type} tensor"
    if impl == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernel takes CUDA tensors, got a {device.type} tensor"
        if not cuda_extension_built():
            return (
                "the compiled extension holds no CUDA kernels (no CUDA "
                "toolkit was found when it was built); with CUDA_HOME set to a toolkit: "
                f"`{fix_command()}`"
            )
    return None


def hungarian_match(
    cost: torch.Tensor,
    maximize: bool = False,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Minimum (or maximum) total cost one-to-one assignment of Q rows to T columns.

    Args:
        cost: (B, Q, T) or (Q, T), Q <= T, float16/bfloat16/float32/float64;
            +inf entries (and -inf when maximizing) are forbidden pairs.
        maximize: maximize the total instead of minimizing it.
        backend: None (the C++ solver on CPU tensors, the CUDA kernel on CUDA tensors; a
            loop of scipy's solver on a host copy where the extension was built without
            CUDA), "cpp", "cuda" or "scipy" (the reference: scipy's linear_sum_assignment
            per problem). A backend that cannot serve the input raises ValueError.
        validate: raise ValueError on NaN or on problems with no complete assignment
            (one host read of the per-problem status); skipped while torch.compile traces
            and while a CUDA graph captures, and everywhere with validate=False, which
            leaves index -1 in such problems.

    Returns:
        index (B, Q) int64 ((Q,) for 2-D cost): the column assigned to each row.
    """
    check_tensor("cost", cost, (2, 3), HUNGARIAN_DTYPES)
    check_rows_fit("cost", cost.shape)
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    impl = resolve_backend(
        "hungarian_match",
        backend,
        cost.device,
        ("cpp", "cuda", "scipy"),
        "cuda",
        "cpp",
        cannot_serve=lambda name: _cannot_serve(name, cost.device),
        fallbacks=("scipy",),
        hint="the exact solver's reference implementation is 'scipy'",
    )
    check = checking(validate, cost)
    batched = _prepare((cost if cost.dim() == 3 else cost.unsqueeze(0)).detach(), maximize)
    if impl == "scipy":
        if check:
            check_no_nan(cost=batched)
        index = hungarian_scipy(batched, maximize)
    else:
        ensure_loaded()
        index, status = torch.ops.stellar_ext.hungarian(batched, maximize)
        if check:
            _raise_on_status(status, cost.shape)
    return index if cost.dim() == 3 else index[0]


def hungarian_emulated_warp(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """Test aid: the CUDA kernel's 32-lane decomposition of the solver, run on the CPU.

    Same contract as hungarian_match on a CPU tensor (status checked, ValueError
    on NaN or infeasible problems); its result equals the CUDA kernel's.
    """
    check_tensor("cost", cost, (2, 3), HUNGARIAN_DTYPES)
    check_rows_fit("cost", cost.shape)
    if cost.device.type != "cpu":
        raise ValueError(
            f"hungarian_emulated_warp runs on the CPU, got a {cost.device.type} tensor"
        )
    ensure_loaded()
    batched = _prepare(cost if cost.dim() == 3 else cost.unsqueeze(0), maximize)
    index, status = torch.ops.stellar_ext.hungarian_emulated_warp(batched, maximize)
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
    raise ValueError(
        f"cost (shape {tuple(shape)}): {len(bad)} problem(s) have no finite assignment "
        f"(forbidden pairs leave no complete matching; first is problem {first})"
    )
