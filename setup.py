"""Build of the `stellar_kernels._C` extension.

The C++ CPU sources always build. The CUDA sources build too when torch was
built with CUDA and a CUDA toolkit (a folder holding both ``bin/nvcc`` and
``lib64/libcudart.so``) is found; otherwise one line says why they were skipped.
Install with ``pip install -e . --no-build-isolation`` so that the build uses
the torch already installed instead of downloading a second one.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


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
    """Returns the toolkit folder, or None and the reason none was found."""
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


def build_extensions():
    cuda_home, why = find_cuda_home()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = str(cuda_home)
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = os.environ.get("STELLAR_NO_CUDA", "0") != "1"
    if torch.version.cuda is None:
        with_cuda, why = False, f"torch {torch.__version__} has no CUDA"
    elif cuda_home is None:
        with_cuda = False
    elif not with_cuda:
        why = "STELLAR_NO_CUDA=1"

    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    cxx_flags = ["-O3"]
    if sys.platform != "win32":
        cxx_flags += ["-fopenmp"] if torch.backends.openmp.is_available() else []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        cuda_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
        print(
            f"stellar: building CUDA sources with {cuda_home} "
            f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
        ext = CUDAExtension(
            "stellar_kernels._C",
            cpu_sources + cuda_sources,
            define_macros=[("STELLAR_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
        )
    else:
        print(f"stellar: CUDA sources skipped: {why}")
        ext = CppExtension(
            "stellar_kernels._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
