import subprocess
import sys
from pathlib import Path

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


def test_package_imports_and_registers_every_op():
    import torch

    import edropout

    for name in ("ising_energy", "evolve", "select", "evolve_step"):
        assert hasattr(torch.ops.edropout, name)
    assert callable(edropout.ops.evolve_step)
