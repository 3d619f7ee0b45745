"""Runs that survive what goes wrong: divergence, flags given with --resume, interrupted writes, file modes
(on digits with the tests' tiny network)."""

import json
import os
import stat

import pytest

from edropout.experiments import cli, rundir, runs
from edropout.experiments.config import Diverged
from test_train import tiny, tiny_config  # noqa: F401  (tiny: a fixture)


def _strict(text: str):
    """json.loads that refuses NaN and ±inf, as strict parsers do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_a_diverging_run_stops_with_one_line_and_keeps_its_last_checkpoint(tmp_path, tiny, capsys):
    config = tiny_config(tmp_path / "nan", optimizer="sgd", lr=1e30, epochs=3, limit_batches=3)
    with pytest.raises(Diverged, match=r"training diverged: loss (nan|inf|-inf) at epoch \d+, step \d+ \(learning rate 1e\+30\)"):
        runs.train(config, quiet=True)
    run_dir = tmp_path / "nan"
    assert not (run_dir / "report.json").exists() and not (run_dir / "report.md").exists()
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        _strict(line)
    if (run_dir / "last.pt").exists():  # the epochs before the divergence, resumable
        assert rundir.load_checkpoint(run_dir / "last.pt")["epoch"] == len(rundir.read_metrics(run_dir))
    # the command: one line, exit code 1
    code = cli.main(["train", "--model", "tiny", "--optimizer", "sgd", "--lr", "1e30", "--epochs", "2",
                     "--limit-batches", "3", "--device", "cpu", "--quiet", "--run-dir", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "training diverged" in err and "--lr" in err, err


def test_every_json_file_is_strict_json(tmp_path):
    text = rundir.strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": 2}})
    assert _strict(text) == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}
    rundir.write_metrics(tmp_path, [{"epoch": 1, "train_loss": float("nan")}])
    assert _strict((tmp_path / "metrics.jsonl").read_text()) == {"epoch": 1, "train_loss": None}


def test_a_seed_that_diverges_leaves_the_others_and_is_named(tmp_path, tiny, monkeypatch):
    plan = runs.run_plan

    def second_seed_diverges(config, *args, **kwargs):
        if config.seed == 1:
            raise Diverged(f"{config.run_dir}: training diverged: loss nan at epoch 1, step 2 (learning rate 1)")
        return plan(config, *args, **kwargs)
    monkeypatch.setattr(runs, "run_plan", second_seed_diverges)
    with pytest.raises(Diverged, match=r"seed\(s\) 1 of 3 diverged \(the report covers the others\)"):
        runs.train_runs(tiny_config(tmp_path / "runs", epochs=1, limit_batches=2), runs=3, quiet=True)
    result = _strict((tmp_path / "runs" / "report.json").read_text())
    assert [run["seed"] for run in result["runs"]] == [0, 2] and result["diverged"] == [1]
    assert "Seed(s) 1 diverged and are left out." in (tmp_path / "runs" / "report.md").read_text()


def test_resume_refuses_flags_that_would_change_the_run(tmp_path, tiny, capsys):
    run_dir = runs.train(tiny_config(tmp_path / "run", epochs=1, limit_batches=2), quiet=True, print_report=False)
    before = (run_dir / "report.json").read_text()
    for flags, named in ((["--epochs", "10"], "--epochs"), (["--lr", "0.5", "--seed", "3"], "--lr, --seed"),
                         (["--config", str(tmp_path / "bad.json")], "--config"), (["--runs", "2"], "--runs")):
        assert cli.main(["train", "--resume", str(run_dir), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err and "config.json" in err, err
    assert (run_dir / "report.json").read_text() == before
    # those that do not change what is trained apply
    assert cli.main(["train", "--resume", str(run_dir), "--device", "cpu", "--num-workers", "0", "--quiet"]) == 0


def test_leftovers_of_an_interrupted_write_are_removed_and_files_follow_the_umask(tmp_path, tiny):
    run_dir = runs.train(tiny_config(tmp_path / "run", epochs=2, limit_batches=2), quiet=True, print_report=False)
    leftover = run_dir / ".best.pt.abc123.tmp"  # what a kill between writing and renaming leaves
    leftover.write_bytes(b"\0" * 1024)
    (run_dir / "report.json").unlink()
    runs.train(None, resume=run_dir, quiet=True, print_report=False)
    assert not leftover.exists() and not list(run_dir.glob(".*.tmp"))
    previous = os.umask(0o022)
    try:
        rundir.write_text(tmp_path / "shared.md", "x")
        assert stat.S_IMODE((tmp_path / "shared.md").stat().st_mode) == 0o644
        os.umask(0o077)
        rundir.write_text(tmp_path / "private.md", "x")
        assert stat.S_IMODE((tmp_path / "private.md").stat().st_mode) == 0o600
    finally:
        os.umask(previous)
    for name in ("config.json", "report.md", "best.pt"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o666 & ~previous, name


def _damaged(name, run_dir):
    import torch
    if name == "metrics missing":
        (run_dir / "metrics.jsonl").unlink()
    elif name == "metrics truncated":
        (run_dir / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text()[:-20])
    elif name == "best.pt of other content":
        checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
        checkpoint["meta"] = {}
        torch.save(checkpoint, run_dir / "best.pt")
    elif name == "config.json naming an unknown model":
        values = json.loads((run_dir / "config.json").read_text())
        values["model"] = "nonet"
        (run_dir / "config.json").write_text(json.dumps(values))


DAMAGES = {"metrics missing": "metrics.jsonl: missing", "metrics truncated": "metrics.jsonl: line 1 is not JSON",
           "best.pt of other content": "best.pt: not an edropout training checkpoint",
           "config.json naming an unknown model": "model must be one of"}


def test_damaged_run_directories_get_one_line_and_exit_2(tmp_path, tiny, capsys):
    import shutil
    base = runs.train(tiny_config(tmp_path / "base", epochs=1, limit_batches=2), quiet=True, print_report=False)
    capsys.readouterr()
    for name, expected in DAMAGES.items():
        run_dir = tmp_path / name.replace(" ", "-")
        shutil.copytree(base, run_dir)
        _damaged(name, run_dir)
        for command in (["eval", str(run_dir)], ["train", "--resume", str(run_dir), "--quiet"],
                        ["export", str(run_dir)]):
            code = cli.main(command)
            err = capsys.readouterr().err.strip()
            if command[0] == "export" and name.startswith("metrics"):  # export does not read the metrics
                assert code == 0, err
                continue
            assert code == 2 and len(err.splitlines()) == 1 and expected in err, (name, command[0], err)


def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes(tmp_path, tiny, monkeypatch, capsys):
    import collections
    import torch
    save = torch.save
    written = []

    def full_after_epoch_1(obj, f, *args, **kwargs):  # as torch's zip writer reports a full disk
        if len(written) >= 3:  # freeze.pt, best.pt and last.pt of epoch 1
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 200384 vs 200280")
        written.append(f)
        return save(obj, f, *args, **kwargs)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(rundir.torch, "save", full_after_epoch_1)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda folder: usage(10 << 30, 10 << 30, 0))
    code = cli.main(["train", "--model", "tiny", "--epochs", "3", "--limit-batches", "2", "--batch-size", "32",
                     "--settle-distance", "0", "--device", "cpu", "--quiet", "--run-dir", str(tmp_path / "full")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "ENOSPC" in err and "last.pt of epoch 1 is the last checkpoint" in err and "--resume" in err, err
    assert rundir.load_checkpoint(tmp_path / "full" / "last.pt")["epoch"] == 1
    assert not list((tmp_path / "full").glob(".*.tmp"))
    monkeypatch.undo()
    assert cli.main(["train", "--resume", str(tmp_path / "full"), "--quiet"]) == 0
    assert json.loads((tmp_path / "full" / "report.json").read_text())["epochs"] == 3


def test_a_read_only_folder_shows_the_result_then_one_line(tmp_path, tiny, monkeypatch, capsys):
    import errno
    run_dir = runs.train(tiny_config(tmp_path / "run", epochs=1, limit_batches=2), quiet=True, print_report=False)
    before = (run_dir / "report.json").read_text()
    capsys.readouterr()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(rundir.tempfile, "mkstemp", read_only)
    assert cli.main(["eval", str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert "| EDropout(P) |" in captured.out  # the result, printed before anything is written
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "report.md: not written (EROFS: Read-only file system)" in err, err
    assert "the previous report.md is intact" in err and (run_dir / "report.json").read_text() == before


# ------------------------------------------------------------------------------------------ kills

def _python(code, env=None):
    from test_train import python
    return python(code, env={**os.environ, **(env or {})})


def _start_or_resume(config):
    """The code that starts the run of ``config``, or resumes it once its config.json is there."""
    from dataclasses import asdict
    run_dir = config.run_dir
    return (f"from pathlib import Path\nfrom edropout.experiments.runs import train\n"
            f"from edropout.experiments.config import TrainConfig\n"
            f"if (Path({run_dir!r}) / 'config.json').is_file():\n"
            f"    train(None, resume={run_dir!r}, quiet=True, print_report=False)\n"
            f"else:\n    train(TrainConfig(**{asdict(config)!r}), quiet=True, print_report=False)\n")


def _finished(config):
    """Run ``config`` to its end, resuming after each kill; the number of processes it took."""
    from pathlib import Path
    for attempt in range(1, 60):
        proc = _python(_start_or_resume(config))
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            return attempt
        assert proc.returncode == -9, err[-3000:]
    raise AssertionError(f"{Path(config.run_dir)} never finished")


def _outcome(run_dir):
    """What a run gives, the time it took aside: every run directory's metrics and report rows, and the
    final checkpoints' tensors."""
    import torch
    from pathlib import Path
    untimed = lambda d: {k: v for k, v in d.items() if "time" not in k and k != "train_s"}  # noqa: E731
    result = {}
    for folder in sorted({p.parent for p in Path(run_dir).rglob("config.json")}):
        name = str(folder.relative_to(run_dir))
        result[name, "metrics"] = [untimed(m) for m in rundir.read_metrics(folder)]
        result[name, "rows"] = [untimed(r) for r in json.loads((folder / "report.json").read_text())["rows"]]
        last = torch.load(folder / "last.pt", weights_only=True)
        result[name, "weights"] = {k: v.tolist() for k, v in last["model"].items()}
        result[name, "state"] = last["edropout"]["mask"].tolist() if last["edropout"] else None
    return result


