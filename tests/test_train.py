"""The training routine and the ``edropout`` command, on digits with a small CNN ("tiny", 8x8 inputs).

The tiny network is registered in ``edropout.models`` by the tests only (in-process with monkeypatch, in
subprocesses through ``TINY``); runs use ``limit_batches`` to stay short.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from edropout import models, ops
from edropout.criteria import Magnitude, Random
from edropout.experiments import build, rundir, runs
from edropout.experiments import config as configs
from edropout.experiments import report as reports
from edropout.experiments.config import TrainConfig
from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]

# Registers "tiny" in edropout.models; run in-process (tiny fixture) and at the start of subprocesses.
TINY = '''
import torch.nn as nn
from edropout import models
def _tiny(in_channels, num_classes):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
_build = models.build
models.MODELS = models.MODELS + ("tiny",)
models.INPUT_SIZE = {**models.INPUT_SIZE, "tiny": 8}
models.build = lambda name, c, n, stem="imagenet": _tiny(c, n) if name == "tiny" else _build(name, c, n, stem)
'''


@pytest.fixture
def tiny(monkeypatch):
    namespace = {}
    saved = (models.MODELS, models.INPUT_SIZE, models.build)
    exec(TINY, namespace)
    yield
    models.MODELS, models.INPUT_SIZE, models.build = saved


def untimed(rows):
    """Report rows without the seconds their training took (they differ between two trainings)."""
    return [{k: v for k, v in row.items() if k != "train_s"} for row in rows]


def tiny_config(run_dir, **overrides):
    # the deadline alone freezes (settle_distance 0) unless a test asks for the settling rule
    values = dict(model="tiny", epochs=2, batch_size=32, limit_batches=6, settle_distance=0.0, device="cpu",
                  run_dir=str(run_dir))
    values.update(overrides)
    return TrainConfig(**values)


def python(code, **kwargs):
    return subprocess.Popen([sys.executable, "-c", TINY + code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_run_directory_and_report(tmp_path, tiny):
    run_dir = runs.train(tiny_config(tmp_path / "run"), quiet=True)
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "report.md", "report.json", "plots.png"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*.tmp"))
    assert json.loads((run_dir / "config.json").read_text())["model"] == "tiny"
    metrics = rundir.read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "best_energy", "mean_energy", "kept", "lr", "time"):
        assert key in metrics[0]
    assert 0 < metrics[-1]["kept"] <= 1
    result = json.loads((run_dir / "report.json").read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["EDropout(F)", "EDropout(P)", "Random 25% (post-hoc)", "Random 50% (post-hoc)",
                          "Random 75% (post-hoc)", "Magnitude (post-hoc)"]
    assert rows["EDropout(F)"]["R"] == 100.0
    for row in rows.values():
        assert row["top1"] <= row["top3"] <= row["top5"] <= 100
        assert 0 < row["R"] <= 100 and row["params"] > 0
    assert (rows["Random 25% (post-hoc)"]["params"] < rows["Random 50% (post-hoc)"]["params"]
            < rows["Random 75% (post-hoc)"]["params"])
    # magnitude pruning keeps as many units as EDropout(P)
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    ed_state = checkpoint["edropout"]["mask"]
    model, ed = build.build_network(tiny_config(run_dir), 1, 10)
    build.restore(checkpoint, model, ed)
    magnitude = Magnitude().state(ed.units, ed.state)
    assert int(magnitude.sum()) == int(ed_state.sum())
    md = (run_dir / "report.md").read_text()
    assert "| EDropout(P) |" in md and "| Magnitude (post-hoc) |" in md


def test_modes_original_and_random(tmp_path, tiny):
    run = runs.train(tiny_config(tmp_path / "orig", mode="original", epochs=1), quiet=True)
    rows = json.loads((run / "report.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["Original"] and rows[0]["R"] == 100.0
    run = runs.train(tiny_config(tmp_path / "rand", mode="random", epochs=1, p_init=0.5), quiet=True)
    rows = json.loads((run / "report.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["Random(0.5)(F)", "Random(0.5)(P)"] and rows[1]["R"] < 100
    assert rundir.read_metrics(run)[0]["frozen"] is True


def _states(run_dir):
    checkpoint = torch.load(Path(run_dir) / "last.pt", weights_only=True)
    return checkpoint


def _assert_same(a, b, path="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        _assert_same(vars(a), vars(b), path)
    else:
        assert a == b or (a != a and b != b), path


@pytest.mark.parametrize("freeze_by", [3, 1], ids=["during-the-search", "after-the-freeze"])
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, tiny, freeze_by):
    # killed during the second epoch, searching (frozen at the end of epoch 3) or training slim (frozen at the
    # end of epoch 1): its third step sleeps and signals that it is there
    killed, marker = tmp_path / "killed", tmp_path / "in-epoch-2"
    config = tiny_config(killed, epochs=3, limit_batches=5, freeze_by=freeze_by, lr_after_freeze="restart")
    code = f'''
import time
from pathlib import Path
from edropout.experiments import loop
from edropout.experiments.config import TrainConfig
from edropout.experiments.runs import train
_learning_rate = loop.learning_rate
def learning_rate(config, step, *args):
    if step == 5 + 2:
        Path({str(marker)!r}).touch()
        time.sleep(600)
    return _learning_rate(config, step, *args)
loop.learning_rate = learning_rate
train(TrainConfig(**{asdict(config)!r}), quiet=True)
'''
    proc = python(code)
    deadline = time.time() + 90
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "the run did not reach its second epoch"
        time.sleep(0.05)
    assert (killed / "last.pt").is_file() and torch.load(killed / "last.pt", weights_only=True)["epoch"] == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    runs.train(None, resume=killed, quiet=True)
    straight = runs.train(tiny_config(tmp_path / "straight", epochs=3, limit_batches=5, freeze_by=freeze_by,
                                      lr_after_freeze="restart"), quiet=True)
    a, b = _states(killed), _states(straight)
    assert a["epoch"] == b["epoch"] == 3 and a["pruned"]
    for key in ("model", "optimizer", "pruned", "edropout", "rng", "best_top1"):
        _assert_same(a[key], b[key], key)
    strip = lambda ms: [{k: v for k, v in m.items() if "time" not in k} for m in ms]  # noqa: E731
    assert strip(rundir.read_metrics(killed)) == strip(rundir.read_metrics(straight))


def test_variants_branched_from_the_freeze_equal_runs_trained_straight(tmp_path, tiny):
    """A run that settled within an epoch writes freeze.pt there; benchmarks/after_freeze.py trains each other
    learning rate after the freeze from it, and gets what a run with that setting trained straight gets."""
    settle = dict(epochs=3, limit_batches=6, lr_step=1, settle_distance=1.0, settle_every=2, freeze_by=0)  # step 10
    branched = runs.train(tiny_config(tmp_path / "runs", lr_after_freeze="continue", **settle), quiet=True)
    straight = runs.train(tiny_config(tmp_path / "straight", lr_after_freeze="restart", **settle), quiet=True)
    freeze = torch.load(branched / "freeze.pt", weights_only=True)
    assert freeze["partial"]["steps_done"] == 4 and freeze["epoch"] == 1  # 10 steps: epoch 2, its 4th step
    assert load_benchmark("after_freeze").main([str(branched), "--candidates", "continue,restart"]) == 0
    a, b = _states(branched / "after-freeze" / "restart" / "runs"), _states(straight)
    for key in ("model", "optimizer", "edropout", "rng", "best_top1"):
        _assert_same(a[key], b[key], key)
    strip = lambda ms: [{k: v for k, v in m.items() if "time" not in k} for m in ms]  # noqa: E731
    assert strip(rundir.read_metrics(branched / "after-freeze" / "restart" / "runs")) == \
        strip(rundir.read_metrics(straight))
    frozen_at = [m["frozen_at"] for m in rundir.read_metrics(straight)]
    assert frozen_at == [None, {"epoch": 1, "step": 10}, {"epoch": 1, "step": 10}]


def test_atomic_checkpoint_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    rundir.save_checkpoint({"epoch": 1, "x": torch.arange(5)}, path)
    before = path.read_bytes()

    def partial_save(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(rundir.WriteFailed, match="last.pt: not written .disk full.; the previous last.pt is intact"):
        rundir.save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the temporary file is gone
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1


def cli(*args, code=None, timeout=120):
    command = [sys.executable, "-m", "edropout", *args] if code is None else [sys.executable, "-c", TINY + code, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_bad(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_cli_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("EDROPOUT_SYSTEM_DATA", str(tmp_path / "no-system-data"))  # no Debian package either
    assert_bad(cli("train", "--dataset", "mnist", "--run-dir", str(tmp_path / "a")), "dataset")
    assert_bad(cli("train", "--model", "vgg", "--run-dir", str(tmp_path / "a")), "model")
    assert_bad(cli("train", "--epochs", "x"), "--epochs")
    assert_bad(cli("train", "--dataset", "fashion", "--data-root", str(tmp_path / "none"),
                   "--run-dir", str(tmp_path / "a")), "fashion", "no data", "--download", "apt-get install")
    assert not (tmp_path / "a").exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # (root writes anywhere)
            assert_bad(cli("train", "--run-dir", str(locked / "run")), "not writable")
    finally:
        locked.chmod(0o700)
    assert_bad(cli("eval", str(tmp_path / "missing")), "missing")
    (tmp_path / "cfg.json").write_text('{"epochs": 1, "colour": "red"}')
    assert_bad(cli("train", "--config", str(tmp_path / "cfg.json")), "colour")


def test_cli_corrupt_checkpoint_and_existing_run(tmp_path, tiny):
    run_dir = runs.train(tiny_config(tmp_path / "run", epochs=1, limit_batches=2), quiet=True)
    files = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    # an existing run directory is never overwritten
    main = "from edropout.experiments.cli import main; import sys; raise SystemExit(main(sys.argv[1:]))"
    assert_bad(cli("train", "--model", "tiny", "--run-dir", str(run_dir), code=main), "already exists")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == files
    # a checkpoint of another network (wrong channel count) and a corrupt one
    wrong = torch.load(run_dir / "best.pt", weights_only=True)
    wrong["model"]["0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(wrong, run_dir / "best.pt")
    assert_bad(cli("eval", str(run_dir), code=main), "best.pt", "does not fit")
    (run_dir / "best.pt").write_bytes(b"not a checkpoint")
    (run_dir / "last.pt").write_bytes(files["last.pt"][:100])
    assert_bad(cli("eval", str(run_dir), code=main), "best.pt", "corrupt")
    assert_bad(cli("train", "--resume", str(run_dir), code=main), "last.pt", "corrupt")
    assert_bad(cli("export", str(run_dir), code=main), "best.pt", "corrupt")


def test_output_to_a_file_has_no_progress_bar(tmp_path, tiny):
    """stdout and stderr not terminals (a log file, CI): a one-line summary first, then one line per epoch,
    no carriage return; the report is printed as a table."""
    main = "from edropout.experiments.cli import main; import sys; raise SystemExit(main(sys.argv[1:]))"
    log = tmp_path / "log"
    with open(log, "w") as f:
        result = subprocess.run([sys.executable, "-c", TINY + main, "train", "--model", "tiny", "--epochs", "2",
                                 "--limit-batches", "5", "--batch-size", "32", "--device", "cpu",
                                 "--run-dir", str(tmp_path / "run")], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                timeout=120)
    text = log.read_bytes().decode()
    assert result.returncode == 0, text
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("edropout tiny on digits, 2 epochs of at most 5 steps") and len(lines[0]) < 200, lines[0]
    epoch_lines = [line for line in lines if line.startswith("edropout epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["edropout epoch 1", "edropout epoch 2"], text
    assert any(line.startswith("| EDropout(P) |") for line in lines)


class _Payload:
    """Unpickling it opens (creates) a file: what a shared run directory could carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_run_directory_with_a_pickle_payload_is_refused_without_running_it(tmp_path, tiny):
    run_dir = tmp_path / "run"
    runs.train(tiny_config(run_dir, epochs=1, limit_batches=2), quiet=True, print_report=False)
    marker = tmp_path / "payload-ran"
    for name in ("best.pt", "last.pt"):
        torch.save({"model": _Payload(marker), "epoch": 1, "meta": {}}, run_dir / name)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    main = "from edropout.experiments.cli import main; import sys; raise SystemExit(main(sys.argv[1:]))"
    for args in (("eval", str(run_dir)), ("export", str(run_dir)), ("train", "--resume", str(run_dir))):
        assert_bad(cli(*args, code=main), "not an edropout checkpoint", "refused")
        assert not marker.exists(), args
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    # another program's file and a truncated one: one line each, nothing run or written either
    torch.save({"weight": torch.randn(3)}, run_dir / "best.pt")
    assert_bad(cli("eval", str(run_dir), code=main), "best.pt", "not an edropout training checkpoint")
    (run_dir / "best.pt").write_bytes(before["last.pt"][:200])
    assert_bad(cli("export", str(run_dir), code=main), "best.pt", "corrupt")
    assert not (run_dir / "slim.pt").exists() and not marker.exists()


