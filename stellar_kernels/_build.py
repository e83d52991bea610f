"""How the compiled extension is built: one recipe for `setup.py` (at install time) and for
the build on first use (`_extension.py`).

This module imports nothing outside the standard library at module level, so `setup.py`
can load it by path where torch is not importable (an isolated build, an sdist).

Every build carries a record of the torch it was compiled against, as a string constant
inside the shared library (`RECORD_MARK` ... `]`): it can be read from the file before
the library is loaded, because loading a library built for another torch may fail
opaquely, or succeed and register operators that crash later.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

RECORD_MARK = b"STELLAR_BUILD_RECORD["
RECORD_HEADER = "stellar_build_record.h"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def sources_dir(package_dir: Path) -> Path | None:
    """The C++/CUDA sources: inside the installed package (wheels carry them), else the
    repository's csrc/ beside the package (a source checkout or an editable install)."""
    for folder in (package_dir / "csrc", package_dir.parent / "csrc"):
        if (folder / "bindings.cpp").is_file():
            return folder
    return None


def source_files(csrc: Path, with_cuda: bool) -> list[Path]:
    files = sorted(csrc.glob("*.cpp"))
    return files + (sorted(csrc.glob("*.cu")) if with_cuda else [])


def shipped_files(csrc: Path) -> list[Path]:
    """What a wheel must carry to build on first use: the sources and their headers."""
    return sorted(p for ext in ("*.cpp", "*.cu", "*.h", "*.cuh") for p in csrc.glob(ext))


def build_record(torch: ModuleType) -> str:
    """What a compiled library must match in the running torch."""
    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    return f"torch={torch.__version__};cuda={torch.version.cuda};cxx11abi={abi}"


def write_record_header(folder: Path, record: str) -> Path:
    """Writes the header that bakes `record` into the library; returns its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    text = f'#pragma once\n#define STELLAR_BUILD_RECORD "{record}"\n'
    header = folder / RECORD_HEADER
    if not header.is_file() or header.read_text() != text:
        header.write_text(text)
    return folder


def read_record(library: Path) -> str | None:
    """The build record inside a compiled library, None if it holds none."""
    data = library.read_bytes()
    start = data.find(RECORD_MARK)
    if start < 0:
        return None
    start += len(RECORD_MARK)
    end = data.find(b"]", start)
    return data[start:end].decode("ascii", "replace") if end > 0 else None


def cxx_flags(openmp: bool) -> list[str]:
    return ["-O3"] + (["-fopenmp"] if openmp and sys.platform != "win32" else [])


def link_flags(openmp: bool) -> list[str]:
    return ["-fopenmp"] if openmp and sys.platform != "win32" else []


# ----------------------------------------------------------------------------- CUDA toolkit


def _is_toolkit(folder: Path) -> bool:
    has_nvcc = (folder / "bin" / "nvcc").is_file()
    has_cudart = any(
        (folder / lib / "libcudart.so").exists() or (folder / lib / "cudart.lib").exists()
        for lib in ("lib64", "lib", "lib/x64")
    )
    return has_nvcc and has_cudart


def _nvcc_reported_home(nvcc: str) -> Path | None:
    """Asks nvcc where it really lives: a wrapper script on PATH is not the toolkit."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if "_HERE_=" in line:
            return Path(line.split("_HERE_=", 1)[1].strip()).resolve().parent
    return None


def find_cuda_home() -> tuple[Path | None, str]:
    """The toolkit folder (one holding both bin/nvcc and lib64/libcudart.so), or None and
    the reason none was found.

    The folder of `nvcc` on the PATH is not enough: it may be a wrapper, or a toolkit
    without the runtime library, so nvcc is also asked where it lives.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_toolkit(Path(value)):
                return Path(value), ""
            return None, f"{var}={value} holds no bin/nvcc with lib64/libcudart.so"
    candidates: list[Path] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
        reported = _nvcc_reported_home(nvcc)
        if reported is not None:
            candidates.append(reported)
    candidates += [Path("/usr/local/cuda")] + sorted(
        Path(p) for p in glob.glob("/usr/local/cuda-*")
    )
    for folder in candidates:
        if _is_toolkit(folder):
            return folder, ""
    return (
        None,
        "no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc and lib64/libcudart.so)",
    )


def cuda_plan(torch: ModuleType, need_gpu: bool) -> tuple[Path | None, str]:
    """The toolkit to compile the CUDA sources with, or None and why they are skipped.

    At install time (need_gpu=False) the CUDA sources build wherever torch has CUDA and a
    toolkit is found, GPU or not; on first use only where a GPU is visible, since nothing
    else could run them.
    """
    if os.environ.get("STELLAR_NO_CUDA", "0") == "1":
        return None, "STELLAR_NO_CUDA=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} has no CUDA"
    if need_gpu and not torch.cuda.is_available():
        return None, "no GPU visible"
    return find_cuda_home()
