"""The build of the compiled extension on first use (stellar_kernels/_extension.py): its cache
is keyed by the sources and the build settings, processes started together build once, a
build killed half-way does not block the next, an unwritable cache says what to set, and a
GPU machine never solves hungarian_match on the host without a word.

Every test that builds runs in fresh processes on a cache of its own (STELLAR_KERNELS_CACHE
under tmp_path), so each build it expects happens and is asserted. The tests of the cache
itself build a tiny source tree (one file, compiled in about a second) inside a copy of the
package, as a second checkout or another version of the package would hold it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from stellar_kernels import _build, _extension, hungarian

ROOT = Path(__file__).resolve().parents[1]
COMPILING = "stellar_kernels: compiling the extension"

# The answer of the real solver to one problem: scipy's linear_sum_assignment gives [1, 0, 2].
REAL_SOURCES = textwrap.dedent(
    """
    import torch
    from stellar_kernels import _build, _extension
    _extension.installed_library = lambda: None  # as after pip's isolated build
    library = _extension.load_extension()
    cost = torch.tensor([[[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]])
    print("LIBRARY", library)
    print("RECORD", _build.read_record(library))
    print("ANSWER", torch.ops.stellar_ext.hungarian(cost, False)[0].tolist())
    """
)

# A source tree of one file: the build record, as csrc/bindings.cpp bakes it, and an answer
# that tells the trees apart.
TINY_BINDINGS = """\
#include "stellar_build_record.h"
#ifdef STELLAR_WITH_CUDA
#define STELLAR_KERNELS "cpp,cuda"
#else
#define STELLAR_KERNELS "cpp"
#endif
extern "C" __attribute__((used)) const char kBuildRecord[] =
    "STELLAR_BUILD_RECORD[" STELLAR_BUILD_RECORD ";kernels=" STELLAR_KERNELS "]";
extern "C" int stellar_tree_answer() { return ANSWER; }
"""

TINY_TREE = textwrap.dedent(
    """
    import ctypes
    from pathlib import Path
    from stellar_kernels import _extension
    assert _extension.PACKAGE_DIR == Path.cwd().resolve() / "stellar_kernels", _extension.PACKAGE_DIR
    library = _extension.load_extension()
    print("LIBRARY", library)
    print("ANSWER", ctypes.CDLL(str(library)).stellar_tree_answer())
    """
)


def env_with_cache(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, STELLAR_KERNELS_CACHE=str(cache), PYTHONUNBUFFERED="1")
    env.pop("STELLAR_KERNELS_BACKEND", None)
    env.update(extra)
    return env


def run_python(
    script: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def lines_after(tag: str, out: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(tag + " ")]


def tiny_checkout(folder: Path, answer: int, age_s: float = 0.0) -> Path:
    """A copy of the package beside a one-file csrc/ whose library answers `answer`; its
    sources dated `age_s` seconds back."""
    package = folder / "stellar_kernels"
    package.mkdir(parents=True)
    for source in (ROOT / "stellar_kernels").glob("*.py"):
        shutil.copy2(source, package / source.name)
    csrc = folder / "csrc"
    csrc.mkdir()
    bindings = csrc / "bindings.cpp"
    bindings.write_text(TINY_BINDINGS.replace("ANSWER", str(answer)))
    if age_s:
        stamp = time.time() - age_s
        os.utime(bindings, (stamp, stamp))
    return folder


def assert_ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


# ----------------------------------------------------------------------------- the cache


def test_four_processes_started_together_build_once_and_load_one_library(tmp_path):
    """As torchrun starts its ranks: four processes on an empty cache. One compiles, the
    others wait for it; all load the one published library and give the same answer."""
    env = env_with_cache(tmp_path / "cache", STELLAR_NO_CUDA="1")
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", REAL_SOURCES],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    for rank, (out, err) in zip(ranks, outputs):
        assert rank.returncode == 0, out[-3000:] + err[-3000:]
    libraries = {lib for out, _ in outputs for lib in lines_after("LIBRARY", out)}
    assert len(libraries) == 1, libraries
    library = Path(libraries.pop())
    assert library.is_relative_to(tmp_path / "cache"), library
    assert {a for out, _ in outputs for a in lines_after("ANSWER", out)} == {"[[1, 0, 2]]"}
    stderr = "".join(err for _, err in outputs)
    assert stderr.count(COMPILING) == 1, stderr[-3000:]
    expected = f"{_build.build_record(torch)};kernels=cpp"
    assert {r for out, _ in outputs for r in lines_after("RECORD", out)} == {expected}
    # Nothing of the build is left beside the library but the lock file.
    assert sorted(p.name for p in library.parent.iterdir()) == ["build.lock", library.name]


def test_two_source_trees_beside_one_cache_each_load_their_own_library(tmp_path):
    """Two checkouts (or versions) of the package beside one torch and one cache: the second
    one's sources differ and are older than the first one's library, which a time stamp
    would call fresh. Each loads its own build."""
    env = env_with_cache(tmp_path / "cache")
    first = tiny_checkout(tmp_path / "first", answer=1)
    second = tiny_checkout(tmp_path / "second", answer=2, age_s=86400)
    runs = {}
    for name, tree in (("first", first), ("second", second), ("first again", first)):
        runs[name] = run_python(TINY_TREE, env, cwd=tree)
        assert_ok(runs[name])
    answers = {name: lines_after("ANSWER", run.stdout) for name, run in runs.items()}
    assert answers == {"first": ["1"], "second": ["2"], "first again": ["1"]}
    libraries = {name: lines_after("LIBRARY", run.stdout)[0] for name, run in runs.items()}
    assert libraries["first"] != libraries["second"]
    assert libraries["first again"] == libraries["first"]
    assert COMPILING in runs["second"].stderr
    assert COMPILING not in runs["first again"].stderr, "the first tree's build was not kept"


# What torch releases before its OS lock did, for the test of a killed build: a lock file
# whose existence is the lock (FileBaton), which stays when its holder is killed. Run by both
# processes of that test, so that the case holds for every torch the package supports.
OLDER_TORCH_LOCK = textwrap.dedent(
    """
    from torch.utils import cpp_extension, file_baton

    class _Baton:
        def __init__(self, path):
            self.baton = file_baton.FileBaton(path)

        def __enter__(self):
            while not self.baton.try_acquire():
                self.baton.wait()

        def __exit__(self, *exc):
            self.baton.release()

    if hasattr(cpp_extension, "FileLock"):
        cpp_extension.FileLock = _Baton
    """
)

# A compiler that, when told to, hangs in its first compile after writing its pid (ninja runs
# each command in a process group of its own, so killing the builder's group leaves it
# running, as killing a job's main process would; the test ends it).
SLOW_CXX = """\
#!/bin/sh
case " $* " in
  *" -c "*) if [ -n "$STELLAR_TEST_HANG_MARK" ]; then
      echo $$ > "$STELLAR_TEST_HANG_MARK.tmp" && mv "$STELLAR_TEST_HANG_MARK.tmp" "$STELLAR_TEST_HANG_MARK"
      exec sleep 600
    fi ;;