def test_checkpoints_hold_plain_data_and_older_ones_load(tmp_path, tiny):
    """best.pt and last.pt load with weights_only=True; one written before (NumPy's RNG state as an array,
    the couplings as an ops.Couplings) still loads and resumes."""
    run_dir = tmp_path / "run"
    runs.train(tiny_config(run_dir, epochs=2), quiet=True, print_report=False)
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    older = dict(checkpoint, rng=dict(checkpoint["rng"], numpy=np.random.get_state()))
    couplings = older["edropout"]["energy"]["couplings"]
    older["edropout"] = dict(older["edropout"], energy={"field": older["edropout"]["energy"]["field"],
                             "couplings": ops.Couplings(couplings["values"], tuple(couplings["sizes"]),
                                                        tuple(couplings["ranks"]))})
    torch.save(older, run_dir / "last.pt")
    loaded = rundir.load_checkpoint(run_dir / "last.pt")
    assert isinstance(loaded["edropout"]["energy"]["couplings"], ops.Couplings)
    config = rundir.read_config(run_dir)
    config.epochs = 3
    rundir.write_text(run_dir / "config.json", json.dumps(asdict(config)))
    runs.train(None, resume=run_dir, quiet=True, print_report=False)
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 3


def test_cli_train_eval_export_round_trip(tmp_path, tiny):
    main = "from edropout.experiments.cli import main; import sys; raise SystemExit(main(sys.argv[1:]))"
    run_dir = tmp_path / "run"
    result = cli("train", "--model", "tiny", "--epochs", "1", "--batch-size", "32", "--limit-batches", "3",
                 "--device", "cpu", "--run-dir", str(run_dir), "--quiet", code=main)
    assert result.returncode == 0, result.stderr
    assert "| EDropout(P) |" in result.stdout
    result = cli("eval", str(run_dir), code=main)
    assert result.returncode == 0, result.stderr
    assert "| Magnitude (post-hoc) |" in result.stdout
    result = cli("export", str(run_dir), code=main)
    assert result.returncode == 0, result.stderr

    from edropout import load_slim
    small = load_slim(run_dir / "slim.pt")  # rebuilt from the registry's architecture
    again = load_slim(run_dir / "slim.pt", model=models.build("tiny", 1, 10))  # from a given network
    scripted = torch.jit.load(str(run_dir / "slim.ts"))
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    model, ed = build.build_network(rundir.read_config(run_dir), 1, 10)
    build.restore(checkpoint, model, ed)
    model.eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad(), ed.pruned():
        expected = model(x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(again(x), small(x)) and not small.training
        torch.testing.assert_close(scripted(x), expected, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) <= sum(p.numel() for p in model.parameters())


def test_several_seeds_report_mean_and_std(tmp_path, tiny):
    parent = runs.train_runs(tiny_config(tmp_path / "runs", epochs=1, limit_batches=2), runs=2, quiet=True)
    assert (parent / "seed-0" / "best.pt").is_file() and (parent / "seed-1" / "best.pt").is_file()
    result = json.loads((parent / "report.json").read_text())
    assert result["seeds"] == [0, 1] and len(result["rows"]) == len(result["std"]) == 6
    assert "±" in (parent / "report.md").read_text()
    # the directory of several runs is not one run: exporting it names the problem
    main = "from edropout.experiments.cli import main; import sys; raise SystemExit(main(sys.argv[1:]))"
    assert_bad(cli("export", str(parent), code=main), "2 runs", "seed-*")
    (parent / "seed-1" / "config.json").write_text("[1, 2]")
    assert_bad(cli("train", "--resume", str(parent / "seed-1"), code=main), "config.json", "JSON object")
    (parent / "seed-1" / "config.json").write_text("{not json")
    assert_bad(cli("train", "--resume", str(parent / "seed-1"), code=main), "config.json", "unreadable")


def test_magnitude_state_keeps_each_layers_count_by_norm(tiny, gen):
    model = models.build("tiny", 1, 10)
    from edropout import EDropout
    ed = EDropout(model)
    reference = (torch.rand(ed.units.num_units, generator=gen) < 0.4) | ed.always_kept
    state = Magnitude().state(ed.units, reference)
    for layer in ed.units:
        kept, ref = state[layer.start:layer.stop], reference[layer.start:layer.stop]
        if layer.always_kept:
            assert kept.all()
            continue
        # as many units per layer as the reference (ranked over the network, the classifier's 16 inputs,
        # Linear columns of 10 weights, would all go before any conv kernel of 72 or 9 weights)
        assert int(kept.sum()) == int(ref.sum()), layer.name
        norms = layer.kernels().norm(dim=1)
        if kept.any() and (~kept).any():
            assert norms[kept].min() >= norms[~kept].max(), layer.name


def _masked_statistics_model(gen):
    """The tiny network whose BatchNorm statistics were gathered with half of its units dropped."""
    from edropout import EDropout
    model = models.build("tiny", 1, 10)
    ed = EDropout(model)
    state = (torch.rand(ed.units.num_units, generator=gen) < 0.5) | ed.always_kept
    ed.masks.mask.copy_(state.float())
    ed.freeze()
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.rand(64, 1, 8, 8, generator=gen))
    return model, ed


