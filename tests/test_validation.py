"""One test per input rule of the API contract: clear errors naming the argument."""

import pytest
import torch

import stellar_kernels as sk

C = torch.rand(2, 4, 5)


@pytest.mark.parametrize(
    "call,error,match",
    [
        # wrong rank
        (lambda: sk.sinkhorn_match(torch.rand(5)), ValueError, r"cost must be 2-D or 3-D.*\(5,\)"),
        (
            lambda: sk.match_tokens(torch.rand(4, 5), torch.rand(2, 4, 5)),
            ValueError,
            "pred must be 3-D",
        ),
        (lambda: sk.sinkhorn_knopp(torch.rand(2, 3, 4)), ValueError, "scores must be 2-D"),
        (
            lambda: sk.localization(torch.rand(2, 3), torch.rand(2, 3, 4)),
            ValueError,
            "dense must be 3-D",
        ),
        (lambda: sk.hungarian_match(torch.rand(3)), ValueError, "cost must be 2-D or 3-D"),
        # mismatched shapes
        (
            lambda: sk.match_tokens(torch.rand(5, 4, 8), torch.rand(2, 4, 8)),
            ValueError,
            "multiple.*V views",
        ),
        (
            lambda: sk.match_tokens(torch.rand(4, 4, 8), torch.rand(2, 4, 6)),
            ValueError,
            "token dimension",
        ),
        (
            lambda: sk.localization(torch.rand(2, 3, 4), torch.rand(2, 5, 6)),
            ValueError,
            "agree in B and d",
        ),
        (
            lambda: sk.factorize(torch.rand(2, 3, 4), torch.rand(2, 5, 4), torch.rand(2, 6, 7)),
            ValueError,
            "values",
        ),
        # Q > T
        (lambda: sk.sinkhorn_match(torch.rand(2, 6, 4)), ValueError, r"Q <= T.*\(2, 6, 4\)"),
        (lambda: sk.match_tokens(torch.rand(2, 6, 4), torch.rand(2, 4, 4)), ValueError, "Q <= T"),
        # non-floating dtype
        (
            lambda: sk.sinkhorn_match(torch.ones(2, 3, 3, dtype=torch.int64)),
            ValueError,
            "cost must have a floating dtype",
        ),
        (
            lambda: sk.sinkhorn_knopp(torch.ones(3, 3, dtype=torch.int32)),
            ValueError,
            "scores must have a floating dtype",
        ),
        (
            lambda: sk.hungarian_match(torch.ones(2, 3, 3, dtype=torch.complex64)),
            ValueError,
            "cost must have a real or bool dtype",
        ),
        (
            lambda: sk.localization(torch.rand(1, 3, 4).int(), torch.rand(1, 2, 4).int()),
            ValueError,
            "dense must have a floating dtype",
        ),
        # not a tensor
        (lambda: sk.sinkhorn_match([[1.0]]), TypeError, "cost must be a torch.Tensor"),
        # bad hyper-parameters
        (lambda: sk.sinkhorn_match(C, eps=0.0), ValueError, "eps must be"),
        (lambda: sk.sinkhorn_match(C, eps=float("nan")), ValueError, "eps must be"),
        (lambda: sk.sinkhorn_match(C, n_iters=0), ValueError, "n_iters must be >= 1"),
        (lambda: sk.sinkhorn_match(C, n_iters=2.5), TypeError, "n_iters must be an int"),
        (lambda: sk.sinkhorn_match(C, rounding="best"), ValueError, "rounding must be one of"),
        (lambda: sk.sinkhorn_knopp(torch.rand(3, 4), scale=-1.0), ValueError, "scale must be"),
        (lambda: sk.sinkhorn_knopp(torch.rand(3, 4), eps=-1e-8), ValueError, "eps must be"),
        (lambda: sk.sinkhorn_knopp(torch.rand(3, 4), n_iters=-1), ValueError, "n_iters must be"),
        (
            lambda: sk.localization(torch.rand(1, 3, 4), torch.rand(1, 2, 4), temperature=0.0),
            ValueError,
            "temperature must be",
        ),
        (lambda: sk.sinkhorn_match(C, backend="cuda"), ValueError, "backend must be one of"),
        (lambda: sk.hungarian_match(C, maximize="yes"), TypeError, "maximize must be a bool"),
        # NaN
        (
            lambda: sk.sinkhorn_match(torch.tensor([[0.0, float("nan")]])),
            ValueError,
            "cost contains NaN",
        ),
        (
            lambda: sk.sinkhorn_knopp(torch.tensor([[0.0, float("nan")]])),
            ValueError,
            "scores contains NaN",
        ),
        (
            lambda: sk.match_tokens(torch.full((1, 2, 2), float("nan")), torch.rand(1, 2, 2)),
            ValueError,
            "pred contains NaN",
        ),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_mixed_devices_raise():
    meta = torch.empty(2, 4, 5, device="meta")
    with pytest.raises(ValueError, match="one device.*pred on cpu.*target on meta"):
        sk.match_tokens(torch.rand(2, 4, 5), meta)
    with pytest.raises(ValueError, match="one device"):
        sk.localization(torch.rand(2, 4, 5), torch.empty(2, 3, 5, device="meta"))


def test_validate_false_skips_nan_scan():
    cost = torch.rand(1, 2, 2)
    cost[0, 0, 0] = float("nan")
    index, plan = sk.sinkhorn_match(cost, validate=False, backend="torch")
    assert torch.isnan(plan).any()


def test_environment_variable_sets_default(monkeypatch):
    monkeypatch.setenv("STELLAR_KERNELS_BACKEND", "scipy")
    cost = torch.rand(3, 4, 4)
    # hungarian_match implements "scipy", so the variable applies ...
    assert torch.equal(sk.hungarian_match(cost), sk.hungarian_match(cost, backend="cpp"))
    # ... while sinkhorn_match does not, and keeps its own default.
    assert sk.sinkhorn_match(cost).index.shape == (3, 4)
    monkeypatch.setenv("STELLAR_KERNELS_BACKEND", "torch")
    assert sk.sinkhorn_knopp(torch.rand(3, 4)).shape == (3, 4)


def test_public_api():
    for name in (
        "sinkhorn_match",
        "match_tokens",
        "sinkhorn_knopp",
        "localization",
        "factorize",
        "hungarian_match",
    ):
        assert callable(getattr(sk, name))
