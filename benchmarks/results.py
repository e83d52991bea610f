"""Writes one results file with every benchmark figure (docs/benchmarks.md).

    python -m benchmarks.results --out-dir benchmarks/results [--quick]

Each benchmark module `benchmarks/test_<operator>.py` that defines
`figures(device, quick)` contributes its fixed-name figures; a module whose
baseline package is missing returns none and prints why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import bench_device, copy_bandwidth_gbs

MODULES = [
    "benchmarks.test_host_overhead",
    "benchmarks.test_sinkhorn_match",
    "benchmarks.test_match_tokens",
    "benchmarks.test_sinkhorn_knopp",
    "benchmarks.test_factorize",
    "benchmarks.test_hungarian_match",
    "benchmarks.test_train_step",
]


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit() -> str:
    """HEAD, or STELLAR_COMMIT where the tree travelled without its .git (a GPU machine)."""
    if os.environ.get("STELLAR_COMMIT"):
        return os.environ["STELLAR_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def collect(device: torch.device, quick: bool, result: dict, save: Callable[[], None]) -> None:
    """Adds every module's figures() to result; `save()` after each module, so that an
    interrupted run keeps what it had measured."""
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            result["problems"].append(f"{name}: skipped ({err})")
            continue
        if not hasattr(module, "figures"):
            continue
        try:
            got = module.figures(device, quick=quick)
        except Exception as err:  # one failing module must not lose the others' figures
            traceback.print_exc()
            result["problems"].append(f"{name}: failed ({type(err).__name__}: {err})")
            got = []
        # A module may also name what it could not measure (a baseline absent here).
        result["problems"] += [f"{name}: {p}" for p in getattr(module, "PROBLEMS", [])]
        for fig in got:
            print(json.dumps(fig), flush=True)
        result["figures"] += got
        save()


def markdown(result: dict) -> str:
    lines = [
        f"# Benchmark results: {result['card']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, {result['date']}, commit `{result['commit'][:12]}`, "
        f"copy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s (read + write)",
        "",
        "| figure | ours (ms) | against | their ms | ratio |",
        "|---|---:|---|---:|---:|",
    ]
    for f in result["figures"]:
        if "speedup" in f:
            lines.append(
                f"| {f['name']} | {f['ours_ms']:.4f} | {f['baseline']} | {f['baseline_ms']:.4f} | {f['speedup']:.2f}x |"
            )
        elif "bandwidth_fraction" in f:
            lines.append(
                f"| {f['name']} | {f['ours_ms']:.4f} | memory floor | {f['floor_ms']:.4f} | {f['bandwidth_fraction']:.2f} of floor |"
            )
        else:
            rest = {k: v for k, v in f.items() if k not in ("name", "ours_ms")}
            ours = f"{f['ours_ms']:.4f}" if "ours_ms" in f else ""
            lines.append(f"| {f['name']} | {ours} | reported | | {json.dumps(rest)} |")
    if result.get("problems"):
        lines += ["", "Not measured:", ""] + [f"- {p}" for p in result["problems"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="small sizes (a dry run)")
    args = parser.parse_args(argv)
    device = bench_device()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    result = {
        "card": card_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
        "commit": git_commit(),
        "quick": args.quick,
        "copy_bandwidth_gbs": round(copy_bandwidth_gbs(device), 1),
        "figures": [],
        "problems": [],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{result['date']}-{slug(result['card'])}"

    def save() -> None:
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(result))

    collect(device, args.quick, result, save)
    save()
    print(f"wrote {stem}.json and {stem}.md ({len(result['figures'])} figures)")
    return 1 if result["problems"] and not result["figures"] else 0


if __name__ == "__main__":
    sys.exit(main())