def test_full_network_evaluated_with_its_own_batchnorm_statistics(tiny, gen):
    # EDropout(F) is the network with every unit: in eval mode it must equal the same weights without
    # EDropout's hooks, both with BatchNorm statistics of the full network (not of the masked one)
    from edropout.slim import _copy_without_hooks
    model, ed = _masked_statistics_model(gen)
    plain = _copy_without_hooks(model)
    images = torch.rand(256, 1, 8, 8, generator=gen)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(256, dtype=torch.long))
    x = torch.rand(32, 1, 8, 8, generator=gen)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval(), plain.eval()
    with torch.no_grad():
        with ed.full():
            stale = model(x)
            with reports.calibrated_batchnorm(model, dataset, 256, "cpu", ed):
                full = model(x)
                assert not model.training and not ed.masks.collect
        with reports.calibrated_batchnorm(plain, dataset, 256, "cpu"):
            expected = plain(x)
    torch.testing.assert_close(full, expected)
    assert (stale - expected).abs().max() > 1e-3  # the masked statistics do not describe the full network
    for k, v in model.state_dict().items():  # the statistics of training are back
        assert torch.equal(v, trained[k]), k
    # the second BatchNorm's running mean is the mean over the calibration batches of its input
    with reports.calibrated_batchnorm(plain, dataset, 256, "cpu"):
        means = []
        for batch, _ in reports.calibration_loader(dataset, 256):
            h = plain[:3].train()(batch)
            means.append(plain[3](h).mean(dim=(0, 2, 3)))
        plain.eval()
        torch.testing.assert_close(plain[4].running_mean, torch.stack(means).mean(0))