def _leftovers(run_dir):
    from pathlib import Path
    return [p for p in Path(run_dir).rglob("*") if p.name.endswith(".tmp") or p.name == ".write-probe"]


KILL_CONFIGS = {"edropout": dict(epochs=3, limit_batches=5, settle_every=2, settle_distance=1.0),
                "with baselines": dict(epochs=2, limit_batches=3, baselines="scratch,rewind")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """name -> (what the run of KILL_CONFIGS[name] gives uninterrupted, its seconds), each run once."""
    import time
    done = {}

    def get(name):
        if name not in done:
            config = tiny_config(tmp_path_factory.mktemp("straight") / "run", **KILL_CONFIGS[name])
            started = time.time()
            _finished(config)
            done[name] = _outcome(config.run_dir), time.time() - started
        return done[name]
    return get


@pytest.mark.parametrize("where", ["last.pt:partial:2", "best.pt:written:1", "freeze.pt:renamed:1",
                                   "metrics.jsonl:written:2", "config.json:partial:1", "report.json:written:1"])
def test_a_kill_inside_a_write_resumes_to_the_same_run(tmp_path, tiny, where, uninterrupted):
    killed = tiny_config(tmp_path / "killed", **KILL_CONFIGS["edropout"])
    proc = _python(_start_or_resume(killed), env={"EDROPOUT_TEST_KILL": where})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, f"the kill at {where} did not happen: {err[-2000:]}"
    assert _finished(killed) == 1
    assert not _leftovers(killed.run_dir)
    assert _outcome(killed.run_dir) == uninterrupted("edropout")[0]


def _killed_at_random_moments(tmp_path, name, kills, seed, uninterrupted):
    import random
    rng = random.Random(seed)
    outcome, duration = uninterrupted(name)
    killed = tiny_config(tmp_path / "killed", **KILL_CONFIGS[name])
    done = 0
    for _ in range(3 * kills):  # a run that finishes before its moment is started again from nothing
        if done == kills:
            break
        proc = _python(_start_or_resume(killed))
        try:
            proc.communicate(timeout=rng.uniform(0.3, 0.6 * duration))
        except Exception:  # still running at the chosen moment: kill it there
            proc.kill()
            proc.communicate()
            done += 1
        else:
            import shutil
            shutil.rmtree(killed.run_dir)
    _finished(killed)
    assert not _leftovers(killed.run_dir)
    assert _outcome(killed.run_dir) == outcome
    print(f"{name}: {done} kills at random moments (seed {seed}), resumed to the uninterrupted run's outcome, "
          f"no file left behind")
    return done


@pytest.mark.parametrize("name", ["edropout"])  # with baselines: in the slow variant (a minute more here)
def test_kills_at_random_moments_resume_to_the_same_run(tmp_path, tiny, name, uninterrupted):
    seed = int.from_bytes(os.urandom(4), "little")
    assert _killed_at_random_moments(tmp_path, name, 3, seed, uninterrupted) >= 1, seed


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KILL_CONFIGS))
def test_twenty_kills_at_random_moments_resume_to_the_same_run(tmp_path, tiny, name, uninterrupted):
    seed = int.from_bytes(os.urandom(4), "little")
    assert _killed_at_random_moments(tmp_path, name, 20, seed, uninterrupted) == 20, seed


