"""Exact linear assignment, batched: the C++ solver on CPU, the CUDA kernel on GPU.

Both run the one shortest-augmenting-path solver of csrc/hungarian.h: one CPU
thread per problem, or one CUDA warp per problem whose lanes sweep the columns.
Forbidden pairs are +inf when minimizing and -inf when maximizing (scipy's
convention; +inf is forbidden when maximizing too).
"""

from __future__ import annotations

import numpy as np
import torch

from ._backend import resolve_backend
from ._extension import cuda_extension_built, load_extension
from ._validation import check_rows_fit, check_tensor

HUNGARIAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATUS_INFEASIBLE = 1
_STATUS_INVALID = 2


def hungarian_scipy(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """Reference: a loop of scipy.optimize.linear_sum_assignment over the batch."""
    from scipy.optimize import linear_sum_assignment

    host = cost.detach().to("cpu", torch.float64).numpy()
    index = np.empty(host.shape[:2], dtype=np.int64)
    for b, problem in enumerate(host):
        rows, cols = linear_sum_assignment(problem, maximize=maximize)
        index[b, rows] = cols
    return torch.from_numpy(index).to(cost.device)


def _prepare(cost: torch.Tensor, maximize: bool) -> torch.Tensor:
    if maximize:
        # -inf marks a forbidden pair when maximizing; the solver sees +inf after negation.
        cost = cost.masked_fill(cost == float("inf"), float("-inf"))
    if cost.dtype in (torch.float16, torch.bfloat16):
        cost = cost.float()
    return cost


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
        backend: None (C++ on CPU, CUDA on GPU), "cpp", "cuda" or "scipy".
        validate: check the per-problem status and raise on NaN or infeasible
            problems (one host synchronization); False leaves index -1 there.

    Returns:
        index (B, Q) int64 ((Q,) for 2-D cost): the column assigned to each row.
    """
    check_tensor("cost", cost, (2, 3), HUNGARIAN_DTYPES)
    check_rows_fit("cost", cost.shape)
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    impl = resolve_backend(
        "hungarian_match", backend, cost.device, ("cpp", "cuda", "scipy"), "cuda", "cpp"
    )
    batched = _prepare(cost if cost.dim() == 3 else cost.unsqueeze(0), maximize)
    if impl == "scipy":
        if validate and torch.isnan(batched).any():
            raise ValueError(f"cost contains NaN (shape {tuple(cost.shape)})")
        index = hungarian_scipy(batched, maximize)
    else:
        if (impl == "cuda") != (cost.device.type == "cuda"):
            raise ValueError(
                f"hungarian_match: backend={impl!r} cannot run on a {cost.device.type} tensor"
            )
        load_extension()
        if impl == "cuda" and not cuda_extension_built():
            raise RuntimeError(
                "hungarian_match: stellar_kernels._C was built without CUDA; reinstall with a CUDA "
                "toolkit present (pip install -e . --no-build-isolation) or use backend='scipy'"
            )
        index, status = torch.ops.stellar_ext.hungarian(batched, maximize)
        if validate:
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
    load_extension()
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