def test_calibration_count():
    assert reports.calibration_count(1258, 2048) == 1152  # whole batches of 128
    assert reports.calibration_count(1258, 256) == 256
    assert reports.calibration_count(1258, 200) == 256
    assert reports.calibration_count(50, 2048) == 50
    assert reports.calibration_count(1258, 0) == 0


def test_compare_original_trains_the_original_beside(tmp_path, tiny):
    config = tiny_config(tmp_path / "both", epochs=1, limit_batches=3)
    both = runs.train(TrainConfig(**{**asdict(config), "compare_original": True}), quiet=True)
    alone = runs.train(tiny_config(tmp_path / "alone", epochs=1, limit_batches=3), quiet=True)
    original = runs.train(tiny_config(tmp_path / "orig", epochs=1, limit_batches=3, mode="original"), quiet=True)
    assert json.loads((both / "original" / "config.json").read_text())["mode"] == "original"
    rows = json.loads((both / "report.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["Original", "EDropout(F)", "EDropout(P)", "Random 25% (post-hoc)",
                                           "Random 50% (post-hoc)", "Random 75% (post-hoc)", "Magnitude (post-hoc)",
                                           "Magnitude (Original, post-hoc)"]
    # the original beside is the original trained alone; the EDropout run is the one trained alone (in all
    # but the seconds it took)
    assert untimed(rows[:1]) == untimed(json.loads((original / "report.json").read_text())["rows"][:1])
    assert untimed(rows[1:-1]) == untimed(json.loads((alone / "report.json").read_text())["rows"])
    # (magnitude keeps EDropout's count per layer; R may still differ where a conv channel feeds a Linear input)
    assert 0 < rows[-1]["R"] < 100
    # finished: a resume leaves it as it is and re-reports the same rows
    runs.train(None, resume=both, quiet=True, print_report=False)
    assert json.loads((both / "report.json").read_text())["rows"] == rows


def test_cli_bad_new_options(tmp_path, capsys):
    from edropout.experiments.cli import main
    for args, word in ((["--energy", "spin"], "energy"), (["--keep-rate", "1.5"], "--keep-rate"),
                       (["--evolution", "binary"], "evolution"), (["--applied", "mean"], "applied"),
                       (["--freeze-by", "-1"], "--freeze-by"), (["--mutation", "2"], "mutation"),
                       (["--applied", "anneal", "--freeze-by", "0"], "anneal"),
                       (["--bn-calibration", "-1"], "--bn-calibration"),
                       (["--mode", "original", "--compare-original"], "--compare-original")):
        assert main(["train", "--run-dir", str(tmp_path / "run"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err, err
    assert not (tmp_path / "run").exists()


def test_the_command_and_the_library_refresh_the_ising_energy_alike():
    """`edropout train` and ``EDropout(model)`` share the refresh period chosen on validation (README)."""
    from edropout.energies import IsingEnergy
    assert TrainConfig().refresh_every == IsingEnergy().refresh_every == 10


def test_every_config_field_has_a_flag():
    from dataclasses import fields
    from edropout.experiments.cli import parser
    train_parser = parser()._subparsers._group_actions[0].choices["train"]
    flags = {option for action in train_parser._actions for option in action.option_strings}
    for field in fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in flags, field.name


def _readme_flags(command):
    """The flags in docs/command.md's table for ``edropout <command>`` (first column, `--flag ...`)."""
    import re
    text = (ROOT / "docs" / "command.md").read_text()
    start = text.index(f"<!-- flags: {command} -->")
    table = text[start:text.index("\n\n", text.index("|", start))]
    return {m.group(1) for m in re.finditer(r"^\| `(--[a-z-]+|[A-Z_]+)", table, re.M)}


@pytest.mark.parametrize("command", ["train", "eval", "export"])
def test_readme_documents_every_flag(command):
    from edropout.experiments.cli import parser
    sub = parser()._subparsers._group_actions[0].choices[command]
    flags = set()
    for action in sub._actions:
        if action.option_strings:
            flags.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
        else:
            flags.add(action.dest.upper())
    assert _readme_flags(command) == flags


# ---------------------------------------------------------------------------------------------- baselines

ROWS = ["Original", "EDropout(F)", "EDropout(P)", "Random (scratch)", "Magnitude + fine-tune",
        "Random 25% (post-hoc)", "Random 50% (post-hoc)", "Random 75% (post-hoc)", "Magnitude (post-hoc)",
        "Magnitude (Original, post-hoc)"]


def _state_of(path):
    return torch.load(path, weights_only=True)["edropout"]["mask"].bool()


def _layer_counts(ed, state):
    return [int(state[layer.start:layer.stop].sum()) for layer in ed.units]


def test_baselines_are_sibling_runs(tmp_path, tiny):
    config = tiny_config(tmp_path / "run", epochs=3, limit_batches=4, baselines="scratch,finetune")
    assert config.compare_original  # finetune needs the Original
    run_dir = runs.train(config, quiet=True)
    for name in ("original", "scratch", "finetune"):
        assert (run_dir / name / "report.json").is_file(), name
        assert json.loads((run_dir / name / "config.json").read_text())["mode"] == name
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ROWS
    model, ed = build.build_network(tiny_config(run_dir), 1, 10)
    edropout_state = _state_of(run_dir / "best.pt")

    # costs: inference FLOPs of each row's (slim) network, training cost of the runs that made it
    by = {r["method"]: r for r in rows}
    assert 0 < by["EDropout(P)"]["mflops"] < by["EDropout(F)"]["mflops"] == by["Original"]["mflops"]
    tflops = {name: sum(m["train_flops"] for m in rundir.read_metrics(run_dir / name)) / 1e12
              for name in ("", "original", "scratch", "finetune")}
    assert by["EDropout(P)"]["train_tflops"] == pytest.approx(tflops[""])
    assert by["Random (scratch)"]["train_tflops"] == pytest.approx(tflops["scratch"])
    assert by["Magnitude + fine-tune"]["train_tflops"] == pytest.approx(tflops["original"] + tflops["finetune"])
    assert tflops["scratch"] < tflops["original"]  # slim from the first step
    metrics = rundir.read_metrics(run_dir)
    frozen_at = next(m["frozen_at"] for m in metrics if m["frozen"])
    assert frozen_at == {"epoch": 1, "step": 4} and all(m["search_flops"] == 0 for m in metrics[1:])
    assert metrics[0]["search_flops"] == metrics[0]["train_flops"] > metrics[1]["train_flops"]

    # scratch: the same seed and schedule, a random state of EDropout's per-layer widths fixed from the start
    scratch = json.loads((run_dir / "scratch" / "config.json").read_text())
    assert {k: scratch[k] for k in ("seed", "epochs", "lr", "lr_step", "batch_size")} == \
        {"seed": 0, "epochs": 3, "lr": None, "lr_step": 50, "batch_size": 32}
    scratch_state = _state_of(run_dir / "scratch" / "best.pt")
    assert _layer_counts(ed, scratch_state) == _layer_counts(ed, edropout_state)
    assert torch.equal(scratch_state, Random(0).state(ed.units, edropout_state))
    assert all(m["frozen"] for m in rundir.read_metrics(run_dir / "scratch"))
    assert torch.equal(_state_of(run_dir / "scratch" / "last.pt"), scratch_state)

    # finetune: the Original's best.pt pruned by magnitude at those widths, then epochs // 5 (at least 1)
    # epochs at the schedule's second learning rate
    metrics = rundir.read_metrics(run_dir / "finetune")
    assert len(metrics) == 1 and metrics[0]["lr"] == pytest.approx(configs.finetune_lr(config)) == 0.1
    original = torch.load(run_dir / "original" / "best.pt", weights_only=True)
    build.restore(original, model, None)
    assert torch.equal(_state_of(run_dir / "finetune" / "best.pt"), Magnitude().state(ed.units, edropout_state))
    assert configs.finetune_lr(tiny_config(run_dir, optimizer="sgd", lr_gamma=0.2)) == pytest.approx(0.02)
    assert configs.finetune_lr(tiny_config(run_dir, finetune_lr=0.5)) == 0.5
    finetuned = torch.load(run_dir / "finetune" / "best.pt", weights_only=True)["model"]
    changed = [k for k, v in original["model"].items() if v.is_floating_point() and not torch.equal(v, finetuned[k])]
    assert changed  # it trained from the Original's weights...
    # ...and the rows are those of each sibling's own report
    for name, method in (("scratch", "Random (scratch)"), ("finetune", "Magnitude + fine-tune"),
                         ("original", "Original")):
        own = json.loads((run_dir / name / "report.json").read_text())["rows"]
        assert own == [next(r for r in rows if r["method"] == method)], name
    # the fine-tuned state is the Original's magnitude state: the same parameters kept. (States with the same
    # per-layer widths may keep different numbers: a Linear column whose conv channel is dropped is zero.)
    assert rows[4]["params"] == rows[9]["params"]

    # a sibling lost or interrupted is trained again by --resume, the same as before
    import shutil
    shutil.rmtree(run_dir / "finetune")
    (run_dir / "scratch" / "report.json").unlink()
    (run_dir / "scratch" / "last.pt").write_bytes((run_dir / "scratch" / "best.pt").read_bytes())
    runs.train(None, resume=run_dir, quiet=True, print_report=False)
    assert untimed(json.loads((run_dir / "report.json").read_text())["rows"][4:5]) == untimed(rows[4:5])
    assert (run_dir / "scratch" / "report.json").is_file()


def test_layer_random_state_keeps_each_layers_count(tiny, gen):
    from edropout import EDropout
    ed = EDropout(models.build("tiny", 1, 10))
    reference = (torch.rand(ed.units.num_units, generator=gen) < 0.5) | ed.always_kept
    a, b = (Random(seed).state(ed.units, reference) for seed in (0, 1))
    assert _layer_counts(ed, a) == _layer_counts(ed, b) == _layer_counts(ed, reference)
    assert not torch.equal(a, b) and torch.equal(a, Random(0).state(ed.units, reference))
    assert a[ed.always_kept].all()


def test_several_runs_with_baselines_resume_and_aggregate(tmp_path, tiny):
    main = "from edropout.experiments.cli import main; import sys; raise SystemExit(main(sys.argv[1:]))"
    config = tiny_config(tmp_path / "runs", epochs=1, limit_batches=2, baselines="scratch")
    parent = runs.train_runs(config, runs=2, quiet=True)
    result = json.loads((parent / "report.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["EDropout(F)", "EDropout(P)", "Random (scratch)"] + ROWS[5:9]
    # a run cut short: --resume of the directory continues it and reports again
    (parent / "report.json").unlink()
    (parent / "seed-1" / "report.json").unlink()
    (parent / "seed-1" / "scratch" / "report.json").unlink()
    result2 = cli("train", "--resume", str(parent), "--quiet", code=main)
    assert result2.returncode == 0, result2.stderr
    assert json.loads((parent / "report.json").read_text())["rows"] == result["rows"]


def test_original_dir_replaces_training_one(tmp_path, tiny):
    originals = runs.train_runs(tiny_config(tmp_path / "orig", mode="original", epochs=1, limit_batches=2),
                                    runs=2, quiet=True)
    parent = runs.train_runs(tiny_config(tmp_path / "ed", epochs=1, limit_batches=2, original_dir=str(originals),
                                             baselines="finetune"), runs=2, quiet=True)
    for s in (0, 1):
        assert not (parent / f"seed-{s}" / "original").exists()
        rows = json.loads((parent / f"seed-{s}" / "report.json").read_text())["rows"]
        assert rows[0] == json.loads((originals / f"seed-{s}" / "report.json").read_text())["rows"][0]
        assert [r["method"] for r in rows][:4] == ["Original", "EDropout(F)", "EDropout(P)", "Magnitude + fine-tune"]
    # an Original of another schedule, or not finished, is refused before anything is written
    with pytest.raises(configs.RunError, match="epochs 1 .this run: 2."):
        runs.train(tiny_config(tmp_path / "x", epochs=2, original_dir=str(originals / "seed-0")), quiet=True)
    (originals / "seed-1" / "report.json").unlink()
    with pytest.raises(configs.RunError, match="not finished"):
        runs.train_runs(tiny_config(tmp_path / "y", epochs=1, limit_batches=2, original_dir=str(originals)),
                            runs=2, quiet=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_bad_baselines(tmp_path, capsys):
    from edropout.experiments.cli import main
    for args, word in ((["--baselines", "scratch,prune"], "'prune'"),
                       (["--baselines", "scratch", "--mode", "random"], "mode edropout"),
                       (["--finetune-epochs", "0"], "--finetune-epochs"),
                       (["--original-dir", str(tmp_path / "none")], "config.json"),
                       (["--mode", "scratch"], "--baselines scratch")):
        assert main(["train", "--run-dir", str(tmp_path / "run"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist")
def test_cli_trains_on_the_system_fashion_mnist(tmp_path):
    main = "from edropout.experiments.cli import main; import sys; raise SystemExit(main(sys.argv[1:]))"
    (tmp_path / "empty").mkdir()
    result = cli("train", "--dataset", "fashion", "--data-root", str(tmp_path / "empty"), "--model", "tiny",
                 "--epochs", "1", "--limit-batches", "20", "--bn-calibration", "256", "--device", "cpu",
                 "--run-dir", str(tmp_path / "run"), "--quiet", code=main)
    assert result.returncode == 0, result.stderr
    assert "| EDropout(P) |" in result.stdout and not any((tmp_path / "empty").iterdir())


def test_finetune_lr_sweep_reads_validation_only(tmp_path, tiny, monkeypatch):
    config = tiny_config(tmp_path / "run", epochs=2, limit_batches=3, compare_original=True)
    run_dir = runs.train(config, quiet=True, print_report=False)
    sweep = load_benchmark("finetune_lr")

    def no_test_set(*args, **kwargs):
        raise AssertionError("the sweep evaluated on the test set")
    monkeypatch.setattr(reports, "evaluate_run", no_test_set)
    assert sweep.main([str(run_dir), "--lrs", "1,0.01", "--out", str(tmp_path / "sweep.md")]) == 0
    table = (tmp_path / "sweep.md").read_text()
    for lr in (1.0, 0.01):
        metrics = rundir.read_metrics(run_dir / f"finetune-lr{lr:g}")
        assert [m["lr"] for m in metrics] == [lr]  # epochs // 5, at least 1, at this learning rate
        assert f"| {lr:g} | {metrics[0]['val_top1']:.2f} |" in table
        assert not (run_dir / f"finetune-lr{lr:g}" / "report.json").exists()


def test_metrics_show_the_dynamics_and_the_deadline_freezes(tmp_path, tiny):
    config = tiny_config(tmp_path / "run", epochs=4, applied="sample")
    metrics = rundir.read_metrics(runs.train(config, quiet=True, print_report=False))
    assert configs.freeze_by(config) == 2 and [m["frozen"] for m in metrics] == [False, True, True, True]
    before, after = metrics[:2], metrics[2:]
    assert all(m["best_changes"] > 0 for m in before) and all(m["best_changes"] == 0 for m in after)
    assert all(0 < m["diversity"] <= 1 for m in before) and len({m["diversity"] for m in after}) == 1
    ever = [m["ever_kept"] for m in metrics]
    assert ever == sorted(ever) and ever[1] == ever[-1] and metrics[0]["kept"] <= ever[0] <= 1
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["edropout"]
    assert int(checkpoint["changes"]) == sum(m["best_changes"] for m in metrics)
    prunable = ~build.build_network(config, 1, 10)[1].always_kept
    assert ever[-1] == pytest.approx(float(checkpoint["ever_kept"][prunable].float().mean()))
    assert torch.equal(checkpoint["mask"].to(torch.uint8), checkpoint["best_state"])  # frozen: the best state
    plain = tiny_config(tmp_path / "rand", mode="random", epochs=1)
    record = rundir.read_metrics(runs.train(plain, quiet=True, print_report=False))[0]
    assert record["best_changes"] is None and record["diversity"] is None and record["ever_kept"] is None


def test_runs_from_before_the_rule_and_the_deadline_read_as_they_ran(tmp_path, tiny):
    run_dir = runs.train(tiny_config(tmp_path / "run", epochs=1), quiet=True, print_report=False)
    values = json.loads((run_dir / "config.json").read_text())
    assert values["evolution"] == "edropout" and values["freeze_by"] is None
    for key in ("evolution", "freeze_by", "applied", "mutation", "settle_distance", "lr_after_freeze"):
        del values[key]
    values.update(freeze_after=5, patience=100)  # the patience rule's fields, retired
    (run_dir / "config.json").write_text(json.dumps(values))
    config = rundir.read_config(run_dir)
    assert config.evolution == "classic" and configs.freeze_by(config) is None and config.applied == "best"
    assert config.settle_distance == 0.0 and config.lr_after_freeze == "continue"


def test_dropout_phase_candidates_read_validation_only(tmp_path, tiny, monkeypatch):
    bench = load_benchmark("dropout_phase")

    def no_test_set(*args, **kwargs):
        raise AssertionError("the candidates were evaluated on the test set")
    monkeypatch.setattr(reports, "evaluate_run", no_test_set)
    out = tmp_path / "table.md"
    assert bench.main([str(tmp_path / "c"), "--dataset", "digits", "--model", "tiny", "--epochs", "2",
                       "--limit-batches", "3", "--candidates", "classic,sample", "--out", str(out)]) == 0
    table = out.read_text()
    for name, (rule, applied) in (("classic", ("classic", "best")), ("sample", ("edropout", "sample"))):
        config = rundir.read_config(tmp_path / "c" / name)
        assert (config.evolution, config.applied, configs.freeze_by(config)) == (rule, applied, 1)
        metrics = rundir.read_metrics(tmp_path / "c" / name)
        assert metrics[0]["frozen"] and f"| {name} | " in table
        assert f"| {metrics[0]['best_changes']} | {metrics[0]['ever_kept']:.3f} |" in table


@pytest.mark.slow
@pytest.mark.parametrize("applied", ["best", "sample"])
def test_digits_run_explores_then_freezes_by_the_deadline(tmp_path, applied):
    """The default schedule on digits, 8 epochs (issue 14's targets): until the deadline (epoch 4) the
    population stays diverse and the applied state changes in every epoch, at least 95 % of the units are
    tried, then the state freezes; with the best state applied (the default) as with a drawn member."""
    result = cli("train", "--epochs", "8", "--applied", applied, "--settle-distance", "0", "--device", "cpu",
                 "--run-dir", str(tmp_path / "run"), "--quiet", timeout=600)  # ~100 s on 2 idle cores
    assert result.returncode == 0, result.stderr
    metrics = rundir.read_metrics(tmp_path / "run")
    before = [m for m in metrics if m["epoch"] <= 4]
    assert [m["frozen"] for m in metrics] == [False] * 3 + [True] * 5
    assert all(m["diversity"] > 0 for m in before) and all(m["best_changes"] == 0 for m in metrics[4:])
    assert all(m["best_changes"] > 0 for m in before) and metrics[-1]["ever_kept"] >= 0.95
