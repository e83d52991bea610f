"""Input rules shared by every operator: clear errors that name the argument and the shapes."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    x: object,
    ndims: tuple[int, ...],
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> torch.Tensor:
    """A tensor of one of the allowed ranks and dtypes, or a TypeError/ValueError saying why not."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have a floating dtype ({names}), got {x.dtype}")
    return x


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all inputs must be on one device, got {seen}")
    return next(iter(devices.values()))


def check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_iterations(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def checking(validate: bool, x: torch.Tensor) -> bool:
    """Whether to run the data checks now.

    A data check reads one flag on the host. That is not possible while torch.compile
    traces (a data-dependent branch) or while a CUDA graph captures (a synchronization),
    so the checks are skipped there: validate=True never breaks a compiled or captured
    step, and validate=False skips them everywhere.
    """
    if not validate or torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


COST_RANGE = 1e37
"""Largest |cost| / eps the matchers take: their float32 duals add and subtract a few
scaled costs (log2(e) |cost| / eps each), which must stay below float32's 3.4e38."""


def check_costs(name: str, cost: torch.Tensor, eps: float) -> None:
    """+inf is a forbidden pair; NaN, -inf, a row with no allowed column and finite costs
    beyond COST_RANGE * eps raise.

    Two reductions (the row minima, where NaN propagates and -inf and an all-+inf row
    show, and the largest finite cost) and one host read.
    """
    if cost.numel() == 0:
        return
    row_min = cost.amin(dim=-1)
    finite_max = cost.masked_fill(cost == math.inf, -math.inf).amax()
    magnitude = torch.maximum(
        finite_max.abs(), row_min.masked_fill(row_min == math.inf, 0).abs().amax()
    )
    nan, neg_inf, full_row, largest = torch.stack(
        [
            row_min.isnan().any(),
            (row_min == -math.inf).any(),
            (row_min == math.inf).any(),
            magnitude.float(),
        ]
    ).tolist()
    shape = tuple(cost.shape)
    if nan:
        raise ValueError(f"{name} contains NaN (shape {shape})")
    if neg_inf:
        raise ValueError(f"{name} contains -inf (shape {shape}); +inf marks a forbidden pair")
    if full_row:
        raise ValueError(
            f"{name} has a row with no allowed column (every entry +inf, shape {shape})"
        )
    if largest > COST_RANGE * eps:
        raise ValueError(
            f"{name} / eps must lie within +-{COST_RANGE:.0e} (float32 duals): the largest "
            f"|{name}| is {largest:.3g} at eps {eps} (shape {shape}); rescale the costs"
        )


def check_finite(why: str = "", **tensors: torch.Tensor | tuple[torch.Tensor, float]) -> None:
    """Every tensor free of NaN and infinities and, given as (tensor, max_abs), of entries
    beyond +-max_abs (`why` says what they would overflow); one host read for all of them.

    aminmax propagates NaN and shows either infinity and the largest magnitude, so no
    x-sized mask is formed.
    """
    bounded = {
        name: arg if isinstance(arg, tuple) else (arg, math.inf) for name, arg in tensors.items()
    }
    present = {name: arg for name, arg in bounded.items() if arg[0].numel()}
    if not present:
        return
    flags = []
    for x, max_abs in present.values():
        lo, hi = (v.float() for v in torch.aminmax(x))
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        flags.append(torch.stack([~finite, torch.maximum(lo.abs(), hi.abs()) > max_abs]))
    for (name, (x, max_abs)), (bad, big) in zip(present.items(), torch.stack(flags).tolist()):
        if bad:
            raise ValueError(f"{name} contains NaN or an infinity (shape {tuple(x.shape)})")
        if big:
            raise ValueError(
                f"{name} has entries beyond +-{max_abs:.3g} ({why}; shape {tuple(x.shape)})"
            )


def raise_if_bad_scores(flags: torch.Tensor, shape: tuple[int, ...], across_ranks: bool) -> None:
    """sinkhorn_knopp's check: one host read of its (3,) flags (reference.SK_FLAGS). Across
    ranks the flags come out of the first all-reduce, so every rank raises the same error
    at the same point and none is left in a collective."""
    from .reference import SK_FLAGS

    found = [what for what, bad in zip(SK_FLAGS, flags.tolist()) if bad]
    if found:
        where = " on this rank or another" if across_ranks else ""
        raise ValueError(
            f"scores contains {' and '.join(found)}{where} (shape {shape}); -inf is allowed "
            "(zero mass) while every row and column keeps a finite score"
        )


def check_rows_fit(name: str, shape: torch.Size | tuple[int, ...]) -> None:
    q, t = shape[-2], shape[-1]
    if q > t:
        raise ValueError(f"{name} must have Q <= T (rows <= columns), got shape {tuple(shape)}")
