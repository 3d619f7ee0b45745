"""The benchmark scripts run (smoke: small sizes, no thresholds)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_speed_quick(tmp_path):
    out = run("speed.py", "--quick", "--device", "cpu", "--json", str(tmp_path / "speed.json"),
              "--profile", str(tmp_path / "profile"))
    assert "| resnet18 | 5414 |" in out and "| squeezenet1_1 | 3046 |" in out
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert all(row[f"{k}_ratio"] > 0 for row in rows for k in ("ising", "loss", "numpy", "frozen", "pruned"))
    for row in rows:  # the refresh, timed apart, spread over its period
        spread = row["ising_refresh_ms"] / (row["ising_refresh_every"] * row["original_ms"])
        assert row["ising_refresh_ms"] > 0 and row["ising_ratio_with_refresh"] == row["ising_ratio"] + spread
    profiles = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert profiles == sorted(f"{m}-{k}.txt" for m in ("resnet18", "squeezenet1_1")
                              for k in ("original", "ising", "loss", "numpy", "frozen", "pruned"))
    assert "edropout::evolve_step" in (tmp_path / "profile" / "resnet18-ising.txt").read_text()


def test_kernels_quick():
    out = run("kernels.py", "--quick", "--device", "cpu")
    assert "| resnet18 | 5414 |" in out


def test_slim_smallest():
    out = run("slim.py", "--models", "squeezenet1_1", "--rounds", "1", "--calls", "1", "--batch-size", "1")
    assert "| squeezenet1_1 | 1 |" in out


def test_speed_rejects_unknown_model():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--models", "vgg"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--models: unknown vgg" in result.stderr
