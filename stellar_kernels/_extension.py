"""Loading of the compiled extension (the C++ and CUDA Hungarian solvers).

Two ways in, one library:
- built at install time (`pip install -e . --no-build-isolation`): `stellar_kernels/_C*.so`;
- built on first use: where the install could not see torch (pip's default build
  isolation), the library was built for another torch than the one running, or it lacks
  the CUDA kernels on a machine with a GPU and a CUDA toolkit. The sources compile once
  with ninja into a cache folder (`STELLAR_KERNELS_CACHE`, default
  `~/.cache/stellar_kernels`) named by a hash of the shipped sources and the build
  settings, so two versions or checkouts of the package never share a library; one line
  says so.

Every library carries a build record (`_build.py`): the torch it was built for and the
kernels it holds, read from the file before it is loaded: loading a library built for
another torch may fail opaquely, or succeed and crash later.

Processes started together (torchrun's ranks) build once: one compiles under an OS lock
on the cache folder, which the OS releases if it dies, in a build folder of its own, and
publishes the library by renaming it into place; the others wait for the lock, then load
the published file, which is complete whenever it exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from . import _build

PACKAGE_DIR = Path(__file__).resolve().parent
JIT_NAME = "stellar_kernels_ext"
LIBRARY_NAME = f"{JIT_NAME}.so"


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


def why_not_installed(
    library: Path | None, running: str, cuda_home: Path | None = None
) -> str | None:
    """Why the install-time library cannot be loaded into this torch (`running`, its build
    record); None when it can. With `cuda_home` (a GPU and a toolkit are here) a library
    without the CUDA kernels is refused too: the build on first use adds them."""
    if library is None:
        return "no extension was built at install time"
    record = _build.read_record(library)
    if record is None:
        return f"{library.name} holds no build record (built by an older version)"
    built_for, kernels = _build.split_record(record)
    if built_for != running:
        return f"{library.name} was built for {built_for}, this is {running}"
    if kernels is None:
        return f"{library.name} holds a build record without kernels= (built by an older version)"
    if cuda_home is not None and "cuda" not in kernels:
        return (
            f"{library.name} holds no CUDA kernels (kernels={','.join(sorted(kernels))}), and "
            f"this machine has a GPU and the CUDA toolkit {cuda_home}"
        )
    return None


def fix_command() -> str:
    if _build.sources_dir(PACKAGE_DIR) == PACKAGE_DIR.parent / "csrc":
        return f"pip install -e {PACKAGE_DIR.parent} --no-build-isolation --no-deps"
    return "pip install --force-reinstall --no-deps --no-build-isolation stellar-ssl"


def _cuda_archs() -> str:
    """The architectures a CUDA build on first use compiles for: TORCH_CUDA_ARCH_LIST, else
    (as torch's build does then) the visible GPUs', part of the cache key so that a cache
    shared between machines with different GPUs never serves one a library it cannot run."""
    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if chosen and chosen != "native":
        return chosen
    visible = sorted(
        {
            "{}.{}".format(*torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())
        }
    )
    return f"{chosen or 'visible'}:{';'.join(visible)}"


def _cache_error(folder: Path, err: OSError) -> RuntimeError:
    return RuntimeError(
        f"stellar_kernels: cannot write the extension's build cache {folder} "
        f"({err.strerror or err}): set STELLAR_KERNELS_CACHE to a writable folder, or build "
        f"the extension at install time: `{fix_command()}`"
    )


def _load_published(library: Path) -> Path:
    try:
        torch.ops.load_library(str(library))
    except OSError as err:
        raise RuntimeError(
            f"stellar_kernels: the compiled extension {library} does not load: {err}; delete "
            f"{library.parent} to build it again"
        ) from err
    return library


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """One build on first use: what it compiles, how, and where the library goes."""

    csrc: Path
    cuda_home: Path | None
    cflags: list[str]
    cuda_cflags: list[str]
    ldflags: list[str]
    torch_record: str
    folder: Path

    @property
    def library(self) -> Path:
        return self.folder / LIBRARY_NAME

    @property
    def record(self) -> str:
        """The record the library must hold."""
        return _build.full_record(self.torch_record, self.cuda_home is not None)

    def published(self) -> bool:
        # Published by a rename, so a file here is whole; the folder's key says it was
        # built from these sources with these settings, and the record is checked all the same.
        return self.library.is_file() and _build.read_record(self.library) == self.record


def _recipe(csrc: Path, cuda_home: Path | None) -> _Recipe:
    with_cuda = cuda_home is not None
    openmp = torch.backends.openmp.is_available()
    defines = ["-DSTELLAR_WITH_CUDA=1"] if with_cuda else []
    cflags = _build.cxx_flags(openmp) + defines
    cuda_cflags = ["-O3", *defines]
    ldflags = _build.link_flags(openmp)
    torch_record = _build.build_record(torch)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    settings = [
        _build.full_record(torch_record, with_cuda),
        py,
        platform.machine(),
        *cflags,
        "|",
        *cuda_cflags,
        "|",
        *ldflags,
    ]
    if with_cuda:
        settings.append(_cuda_archs())
    kind = "cpp_cuda" if with_cuda else "cpp"
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-{py}-{platform.machine()}-{kind}"
    folder = cache_root() / f"{tag.replace('+', '_')}-{_build.source_key(csrc, settings)}"
    return _Recipe(csrc, cuda_home, cflags, cuda_cflags, ldflags, torch_record, folder)


def _build_on_first_use(reason: str, cuda_home: Path | None, cuda_why: str) -> Path:
    """Compiles the sources against the running torch, once: later calls load the cache."""
    csrc = _build.sources_dir(PACKAGE_DIR)
    if csrc is None:
        raise RuntimeError(
            f"stellar_kernels: cannot build the C++ extension ({reason}): its sources are not "
            f"installed; reinstall with `{fix_command()}`"
        )
    recipe = _recipe(csrc, cuda_home)
    if recipe.published():
        return _load_published(recipe.library)
    folder = recipe.folder
    with contextlib.ExitStack() as held:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            held.enter_context(
                _build.exclusive_lock(
                    folder / "build.lock",
                    on_wait=lambda: print(
                        "stellar_kernels: waiting for another process compiling the extension "
                        f"into {folder}",
                        file=sys.stderr,
                        flush=True,
                    ),
                )
            )
        except OSError as err:
            raise _cache_error(folder, err) from None
        if not recipe.published():  # else another process published it while this one waited
            what = "C++ and CUDA sources" if cuda_home is not None else f"C++ sources ({cuda_why})"
            print(
                f"stellar_kernels: compiling the extension for torch {torch.__version__} once, "
                f"{what}, into {folder} ({reason})",
                file=sys.stderr,
                flush=True,
            )
            _compile_and_publish(recipe, reason)
            return recipe.library
    return _load_published(recipe.library)


def _compile_and_publish(recipe: _Recipe, reason: str) -> None:
    """Compiles and loads the library, then renames it into place; under the build lock."""
    # What a build killed half-way left: its holder is gone, since this process holds the lock.
    for stale in recipe.folder.glob("build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        # A folder per attempt: nothing a dead build left is in the way (not even torch's own
        # lock file, a FileBaton in older releases, which stays if its holder is killed), and
        # a compiler it left running writes elsewhere.
        build_dir = Path(tempfile.mkdtemp(prefix="build-", dir=recipe.folder))
        _build.write_record_header(build_dir, recipe.torch_record)
    except OSError as err:
        raise _cache_error(recipe.folder, err) from None
    cuda_home = recipe.cuda_home
    toolkit = cuda_home or _build.find_cuda_home()[0]
    if toolkit is not None and "torch.utils.cpp_extension" not in sys.modules:
        # cpp_extension guesses CUDA_HOME once, when imported; the guess from `which
        # nvcc` can name a folder without the runtime library.
        os.environ.setdefault("CUDA_HOME", str(toolkit))
    from torch.utils import cpp_extension

    if cuda_home is not None and cpp_extension.CUDA_HOME != str(cuda_home):
        cpp_extension.CUDA_HOME = str(cuda_home)  # imported before with another guess
    try:
        built = cpp_extension.load(
            name=JIT_NAME,
            sources=[str(p) for p in _build.source_files(recipe.csrc, cuda_home is not None)],
            extra_cflags=recipe.cflags,
            extra_cuda_cflags=recipe.cuda_cflags,
            extra_ldflags=recipe.ldflags,
            extra_include_paths=[str(build_dir), str(recipe.csrc)],
            build_directory=str(build_dir),
            with_cuda=cuda_home is not None,
            is_python_module=False,
        )
    except Exception as err:  # a compiler's or ninja's failure, in whatever type torch raises
        raise RuntimeError(
            f"stellar_kernels: compiling the C++ extension for torch {torch.__version__} failed "
            f"({reason}): {err}\nFix the error above (a C++ compiler and `pip install ninja` "
            f"are needed), or build it at install time: `{fix_command()}`"
        ) from err
    # load() is documented to return nothing here; torch returns the path it loaded, whose
    # name carries a suffix when one process builds twice.
    built_path = Path(built) if isinstance(built, str) else build_dir / LIBRARY_NAME
    # The rename publishes, whole, the very file (inode) this process has just loaded.
    os.replace(built_path, recipe.library)
    shutil.rmtree(build_dir, ignore_errors=True)


@functools.cache
def load_extension() -> Path:
    """Loads the extension's operators (torch.ops.stellar_ext) once; returns the library."""
    # A toolkit only counts where a GPU is visible: nothing else could run the CUDA kernels.
    cuda_home, cuda_why = _build.cuda_plan(torch, need_gpu=True)
    library = installed_library()
    why = why_not_installed(library, _build.build_record(torch), cuda_home)
    if why is None:
        try:
            from . import _C  # noqa: F401  (loading registers the operators)

            return library
        except (ImportError, OSError) as err:
            why = f"{library.name} does not load: {err}"
    return _build_on_first_use(why, cuda_home, cuda_why)


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
