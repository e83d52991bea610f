"""How the compiled extension is built: one recipe for `setup.py` (at install time) and for
the build on first use (`_extension.py`).

This module imports nothing outside the standard library at module level, so `setup.py`
can load it by path where torch is not importable (an isolated build, an sdist).

Every build carries a record of the torch it was compiled against and of the kernels it
holds, as a string constant inside the shared library (`RECORD_MARK` ... `]`, e.g.
`torch=2.14.1+cu130;cuda=13.0;cxx11abi=1;kernels=cpp,cuda`): it can be read from the file
before the library is loaded, because loading a library built for another torch may fail
opaquely, or succeed and register operators that crash later. The torch part comes from
the generated header; csrc/bindings.cpp adds `kernels=` from the same macro that compiles
the CUDA registration in, so the field cannot disagree with the library.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

RECORD_MARK = b"STELLAR_BUILD_RECORD["
RECORD_HEADER = "stellar_build_record.h"
KERNELS_FIELD = ";kernels="
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
    """What a compiled library must match in the running torch (the record without its
    `kernels=` field, which the library adds itself)."""
    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    return f"torch={torch.__version__};cuda={torch.version.cuda};cxx11abi={abi}"


def kernels(with_cuda: bool) -> str:
    return "cpp,cuda" if with_cuda else "cpp"


def full_record(torch_record: str, with_cuda: bool) -> str:
    """The record a library built for `torch_record`, with or without the CUDA sources, holds."""
    return f"{torch_record}{KERNELS_FIELD}{kernels(with_cuda)}"


def split_record(record: str) -> tuple[str, frozenset[str] | None]:
    """(the torch part, the kernels) of a record; None for a record from before `kernels=`."""
    torch_part, found, names = record.rpartition(KERNELS_FIELD)
    if not found:
        return record, None
    return torch_part, frozenset(names.split(","))


def write_record_header(folder: Path, record: str) -> Path:
    """Writes the header that bakes `record` into the library; returns its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    text = f'#pragma once\n#define STELLAR_BUILD_RECORD "{record}"\n'
    header = folder / RECORD_HEADER
    if not header.is_file() or header.read_text() != text:
        # Renamed into place: a compiler reading it never sees half a file.
        fd, tmp = tempfile.mkstemp(prefix=f".{RECORD_HEADER}.", dir=folder)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, header)
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


def source_key(csrc: Path, settings: list[str]) -> str:
    """A hash of the shipped sources (names and contents) and of the build settings: two
    versions or checkouts of the package whose sources differ in a byte never share a
    library, whatever their files' time stamps say."""
    digest = hashlib.sha256()
    for path in shipped_files(csrc):
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    for setting in settings:
        digest.update(f"{setting}\0".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Holds an exclusive lock on `path` (created if missing), calling `on_wait` first when
    another process holds it.

    An OS lock on an open file, not a file whose existence is the lock (torch's FileBaton,
    in older torch releases): the OS releases it when its holder dies, however it dies, so
    a build killed half-way never blocks the next one.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if sys.platform == "win32":
            import msvcrt

            waited = False
            while True:
                try:
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    if not waited and on_wait is not None:
                        on_wait()
                    waited = True
                    time.sleep(0.2)
        else:
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock


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
