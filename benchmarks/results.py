"""Writes one results file with every benchmark figure (docs/benchmarks.md).

    python -m benchmarks.results --out-dir benchmarks/results [--quick] [--part core|extra]

The benchmark modules `benchmarks/test_<operator>.py` contribute fixed-name figures through
the functions GROUPS names, run in that order; a module whose baseline package is missing
returns none and prints why. `--part core` runs the groups the targets need (the newest
figures first), `--part extra` the rest, into a file of its own; without it, both.
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
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import bench_device, copy_bandwidth_gbs

GROUPS = [
    # (part, module, function returning figures). The newest figures come first, so that a
    # run cut short still has them; then the figures the targets in benchmarks/NOTES.md
    # need, the compiled training step (minutes of torch.compile) last.
    ("core", "benchmarks.test_sinkhorn_match", "rounding_figures"),
    ("core", "benchmarks.test_host_overhead", "autotune_figures"),
    ("core", "benchmarks.test_host_overhead", "figures"),
    ("core", "benchmarks.test_sinkhorn_match", "figures"),
    ("core", "benchmarks.test_match_tokens", "figures"),
    ("core", "benchmarks.test_sinkhorn_knopp", "figures"),
    ("core", "benchmarks.test_factorize", "figures"),
    ("core", "benchmarks.test_hungarian_match", "figures"),
    ("core", "benchmarks.test_train_step", "figures"),
    # No target reads these: more sizes and dtypes, quality and scaling curves.
    ("extra", "benchmarks.test_sinkhorn_knopp", "extra_figures"),
    ("extra", "benchmarks.test_match_tokens", "extra_figures"),
    ("extra", "benchmarks.test_hungarian_match", "extra_figures"),
    ("extra", "benchmarks.test_train_step", "extra_figures"),
]
PARTS = ("core", "extra", "all")


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


def collect(
    device: torch.device,
    quick: bool,
    result: dict,
    save: Callable[[], None],
    part: str = "all",
) -> None:
    """Adds the figures of every group of `part` to result, and each group's wall seconds to
    result["seconds"] (what the next run's time budget is planned from); `save()` after each
    group, so that an interrupted run keeps what it had measured."""
    for group_part, name, function in GROUPS:
        if part != "all" and group_part != part:
            continue
        label = f"{name}.{function}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            result["problems"].append(f"{label}: skipped ({err})")
            continue
        start = time.perf_counter()
        try:
            got = getattr(module, function)(device, quick=quick)
        except Exception as err:  # one failing group must not lose the others' figures
            traceback.print_exc()
            result["problems"].append(f"{label}: failed ({type(err).__name__}: {err})")
            got = []
        result["seconds"][label] = round(time.perf_counter() - start, 1)
        # A module may also name what it could not measure (a baseline absent here); a
        # module with several groups lists it once.
        for problem in getattr(module, "PROBLEMS", []):
            if f"{name}: {problem}" not in result["problems"]:
                result["problems"].append(f"{name}: {problem}")
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
    parser.add_argument(
        "--part",
        choices=PARTS,
        default="all",
        help="core: the figures the targets need, newest first; extra: the rest (a file "
        "<date>-<card>-extra); all: both, one file",
    )
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
        "part": args.part,
        "copy_bandwidth_gbs": round(copy_bandwidth_gbs(device), 1),
        "figures": [],
        "problems": [],
        "seconds": {},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-extra" if args.part == "extra" else ""
    stem = args.out_dir / f"{result['date']}-{slug(result['card'])}{suffix}"

    def save() -> None:
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(result))

    collect(device, args.quick, result, save, args.part)
    save()
    print(f"wrote {stem}.json and {stem}.md ({len(result['figures'])} figures)")
    return 1 if result["problems"] and not result["figures"] else 0


if __name__ == "__main__":
    sys.exit(main())