# ---------------------------------------------------------------------- the library's rarer errors

def test_the_librarys_rarer_errors_are_one_line_naming_the_argument(tmp_path, tiny, gen):
    import warnings

    import torch

    import edropout
    from edropout import models
    model = models.build("tiny", 1, 10)
    ed = edropout.EDropout(model)
    for call, words in ((lambda: ed.freeze(torch.ones(3)), f"state must be a tensor of shape [{ed.units.num_units}]"),
                        (lambda: edropout.EDropout(models.build("tiny", 1, 10), p_init=0), "p_init must be in (0, 1]")):
        with pytest.raises(ValueError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        edropout.EDropout(models.build("tiny", 1, 10)).step()
    assert [str(w.message) for w in caught if "before any forward" in str(w.message)], [str(w.message) for w in caught]
    (tmp_path / "notes.txt").write_text("not a torch file")
    with pytest.raises(ValueError, match="notes.txt: not a slim file of edropout .not a torch file"):
        edropout.load_slim(tmp_path / "notes.txt")
    state = (torch.rand(ed.units.num_units, generator=gen) < 0.5) | ed.always_kept.cpu()
    edropout.save_slim(tmp_path / "own.pt", edropout.slim(model, state, ed.units), state, {"model": "my-net"})
    with pytest.raises(ValueError, match="'my-net', is not one of edropout.models; pass model="):
        edropout.load_slim(tmp_path / "own.pt")
    assert edropout.load_slim(tmp_path / "own.pt", model=models.build("tiny", 1, 10)) is not None


def test_the_command_without_arguments_shows_its_help_and_names_flags(tmp_path, capsys):
    assert cli.main([]) == 2
    assert "{train,eval,export}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("edropout ")
    assert cli.main(["train", "--epochs", "0", "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "edropout: --epochs must be a positive integer; got 0"
    from edropout.experiments.config import TrainConfig, summary_line
    assert ", 1 epoch, " in summary_line(TrainConfig(epochs=1), tmp_path)


# ------------------------------------------------------------------------------------ damaged data

def _image_folder(root, per_class=12):
    """train/ and test/ of two classes of 8x8 gray PNGs."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 4)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(root / split / c / f"{k}.png")
    return root


def _train_on(data_root, run_dir, *flags):
    return cli.main(["train", "--model", "tiny", "--dataset", "imagefolder", "--data-root", str(data_root),
                     "--epochs", "1", "--batch-size", "32", "--bn-calibration", "0", "--device", "cpu", "--quiet",
                     "--run-dir", str(run_dir), *flags])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("then", ["rerun", "resume"])
def test_a_corrupt_image_met_mid_epoch_is_one_line_and_the_run_goes_on_without_it(tmp_path, tiny, capsys, workers,
                                                                                     then):
    data_root = _image_folder(tmp_path / "data")
    bad = data_root / "train" / "b" / "5.png"
    bad.write_bytes(b"not an image")
    run_dir = tmp_path / "run"
    assert _train_on(data_root, run_dir, "--num-workers", str(workers)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"edropout: cannot read image {bad}: cannot identify image file; replace or remove it, then "
                   f"rerun or --resume"), err
    bad.unlink()  # the split shifts, but nothing was trained yet: the run starts again on the data as they are
    code = _train_on(data_root, run_dir) if then == "rerun" else cli.main(["train", "--resume", str(run_dir), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (run_dir / "report.json").is_file()
    assert json.loads((run_dir / "config.json").read_text())["data_fingerprint"]["count"] == 31


def test_a_corrupt_image_met_while_loading_is_one_line_and_leaves_nothing(tmp_path, tiny, capsys):
    data_root = _image_folder(tmp_path / "data")
    first = data_root / "train" / "a" / "0.png"  # the one whose mode tells gray from colour
    first.write_bytes(first.read_bytes()[:40])  # cut short
    assert _train_on(data_root, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"edropout: cannot read image {first}: "), err
    assert not (tmp_path / "run").exists()


def test_a_resume_refuses_data_that_differ_from_those_the_run_started_with(tmp_path, tiny, capsys):
    data_root = _image_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    assert _train_on(data_root, run_dir) == 0
    capsys.readouterr()
    resume = ["train", "--resume", str(run_dir), "--quiet"]
    moved = data_root / "train" / "a" / "3.png"
    kept = moved.read_bytes()
    moved.unlink()
    assert cli.main(resume) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"edropout: {run_dir}: the data differ from those the run started with (32 files then, 31 now): "
                   f"the seeded validation split would shift; restore the data as they were, or start a new run on "
                   f"them (--run-dir NEW_DIR)"), err
    moved.write_bytes(kept + b"\0")  # the same names, another size (an image replaced): one warning line
    assert cli.main(resume) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "warning" in err and "changed in size" in err, err
    moved.write_bytes(kept)
    assert cli.main(resume) == 0 and capsys.readouterr().err == ""
    # a run written before the fingerprint was recorded resumes as before, whatever its data
    values = json.loads((run_dir / "config.json").read_text())
    del values["data_fingerprint"]
    (run_dir / "config.json").write_text(json.dumps(values))
    moved.unlink()
    assert cli.main(resume) == 0 and capsys.readouterr().err == ""


def test_the_data_fingerprint_is_of_file_names_and_sizes(tmp_path, gen, monkeypatch):
    import gzip
    from edropout.experiments import data
    data_root = _image_folder(tmp_path / "data", per_class=3)
    before = data.load("imagefolder", data_root, 8).fingerprint
    assert before["count"] == 14 and before["of"] == "files"
    (data_root / "test" / "b" / "0.png").write_bytes((data_root / "test" / "b" / "0.png").read_bytes() + b"\0")
    after = data.load("imagefolder", data_root, 8).fingerprint
    assert after["names"] == before["names"] and after["sizes"] != before["sizes"]
    # IDX files (the system's Fashion-MNIST): their names and sizes, not the images inside
    folder = tmp_path / "fashion"
    folder.mkdir()
    for prefix, n in (("train", 20), ("t10k", 5)):
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\0\0\x08\x03" + b"".join(x.to_bytes(4, "big") for x in (n, 28, 28)) + bytes(n * 784))
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\0\0\x08\x01" + n.to_bytes(4, "big") + bytes(n))
    monkeypatch.setattr(data, "SYSTEM_FASHION", folder)
    fashion = data.load("fashion", tmp_path / "nowhere", 28).fingerprint
    assert fashion["count"] == 25 and fashion["of"] == "images"
    assert data.fingerprint(data.Digits())["count"] == 1797


# ------------------------------------------------------------------------- full and read-only disks

# Every file a run, `eval` and `export` write, as (command, file, which write of it fails): the order of a
# run's writes is config.json, metrics.jsonl (empty), freeze.pt, metrics.jsonl, best.pt, last.pt (epoch 1),
# metrics.jsonl, last.pt (epoch 2), plots.png, report.md, compare.png, report.json
WRITE_SITES = [("train", "config.json", 1), ("train", "metrics.jsonl", 1), ("train", "freeze.pt", 1),
               ("train", "best.pt", 1), ("train", "last.pt", 2), ("train", "metrics.jsonl", 3),
               ("train", "plots.png", 1), ("train", "report.md", 1), ("train", "compare.png", 1),
               ("train", "report.json", 1), ("eval", "report.md", 1), ("eval", "compare.png", 1),
               ("eval", "report.json", 1), ("export", "slim.pt", 1), ("export", "slim.ts", 1)]
REASONS = {"ENOSPC": "No space left on device", "EROFS": "Read-only file system"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run of the tiny network (for the eval and export sites), made once."""
    from edropout import models
    from test_train import TINY
    saved = (models.MODELS, models.INPUT_SIZE, models.build)
    exec(TINY, {})  # as the fixture tiny does, for the module
    try:
        yield runs.train(_disk_config(tmp_path_factory.mktemp("finished") / "run"), quiet=True, print_report=False)
    finally:
        models.MODELS, models.INPUT_SIZE, models.build = saved


def _disk_config(run_dir):
    return tiny_config(run_dir, epochs=2, limit_batches=2, bn_calibration=0)


def _failing_write(monkeypatch, name, k, code):
    """os.replace fails with errno ``code`` in the k-th write of file ``name`` (as a disk full or read-only
    under the rename: the complete temporary file is there)."""
    import errno
    replace, seen = os.replace, []

    def failing(source, target, *args, **kwargs):
        if os.path.basename(target) == name:
            seen.append(target)
            if len(seen) == k:
                raise OSError(getattr(errno, code), REASONS[code])
        return replace(source, target, *args, **kwargs)
    monkeypatch.setattr(os, "replace", failing)


@pytest.mark.parametrize("code", list(REASONS))
@pytest.mark.parametrize("command, name, k", WRITE_SITES, ids=[f"{c}-{n}-{k}" for c, n, k in WRITE_SITES])
def test_a_full_or_read_only_disk_at_every_write_is_one_line_and_keeps_the_last_checkpoint(
        tmp_path, tiny, finished_run, monkeypatch, capsys, command, name, k, code):
    import shutil
    import torch
    run_dir = tmp_path / "run"
    if command == "train":  # _disk_config's run as the command starts it
        argv = ["train", "--model", "tiny", "--epochs", "2", "--limit-batches", "2", "--batch-size", "32",
                "--bn-calibration", "0", "--settle-distance", "0", "--device", "cpu", "--quiet", "--run-dir", str(run_dir)]
    else:
        shutil.copytree(finished_run, run_dir)
        argv = [command, str(run_dir)]
    before = {p.name: p.read_bytes() for p in run_dir.glob("*") if p.is_file()} if run_dir.exists() else {}
    capsys.readouterr()
    _failing_write(monkeypatch, name, k, code)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{run_dir / name}: not written ({code}: {REASONS[code]})" in err, err
    assert not list(run_dir.glob(".*.tmp")) and not list(run_dir.glob(".write-probe"))
    if name in before:  # the previous file, untouched
        assert (run_dir / name).read_bytes() == before[name] and f"the previous {name} is intact" in err, err
    monkeypatch.undo()
    if (run_dir / "last.pt").is_file():  # the last complete checkpoint loads, and the run goes on from it
        epoch = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
        assert command != "train" or f"last.pt of epoch {epoch}" in err or "the training is complete" in err, err
    assert "--resume" in err or command != "train" or name == "config.json", err
    if code == "EROFS":  # going on after the disk is writable again: as after ENOSPC, checked there
        return
    again = argv if command != "train" or name == "config.json" else ["train", "--resume", str(run_dir), "--quiet"]
    assert cli.main(again) == 0, capsys.readouterr().err
    assert (run_dir / ("slim.pt" if command == "export" else "report.json")).is_file()
    if command == "train":
        assert [m["epoch"] for m in rundir.read_metrics(run_dir)] == [1, 2]
