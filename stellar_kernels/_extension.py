"""Loading of the compiled extension (the C++ and CUDA Hungarian solvers).

Two ways in, one library:
- built at install time (`pip install -e . --no-build-isolation`): `stellar_kernels/_C*.so`;
- built on first use: where the install could not see torch (pip's default build
  isolation) or the library was built for another torch than the one running, the
  sources compile once with ninja into a cache folder per torch version and ABI
  (`STELLAR_KERNELS_CACHE`, default `~/.cache/stellar_kernels`); one line says so.

Every library carries a record of the torch it was built for (`_build.py`), read from
the file before it is loaded: loading a library built for another torch may fail
opaquely, or succeed and crash later.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import sys
from pathlib import Path

import torch

from . import _build

PACKAGE_DIR = Path(__file__).resolve().parent
JIT_NAME = "stellar_kernels_ext"


def cache_root() -> Path:
    explicit = os.environ.get("STELLAR_KERNELS_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stellar_kernels"


def installed_library() -> Path | None:
    """The library built at install time, found without loading it."""
    try:
        spec = importlib.util.find_spec("stellar_kernels._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    return Path(spec.origin)


def why_not_installed(library: Path | None, running: str) -> str | None:
    """Why the install-time library cannot be loaded into this torch; None when it can."""
    if library is None:
        return "no extension was built at install time"
    record = _build.read_record(library)
    if record is None:
        return f"{library.name} holds no build record (built by an older version)"
    if record != running:
        return f"{library.name} was built for {record}, this is {running}"
    return None


def fix_command() -> str:
    if _build.sources_dir(PACKAGE_DIR) == PACKAGE_DIR.parent / "csrc":
        return f"pip install -e {PACKAGE_DIR.parent} --no-build-isolation --no-deps"
    return "pip install --force-reinstall --no-deps --no-build-isolation stellar-ssl"


def _build_on_first_use(reason: str) -> Path:
    """Compiles the sources against the running torch, once: later calls load the cache."""
    csrc = _build.sources_dir(PACKAGE_DIR)
    if csrc is None:
        raise RuntimeError(
            f"stellar_kernels: cannot build the C++ extension ({reason}): its sources are not "
            f"installed; reinstall with `{fix_command()}`"
        )
    cuda_home, cuda_why = _build.cuda_plan(torch, need_gpu=True)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    kind = "cuda" if cuda_home is not None else "cpu"
    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))  # one torch version shipped both ABIs
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-abi{abi}-{py}-{platform.machine()}-{kind}"
    folder = cache_root() / tag.replace("+", "_")
    built = folder / f"{JIT_NAME}.so"
    newest_source = max(p.stat().st_mtime for p in _build.shipped_files(csrc))
    if built.is_file() and built.stat().st_mtime >= newest_source:
        try:
            torch.ops.load_library(str(built))
            return built
        except OSError:
            pass  # half written by another process: compile() below waits for its lock
    what = "C++ and CUDA sources" if cuda_home is not None else f"C++ sources ({cuda_why})"
    print(
        f"stellar_kernels: compiling the extension for torch {torch.__version__} once, "
        f"{what}, into {folder} ({reason})",
        file=sys.stderr,
        flush=True,
    )
    toolkit = cuda_home or _build.find_cuda_home()[0]
    if toolkit is not None and "torch.utils.cpp_extension" not in sys.modules:
        # cpp_extension guesses CUDA_HOME once, when imported; the guess from `which
        # nvcc` can name a folder without the runtime library.
        os.environ.setdefault("CUDA_HOME", str(toolkit))
    from torch.utils import cpp_extension

    if cuda_home is not None and cpp_extension.CUDA_HOME != str(cuda_home):
        cpp_extension.CUDA_HOME = str(cuda_home)  # imported before with another guess
    openmp = torch.backends.openmp.is_available()
    defines = ["-DSTELLAR_WITH_CUDA=1"] if cuda_home is not None else []
    _build.write_record_header(folder, _build.build_record(torch))
    try:
        cpp_extension.load(
            name=JIT_NAME,
            sources=[str(p) for p in _build.source_files(csrc, with_cuda=cuda_home is not None)],
            extra_cflags=_build.cxx_flags(openmp) + defines,
            extra_cuda_cflags=["-O3", *defines],
            extra_ldflags=_build.link_flags(openmp),
            extra_include_paths=[str(folder), str(csrc)],
            build_directory=str(folder),
            with_cuda=cuda_home is not None,
            is_python_module=False,
        )
    except Exception as err:  # a compiler's or ninja's failure, in whatever type torch raises
        raise RuntimeError(
            f"stellar_kernels: compiling the C++ extension for torch {torch.__version__} failed "
            f"({reason}): {err}\nFix the error above (a C++ compiler and `pip install ninja` "
            f"are needed), or build it at install time: `{fix_command()}`"
        ) from err
    return built


@functools.cache
def load_extension() -> Path:
    """Loads the extension's operators (torch.ops.stellar_ext) once; returns the library."""
    library = installed_library()
    why = why_not_installed(library, _build.build_record(torch))
    if why is None:
        try:
            from . import _C  # noqa: F401  (loading registers the operators)

            return library
        except (ImportError, OSError) as err:
            why = f"{library.name} does not load: {err}"
    return _build_on_first_use(why)


@torch.compiler.assume_constant_result
def ensure_loaded() -> bool:
    """load_extension() for code that torch.compile traces: run once, outside the graph
    (tracing cannot follow a compiler run or file reads, and needs the operators loaded)."""
    load_extension()
    return True


@functools.cache
def _holds_cuda_kernels() -> bool:
    load_extension()
    return bool(torch.ops.stellar_ext.cuda_built())


@torch.compiler.assume_constant_result
def cuda_extension_built() -> bool:
    """Whether the loaded extension holds the CUDA kernels."""
    return _holds_cuda_kernels()
