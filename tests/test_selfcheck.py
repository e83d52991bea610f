"""`python -m stellar_kernels`: passes on this machine, and fails an operator that is wrong
in a way its output's shape and sums do not show."""

from __future__ import annotations

import pytest
import torch

import stellar_kernels as sk
from stellar_kernels import __main__ as selfcheck


def test_every_operator_passes(capsys):
    assert selfcheck.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == 5 and "FAIL" not in out


def _softmax_rows(scores, *args, **kwargs):
    return torch.softmax(scores.float(), dim=1)  # rows sum to 1: not Sinkhorn-Knopp


def _uniform_spatial(dense, sparse, values, temperature, **kwargs):
    spatial = torch.full((*dense.shape[:2], sparse.shape[1]), 1 / sparse.shape[1])
    return spatial, spatial @ values  # rows sum to 1 and lowrank is consistent with it


@pytest.mark.parametrize(
    "name,wrong", [("sinkhorn_knopp", _softmax_rows), ("factorize", _uniform_spatial)]
)
def test_a_wrong_operator_fails(monkeypatch, capsys, name, wrong):
    monkeypatch.setattr(sk, name, wrong)
    assert selfcheck.main([]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines if line.strip().startswith("FAIL")] == [name]