esac
exec c++ "$@"
"""


def test_a_process_after_a_build_killed_mid_compile_succeeds(tmp_path):
    """A build killed half-way (SIGKILL to its process group, as a job scheduler or the OOM
    killer ends a rank) leaves its files and, with older torch releases, a lock file; the
    next process builds and loads within 300 s, its own build included."""
    if shutil.which("c++") is None:
        pytest.skip("no c++ compiler on PATH")
    tree = tiny_checkout(tmp_path / "tree", answer=7)
    cxx = tmp_path / "slow-c++"
    cxx.write_text(SLOW_CXX)
    cxx.chmod(0o755)
    mark = tmp_path / "compiling"
    cache = tmp_path / "cache"
    script = OLDER_TORCH_LOCK + TINY_TREE
    builder = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tree,
        env=env_with_cache(cache, CXX=str(cxx), STELLAR_TEST_HANG_MARK=str(mark)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not mark.exists():
            if builder.poll() is not None:
                out, err = builder.communicate()
                pytest.fail(f"the build ended before it was killed:\n{out[-2000:]}{err[-2000:]}")
            assert time.monotonic() < deadline, "the compiler never started"
            time.sleep(0.1)
    finally:
        os.killpg(builder.pid, signal.SIGKILL)
        builder.communicate()
        if mark.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(mark.read_text()), signal.SIGKILL)
    assert any(cache.rglob("*")), "the killed build left nothing behind"

    start = time.monotonic()
    after = run_python(script, env_with_cache(cache, CXX=str(cxx)), cwd=tree, timeout=300)
    assert_ok(after)
    assert lines_after("ANSWER", after.stdout) == ["7"]
    assert COMPILING in after.stderr
    assert time.monotonic() - start < 300


@pytest.mark.parametrize("how", ["a file in the way", "read-only folder"])
def test_an_unwritable_cache_names_stellar_kernels_cache_in_one_line(tmp_path, monkeypatch, how):
    if how == "a file in the way":
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "cache"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        cache = tmp_path / "read-only"
        cache.mkdir(mode=0o500)
    monkeypatch.setenv("STELLAR_KERNELS_CACHE", str(cache))
    monkeypatch.setattr(_extension, "installed_library", lambda: None)
    with pytest.raises(RuntimeError) as raised:
        _extension.load_extension.__wrapped__()  # not the cached loader: a build on first use
    message = str(raised.value)
    assert "\n" not in message and "STELLAR_KERNELS_CACHE" in message, message
    assert str(cache) in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_the_cache_key_follows_the_sources_and_the_settings_not_the_folder(tmp_path):
    first = tiny_checkout(tmp_path / "first", answer=1) / "csrc"
    same = tiny_checkout(tmp_path / "same", answer=1) / "csrc"
    other = tiny_checkout(tmp_path / "other", answer=2) / "csrc"
    settings = ["torch=x;kernels=cpp", "-O3"]
    assert _build.source_key(first, settings) == _build.source_key(same, settings)
    assert _build.source_key(first, settings) != _build.source_key(other, settings)
    assert _build.source_key(first, settings) != _build.source_key(first, [*settings, "-g"])
    (first / "extra.h").write_text("// a header counts too\n")
    assert _build.source_key(first, settings) != _build.source_key(same, settings)


def test_the_record_header_is_replaced_whole(tmp_path):
    folder = _build.write_record_header(tmp_path / "gen", "torch=a")
    header = folder / _build.RECORD_HEADER
    first_inode = header.stat().st_ino
    _build.write_record_header(folder, "torch=b")
    assert '"torch=b"' in header.read_text()
    assert header.stat().st_ino != first_inode, "written in place, not renamed into place"
    assert [p.name for p in folder.iterdir()] == [_build.RECORD_HEADER]


# ----------------------------------------------------------------------------- GPU machines


def test_backend_none_on_a_gpu_without_cuda_kernels_warns_once(monkeypatch):
    """On a CUDA tensor, with an extension that holds no CUDA kernels (no toolkit where it was
    built), backend=None solves on the host with scipy: the first call says so in one line
    and how to build the CUDA solver; backend="scipy" asks for that and is not warned."""
    monkeypatch.setattr(hungarian, "cuda_extension_built", lambda: False)
    monkeypatch.setattr(hungarian, "_warned_host_solve", False)
    monkeypatch.delenv("STELLAR_KERNELS_BACKEND", raising=False)
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning) as caught:
        assert hungarian._choose_backend(None, cuda) == "scipy"
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message, message
    assert "on the host with scipy" in message and "backend='scipy'" in message, message
    assert "CUDA_HOME" in message or "STELLAR_NO_CUDA" in message, message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hungarian._choose_backend(None, cuda) == "scipy"  # once per process
        monkeypatch.setattr(hungarian, "_warned_host_solve", False)
        assert hungarian._choose_backend("scipy", cuda) == "scipy"
        assert hungarian._choose_backend(None, torch.device("cpu")) == "cpp"
        monkeypatch.setenv("STELLAR_KERNELS_BACKEND", "scipy")
        assert hungarian._choose_backend(None, cuda) == "scipy"
    with pytest.raises(ValueError, match="no CUDA kernels"):
        hungarian._choose_backend("cuda", cuda)


def needs_toolkit() -> Path:
    cuda_home = _build.find_cuda_home()[0]
    if cuda_home is None or torch.version.cuda is None:
        pytest.skip("no CUDA toolkit, or torch without CUDA")
    return cuda_home


@pytest.mark.gpu
def test_on_a_gpu_a_library_without_cuda_kernels_is_rebuilt_with_them(tmp_path):
    """The install-time library was built where no toolkit was found: on a GPU machine with
    a toolkit it is not loaded; the build on first use compiles the CUDA solver too."""
    needs_toolkit()
    cpu_only = tmp_path / "_C.so"
    record = _build.full_record(_build.build_record(torch), with_cuda=False)
    cpu_only.write_bytes(b"\x7fELF" + _build.RECORD_MARK + record.encode() + b"]")
    script = textwrap.dedent(
        f"""
        import warnings
        from pathlib import Path
        import torch
        import stellar_kernels as sk
        from stellar_kernels import _build, _extension
        _extension.installed_library = lambda: Path({str(cpu_only)!r})
        library = _extension.load_extension()
        assert _extension.cuda_extension_built(), library
        assert _build.read_record(library).endswith(";kernels=cpp,cuda"), library
        cost = torch.rand(16, 9, 9, device="cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            index = sk.hungarian_match(cost)
        assert torch.equal(index.cpu(), sk.hungarian_match(cost.cpu())), index
        print("OK")
        """
    )
    env = env_with_cache(tmp_path / "cache")
    env.pop("STELLAR_NO_CUDA", None)
    run = run_python(script, env, timeout=600)
    assert_ok(run)
    assert "holds no CUDA kernels" in run.stderr and COMPILING in run.stderr, run.stderr


@pytest.mark.gpu
def test_on_a_gpu_without_a_toolkit_the_host_solve_warns_once(tmp_path):
    """STELLAR_NO_CUDA=1 stands in for a machine without a toolkit: the extension holds no
    CUDA kernels, and backend=None on CUDA tensors warns once, then solves right."""
    script = textwrap.dedent(
        """
        import warnings
        import torch
        import stellar_kernels as sk
        from stellar_kernels import _extension
        _extension.installed_library = lambda: None
        cost = torch.rand(4, 6, 6, device="cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = sk.hungarian_match(cost)
            second = sk.hungarian_match(cost)
            sk.hungarian_match(cost, backend="scipy")
        assert not _extension.cuda_extension_built()
        assert len(caught) == 1, [str(w.message) for w in caught]
        assert "on the host with scipy" in str(caught[0].message)
        expected = sk.hungarian_match(cost.cpu())
        assert torch.equal(first.cpu(), expected) and torch.equal(second.cpu(), expected)
        print("OK")
        """
    )
    run = run_python(script, env_with_cache(tmp_path / "cache", STELLAR_NO_CUDA="1"))
    assert_ok(run)


def foreign_arch(major: int) -> str:
    """An architecture whose machine code a card of this compute capability cannot run
    (machine code runs only within its major version), without PTX."""
    for arch in ("12.0", "10.0", "9.0", "8.0", "7.5"):
        if int(arch.split(".")[0]) < major:
            return arch
    return "9.0" if major != 9 else "8.0"


@pytest.mark.gpu
def test_a_card_without_a_kernel_image_gets_an_error_naming_torch_cuda_arch_list(tmp_path):
    needs_toolkit()
    major, minor = torch.cuda.get_device_capability()
    script = textwrap.dedent(
        """
        import torch
        import stellar_kernels as sk
        from stellar_kernels import _extension
        _extension.installed_library = lambda: None
        try:
            sk.hungarian_match(torch.rand(2, 5, 5, device="cuda"), backend="cuda")
        except RuntimeError as err:
            print("ERROR", str(err).splitlines()[0])
        torch.cuda.synchronize()  # the error was cleared: CUDA still works
        print("OK")
        """
    )
    env = env_with_cache(tmp_path / "cache", TORCH_CUDA_ARCH_LIST=foreign_arch(major))
    env.pop("STELLAR_NO_CUDA", None)
    run = run_python(script, env, timeout=600)
    assert_ok(run)
    [error] = lines_after("ERROR", run.stdout)
    assert "TORCH_CUDA_ARCH_LIST" in error and f"{major}.{minor}" in error, error
