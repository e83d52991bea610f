"""Build of the `stellar_kernels._C` extension, when the build can see torch.

With `pip install -e . --no-build-isolation` (or any build where torch is importable) the
C++ CPU sources compile now, and the CUDA sources too when torch has CUDA and a CUDA
toolkit is found (one line says which, or why not). A build without torch (pip's default
build isolation, an sdist) compiles nothing: the wheel carries the sources instead, and
`stellar_kernels` compiles them once on first use, against the torch it runs with.
The recipe is `stellar_kernels/_build.py`, shared by both paths.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _load_recipe():
    # By path: importing the package would import torch.
    spec = importlib.util.spec_from_file_location(
        "_stellar_build", ROOT / "stellar_kernels" / "_build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe()


class BuildPyWithSources(build_py):
    """Puts the C++/CUDA sources into the package, for the build on first use."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "stellar_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for path in recipe.shipped_files(CSRC):
            shutil.copy2(path, target / path.name)


def build_extensions(cmdclass: dict) -> list:
    try:
        import torch
    except ImportError:
        print(
            "stellar: torch is not importable in this build (build isolation?): the C++/CUDA "
            "extension compiles on first use instead; `pip install -e . --no-build-isolation` "
            "compiles it now"
        )
        return []
    cuda_home, why = recipe.cuda_plan(torch, need_gpu=False)
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = str(cuda_home)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    generated = recipe.write_record_header(
        ROOT / "build" / "stellar_generated", recipe.build_record(torch)
    )
    openmp = torch.backends.openmp.is_available()
    common = dict(
        include_dirs=[str(generated), str(CSRC)],
        extra_link_args=recipe.link_flags(openmp),
    )
    cpu_sources = [str(p.relative_to(ROOT)) for p in recipe.source_files(CSRC, with_cuda=False)]
    if cuda_home is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", recipe.DEFAULT_CUDA_ARCHS)
        print(
            f"stellar: building CUDA sources with {cuda_home} "
            f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
        all_sources = recipe.source_files(CSRC, with_cuda=True)
        ext = CUDAExtension(
            "stellar_kernels._C",
            [str(p.relative_to(ROOT)) for p in all_sources],
            define_macros=[("STELLAR_WITH_CUDA", "1")],
            extra_compile_args={"cxx": recipe.cxx_flags(openmp), "nvcc": ["-O3"]},
            **common,
        )
    else:
        print(f"stellar: CUDA sources skipped: {why}")
        ext = CppExtension(
            "stellar_kernels._C",
            cpu_sources,
            extra_compile_args={"cxx": recipe.cxx_flags(openmp)},
            **common,
        )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    return [ext]


cmdclass = {"build_py": BuildPyWithSources}
setup(ext_modules=build_extensions(cmdclass), cmdclass=cmdclass)
