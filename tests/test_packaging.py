"""Packaging: what pip builds without torch in sight (its default build isolation), the
sdist and the wheel, the build record that keeps a library away from a torch it was not
built for, and the names, license, citation and version.

The builds run through setuptools' PEP 517 hooks in a subprocess where `import torch`
fails, as it does in an isolated build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import stellar
import stellar_kernels
from stellar_kernels import _build, _extension

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SOURCES = {p.name for p in _build.shipped_files(ROOT / "csrc")}


def tracked_copy(dest: Path) -> Path:
    """The repository's files as a clean clone holds them (no build outputs)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    for name in out.stdout.splitlines():
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


def build_without_torch(tmp_path: Path, hook: str) -> tuple[Path, str]:
    """Runs a PEP 517 build hook with torch unimportable; returns the artifact and the log."""
    src = tracked_copy(tmp_path / "src")
    out = tmp_path / "dist"
    out.mkdir()
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # import torch raises ImportError, as in build isolation
        from setuptools import build_meta
        print("ARTIFACT=" + build_meta.{hook}({str(out)!r}))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=src, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    name = run.stdout.rsplit("ARTIFACT=", 1)[1].strip()
    return out / name, run.stdout + run.stderr


def test_sdist_builds_without_torch_and_holds_everything_a_build_needs(tmp_path):
    sdist, log = build_without_torch(tmp_path, "build_sdist")
    assert sdist.name == f"stellar_ssl-{stellar_kernels.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"setup.py", "pyproject.toml", "README.md", "LICENSE", "CITATION.cff"}
    needed |= {f"csrc/{name}" for name in SHIPPED_SOURCES}
    needed |= {"stellar_kernels/_build.py", "stellar_kernels/_extension.py"}
    needed |= {f"stellar/configs/{p.name}" for p in (ROOT / "stellar" / "configs").glob("*.yaml")}
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    assert not [n for n in names if n.endswith(".so")], "a compiled library in the sdist"


def test_wheel_built_without_torch_carries_the_sources_for_the_first_use(tmp_path):
    wheel, log = build_without_torch(tmp_path, "build_wheel")
    assert "compiles on first use" in log
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(meta_name).decode()
    sources = {f"stellar_kernels/csrc/{name}" for name in SHIPPED_SOURCES}
    assert not sources - names, f"missing from the wheel: {sorted(sources - names)}"
    assert "stellar/configs/base.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Name: stellar-ssl\n" in metadata
    assert "License-Expression: Apache-2.0\n" in metadata
    assert "Requires-Dist: ninja" in metadata


# ----------------------------------------------------------------------------- build record


def fake_library(path: Path, record: str | None) -> Path:
    body = b"\x7fELF" + os.urandom(64)
    if record is not None:
        body += _build.RECORD_MARK + record.encode() + b"]" + os.urandom(64)
    path.write_bytes(body)
    return path


def test_build_record_is_read_from_the_file(tmp_path):
    running = _build.build_record(torch)
    assert f"torch={torch.__version__};" in running
    library = fake_library(tmp_path / "lib.so", running)
    assert _build.read_record(library) == running
    assert _build.read_record(fake_library(tmp_path / "old.so", None)) is None


def test_build_record_names_the_kernels():
    running = _build.build_record(torch)
    assert _build.full_record(running, with_cuda=False) == f"{running};kernels=cpp"
    assert _build.full_record(running, with_cuda=True) == f"{running};kernels=cpp,cuda"
    assert _build.split_record(f"{running};kernels=cpp,cuda") == (
        running,
        frozenset({"cpp", "cuda"}),
    )
    assert _build.split_record(running) == (running, None)


def test_only_a_library_built_for_this_torch_is_loaded(tmp_path):
    running = _build.build_record(torch)
    cpp = _build.full_record(running, with_cuda=False)
    assert _extension.why_not_installed(fake_library(tmp_path / "a.so", cpp), running) is None
    foreign = "torch=2.4.0;cuda=12.1;cxx11abi=0"
    why = _extension.why_not_installed(
        fake_library(tmp_path / "b.so", f"{foreign};kernels=cpp"), running
    )
    assert why is not None and foreign in why and running in why
    why = _extension.why_not_installed(fake_library(tmp_path / "c.so", None), running)
    assert why is not None and "no build record" in why
    # A record from before kernels= says nothing of the CUDA kernels: built again.
    why = _extension.why_not_installed(fake_library(tmp_path / "d.so", running), running)
    assert why is not None and "kernels=" in why
    assert "at install time" in _extension.why_not_installed(None, running)


