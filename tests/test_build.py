"""The build: setup.py's messages, the check that the kernels fit the running torch, and (slow) ``pip install
.`` in a fresh virtual environment as a new user runs it."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_setup_without_torch_says_what_to_do():
    # What a build with pip's default build isolation sees: no torch importable.
    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "install torch first" in message and "--no-build-isolation" in message, result.stderr


def test_forced_cuda_without_a_toolkit_is_one_line(tmp_path):
    code = "import runpy, sys; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__')"
    env = {**os.environ, "FORCE_CUDA": "1", "CUDA_HOME": str(tmp_path / "no-toolkit")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("edropout: FORCE_CUDA=1 needs a CUDA toolkit"), \
        result.stderr


def test_kernels_record_the_torch_they_were_built_against():
    from edropout import _build
    if not _build.BUILT_WITH.is_file():
        pytest.skip("kernels built before setup.py wrote _built_with.json (make setup rebuilds them)")
    built = json.loads(_build.BUILT_WITH.read_text())
    assert {k: built[k] for k in ("torch", "cuda", "cxx11_abi")} == _build.running()
    assert _build.mismatch(built, _build.running()) is None


@pytest.mark.parametrize("key, value", [("torch", "2.4.0+cu121"), ("cuda", "11.8"), ("cxx11_abi", False)])
def test_another_torch_is_one_line_naming_both_and_the_fix(key, value):
    from edropout import _build
    now = {"torch": "2.14.1+cu130", "cuda": "13.0", "cxx11_abi": True}
    message = _build.mismatch({**now, key: value}, now)
    assert message is not None and "\n" not in message
    assert "torch 2.14.1+cu130 (CUDA 13.0, C++11 ABI 1)" in message and _build.REBUILD in message
    assert ("C++11 ABI 0" if key == "cxx11_abi" else value) in message


# `import edropout` of the copy in the current folder (an editable install's finder would map its modules to
# the source folder's)
IMPORT_COPY = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
               "getattr(f, '__module__', '')]; sys.path.insert(0, ''); import edropout")


def test_import_refuses_kernels_built_for_another_torch(tmp_path):
    # a copy of the package whose _built_with.json names another torch: import edropout says so in one line
    package = tmp_path / "edropout"
    shutil.copytree(ROOT / "edropout", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "_built_with.json").write_text(json.dumps({"torch": "2.4.0+cu121", "cuda": "12.1", "cxx11_abi": True}))
    result = subprocess.run([sys.executable, "-c", IMPORT_COPY], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: edropout's kernels were built against torch 2.4.0+cu121"), result.stderr
    # and kernels that are missing altogether
    (package / "_built_with.json").unlink()
    for built in package.glob("_C*.so"):
        built.unlink()
    result = subprocess.run([sys.executable, "-c", IMPORT_COPY], cwd=tmp_path, capture_output=True, text=True)
    assert result.stderr.strip().splitlines()[-1].startswith("ImportError: edropout's kernels could not be loaded"), \
        result.stderr
    # ...and a source folder without built kernels, imported from inside it
    (tmp_path / "setup.py").write_text("")
    result = subprocess.run([sys.executable, "-c", IMPORT_COPY], cwd=tmp_path, capture_output=True, text=True)
    assert result.stderr.strip().splitlines()[-1].startswith("ImportError: this is edropout's source folder"), \
        result.stderr


@pytest.mark.slow
def test_pip_install_dot_in_a_fresh_environment(tmp_path):
    """What a new user runs: a fresh venv, ``pip install .`` with build isolation (torch from the registry,
    through pip's cache), then the kernels load and an op runs. Several GB and minutes."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "v")], check=True)
    python = tmp_path / "v" / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key not in ("FORCE_CUDA", "VIRTUAL_ENV")}
    started = time.time()
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "."], cwd=clone, env=env,
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    check = ("import torch, edropout, edropout.ops; "
             "s = torch.randint(0, 2, (4, 16), dtype=torch.uint8); h = torch.randn(16); "
             "print(edropout.ops.ising_energy(s, h, [torch.randn(16, 16)]).shape)")
    result = subprocess.run([str(python), "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "torch.Size([4])", result.stderr[-3000:]
    print(f"pip install . took {time.time() - started:.0f} s")


def test_package_imports_and_registers_every_op():
    import torch

    import edropout

    for name in ("ising_energy", "evolve", "select", "evolve_step"):
        assert hasattr(torch.ops.edropout, name)
    assert callable(edropout.ops.evolve_step)
