"""Every Python block of docs/dropin.md, executed: each swap the page shows works as shown.

The blocks import the clients as their users do. solo-learn's package __init__ imports
its whole training stack (installed with --no-deps here), so its Sinkhorn-Knopp module is
registered under its own name from the installed file before the blocks run. The blocks
run in a process group of one rank, as the page says (iBOT's teacher all-reduces).
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch.distributed as dist
from test_dropin_sinkhorn import solo_sinkhorn_knopp

PAGE = Path(__file__).resolve().parents[1] / "docs" / "dropin.md"


def python_blocks(text: str) -> list[tuple[str, str]]:
    """(section heading, code) of every ```python block, in page order."""
    blocks, heading = [], "top"
    for match in re.finditer(
        r"^## (?P<heading>[^\n]+)$|^```python\n(?P<code>.*?)^```", text, re.M | re.S
    ):
        if match["heading"]:
            heading = match["heading"].strip()
        else:
            blocks.append((heading, match["code"]))
    return blocks


BLOCKS = python_blocks(PAGE.read_text())


def test_every_client_has_a_block():
    headings = {h for h, _ in BLOCKS}
    for client in ("DINOv2", "SwAV", "MSN", "CAPI", "STELLAR", "torch-linear-assignment", "scipy"):
        assert any(client in h for h in headings), f"no block for {client}"


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.fixture
def solo_importable(monkeypatch):
    module = types.ModuleType("solo.utils.sinkhorn_knopp")
    module.SinkhornKnopp = solo_sinkhorn_knopp()
    for name in ("solo", "solo.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "solo.utils.sinkhorn_knopp", module)


@pytest.mark.parametrize("heading,code", BLOCKS, ids=[h for h, _ in BLOCKS])
def test_block_runs(rng_seed, one_rank_group, solo_importable, heading, code):
    exec(compile(code, f"{PAGE.name} ({heading})", "exec"), {"__name__": "dropin_block"})