def test_a_library_without_cuda_kernels_is_refused_where_a_gpu_meets_a_toolkit(tmp_path):
    """cuda_home is what load_extension passes where a GPU is visible and a toolkit found:
    there a library built without the CUDA kernels is rebuilt with them on first use."""
    running = _build.build_record(torch)
    toolkit = Path("/opt/cuda-toolkit")
    cpp = fake_library(tmp_path / "a.so", _build.full_record(running, with_cuda=False))
    why = _extension.why_not_installed(cpp, running, cuda_home=toolkit)
    assert why is not None and "no CUDA kernels" in why and str(toolkit) in why
    both = fake_library(tmp_path / "b.so", _build.full_record(running, with_cuda=True))
    assert _extension.why_not_installed(both, running, cuda_home=toolkit) is None
    assert _extension.why_not_installed(both, running) is None


def test_the_loaded_library_was_built_for_this_torch_and_names_its_kernels():
    library = _extension.load_extension()
    expected = _build.full_record(_build.build_record(torch), _extension.cuda_extension_built())
    assert _build.read_record(library) == expected
    assert torch.ops.stellar_ext.build_record() == f"{_build.RECORD_MARK.decode()}{expected}]"


def test_a_library_built_for_another_torch_is_not_loaded_but_rebuilt(tmp_path):
    """In a fresh process, on a cache of its own: the install-time library claims another
    torch, so the extension is compiled for this torch instead, and works."""
    fake = fake_library(tmp_path / "_C.so", "torch=0.0.1;cuda=None;cxx11abi=0;kernels=cpp")
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        import torch
        from stellar_kernels import _build, _extension
        _extension.installed_library = lambda: Path({str(fake)!r})
        library = _extension.load_extension()
        assert library != Path({str(fake)!r}), library
        assert _build.read_record(library) == _build.build_record(torch) + ";kernels=cpp", library
        index = torch.ops.stellar_ext.hungarian(torch.tensor([[[2.0, 1.0], [1.0, 3.0]]]), False)[0]
        assert index.tolist() == [[1, 0]], index
        print("LOADED", library)
        """
    )
    cache = tmp_path / "cache"
    # STELLAR_NO_CUDA: the C++ sources are enough to show the rebuild, and quick on a GPU too.
    env = dict(os.environ, STELLAR_KERNELS_CACHE=str(cache), STELLAR_NO_CUDA="1")
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "LOADED" in run.stdout
    assert "compiling the extension" in run.stderr, run.stderr
    assert "was built for torch=0.0.1" in run.stderr, run.stderr
    loaded = Path(run.stdout.rsplit("LOADED", 1)[1].strip())
    assert loaded.is_relative_to(cache), loaded


# ----------------------------------------------------------------------------- names


def test_versions_license_and_citation_agree():
    assert stellar.__version__ == stellar_kernels.__version__
    assert (ROOT / "LICENSE").read_text().startswith("Apache License\nVersion 2.0")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["version"] == stellar_kernels.__version__
    assert citation["license"] == "Apache-2.0"
    paper = citation["preferred-citation"]
    assert (
        paper["title"]
        == "Learning Sparse Visual Representations via Spatial-Semantic Factorization"
    )
    readme = (ROOT / "README.md").read_text()
    assert paper["url"] in readme and "@article{" in readme


# ----------------------------------------------------------------------------- installs


def fresh_venv_with_this_torch(folder: Path) -> Path:
    """A new virtual environment that sees this environment's packages (torch and the
    rest) through a .pth file, as a user's venv holds the torch they installed."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    python = folder / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    (Path(site) / "outer_site.pth").write_text("\n".join(ours) + "\n")
    return python


@pytest.mark.slow
def test_sdist_installs_with_pip_and_its_operators_work(tmp_path):
    """pip install <the sdist file> (pip's default build isolation: the build sees no
    torch) into a fresh venv holding torch: the first call compiles, the Hungarian matches
    scipy's optimum."""
    sdist, _ = build_without_torch(tmp_path, "build_sdist")
    python = fresh_venv_with_this_torch(tmp_path / "venv")
    env = dict(os.environ, STELLAR_KERNELS_CACHE=str(tmp_path / "cache"))
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", str(sdist)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    check = textwrap.dedent(
        """
        import numpy as np, torch
        from scipy.optimize import linear_sum_assignment
        import stellar_kernels as sk
        assert "site-packages" in sk.__file__, sk.__file__
        cost = torch.rand(8, 7, 11, dtype=torch.float64)
        index = sk.hungarian_match(cost, backend="cpp")
        for c, i in zip(cost.numpy(), index.numpy()):
            r, col = linear_sum_assignment(c)
            assert np.isclose(c[np.arange(7), i].sum(), c[r, col].sum())
        print("OK")
        """
    )
    run = subprocess.run(
        [str(python), "-c", check],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    assert "compiling the extension" in run.stderr
