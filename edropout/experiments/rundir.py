"""Run directories: what a run writes, and how it is read back safely.

    config.json      the TrainConfig of the run (with ``"runs": N``: a directory of N runs, seed-<s>/)
    metrics.jsonl    one line per epoch (see :mod:`edropout.experiments.loop`)
    last.pt          the state after the last finished epoch (model, optimiser, EDropout, RNGs)
    best.pt          the same at the epoch of the best validation top-1 (after the freeze, once frozen)
    freeze.pt        the state at the moment of the freeze (within its epoch), from which variants of the
                     pruned phase branch (benchmarks/after_freeze.py)
    report.md/json   the test-set report of best.pt (:mod:`edropout.experiments.report`)
    plots.png        the per-epoch curves (:mod:`edropout.experiments.plots`)
    original/, <baseline>/   sibling runs, each a run directory of its own

Every file is written to a temporary file in the same folder, flushed to disk and renamed over the old
one, so a run killed at any instant leaves the last good file. Checkpoints hold plain data only (tensors,
numbers, strings, lists, dicts) and are read with ``torch.load(..., weights_only=True)``: opening a run
directory someone sent you runs none of its code, and a file that is not such a checkpoint is refused with
one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .. import distributed, ops
from .config import OLDER_RUNS, SAME_SCHEDULE, RunError, TrainConfig, check_choices


def atomic_write_bytes(path: Path, write) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file of the same folder, fsync it and rename
    it over ``path``: ``path`` is either the old file or the complete new one, never a partial one."""
    path = Path(path)
    existed = path.exists()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteFailed(path, e, existed) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the run from colleagues
        with os.fdopen(fd, "wb") as f:
            write(f)
            _test_kill(path, "partial", f)
            f.flush()
            os.fsync(f.fileno())
        _test_kill(path, "written")
        os.replace(tmp, path)
        _test_kill(path, "renamed")
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # torch.save reports a full disk as a RuntimeError of its zip writer: asked, the disk says why
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and _disk_full(path.parent)):
            raise WriteFailed(path, e, existed) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# Fault injection for the tests (tests/test_faults.py): EDROPOUT_TEST_KILL="<file name>:<phase>:<k>" sends
# SIGKILL to this process in the k-th write of that file, at phase "partial" (half of it written, unsynced),
# "written" (whole, before the rename) or "renamed" (after it)
_KILL = os.environ.get("EDROPOUT_TEST_KILL", "").split(":")
_KILL_WRITES: dict = {}


def _test_kill(path: Path, phase: str, f=None) -> None:
    if len(_KILL) != 3 or _KILL[0] != path.name or _KILL[1] != phase:
        return
    _KILL_WRITES[path.name] = _KILL_WRITES.get(path.name, 0) + 1
    if _KILL_WRITES[path.name] == int(_KILL[2]):
        if f is not None:  # keep half of what was written
            f.flush()
            f.truncate(max(0, f.tell() // 2))
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class WriteFailed(RunError):
    """A file of a run could not be written; one line: which, why (ENOSPC, EROFS, EACCES...), what survived."""

    def __init__(self, path: Path, error: BaseException, existed: bool):
        code = errno.errorcode.get(getattr(error, "errno", None) or 0)
        reason = f"{code}: {error.strerror}" if code and getattr(error, "strerror", None) else (
            "ENOSPC: no space left on device" if not isinstance(error, OSError) else str(error))
        kept = f"the previous {path.name} is intact" if existed else f"no {path.name} was there before"
        super().__init__(f"{path}: not written ({reason}); {kept}")


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_leftovers(run_dir) -> List[Path]:
    """Remove the temporary files of writes that were interrupted (a kill between writing and renaming)
    from ``run_dir``; returns them."""
    leftovers = sorted(Path(run_dir).glob(".*.tmp"))
    for path in leftovers:
        with contextlib.suppress(OSError):
            path.unlink()
    return leftovers


def strict_json(value, indent: Optional[int] = None) -> str:
    """``value`` as strict JSON: a non-finite float (NaN, ±inf, which JSON has not) written as null."""
    def finite(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v
    return json.dumps(finite(value), indent=indent, allow_nan=False)


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(checkpoint, f))


# Checkpoints written before 2026-11-26 held NumPy's RNG state as an array and the couplings as an
# ops.Couplings: data-only types, allowed so that those runs still load (nothing else is).
_numpy_core = getattr(np, "_core", None) or np.core  # NumPy 2 / 1
OLDER_CHECKPOINT_TYPES = [np.dtype, np.ndarray, _numpy_core.multiarray._reconstruct, ops.Couplings]
OLDER_CHECKPOINT_TYPES += [type(np.dtype(t)) for t in ("u4", "i8", "f8")]


def load_checkpoint(path: Path, device="cpu") -> dict:
    """A checkpoint of this package, read with ``weights_only=True``; RunError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such checkpoint")
    try:
        with torch.serialization.safe_globals(OLDER_CHECKPOINT_TYPES):
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # a global that is not plain data: another program's file, or worse
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it holds {found.group(1)}" if found else "it holds objects other than plain data"
        raise RunError(f"{path}: not an edropout checkpoint ({what}); refused without running it") from None
    except Exception as e:
        raise RunError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"model", "epoch", "meta"} <= set(checkpoint) \
            or not isinstance(checkpoint["meta"], dict) or not {"in_channels", "num_classes"} <= set(checkpoint["meta"]):
        raise RunError(f"{path}: not an edropout training checkpoint (it lacks the network's description)")
    return checkpoint


def config_values(run_dir) -> dict:
    """The JSON object of ``run_dir``/config.json, or RunError (one line)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no config.json)")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(values, dict):
        raise RunError(f"{path}: expected a JSON object of TrainConfig fields")
    return values


def config_of_values(values: dict, run_dir) -> TrainConfig:
    """The TrainConfig of one run's config.json ``values`` (older runs' missing fields filled in)."""
    if "runs" in values:  # written by train_runs
        raise RunError(f"{run_dir}: a directory of {values['runs']} runs, not one run: name one of them (seed-*/)")
    return TrainConfig.from_dict({**OLDER_RUNS, **settings(values)})


# config.json's record of the data the run started with (data.fingerprint): not a setting of the run
FINGERPRINT = "data_fingerprint"


def settings(values: dict) -> dict:
    """config.json's ``values`` without what it records besides the TrainConfig (the data's fingerprint)."""
    return {key: value for key, value in values.items() if key != FINGERPRINT}


def check_data(run_dir, now: Optional[dict], write: bool = True) -> None:
    """RunError (one line) unless the data, by their fingerprint ``now``, are those the run in ``run_dir``
    started with: a file more or less shifts the seeded validation split. A run that trained nothing yet (a
    start stopped by an unreadable image, then removed) takes the data as they are, its config.json updated
    where ``write``; files of the same names but other sizes (an image replaced) are one warning line."""
    run_dir = Path(run_dir)
    values = config_values(run_dir)
    then = values.get(FINGERPRINT)
    if then is None or now is None or then == now:  # runs written before the fingerprint was recorded: as before
        return
    if not any(run_dir.rglob("*.pt")):
        if write:
            write_text(run_dir / "config.json", strict_json({**values, FINGERPRINT: now}, indent=2) + "\n")
        return
    if then.get("names") != now["names"] or then.get("count") != now["count"]:
        raise RunError(f"{run_dir}: the data differ from those the run started with ({then.get('count')} "
                       f"{then.get('of', 'files')} then, {now['count']} now): the seeded validation split would "
                       f"shift; restore the data as they were, or start a new run on them (--run-dir NEW_DIR)")
    if write:
        print(f"edropout: warning: {run_dir}: data files changed in size since the run started (the same "
              f"names: the same split); going on with them", file=sys.stderr)


def read_config(run_dir) -> TrainConfig:
    """The TrainConfig of a run directory; RunError (one line) when config.json is damaged or names a model,
    data set or mode that does not exist."""
    config = config_of_values(config_values(run_dir), run_dir)
    try:
        check_choices(config)
    except RunError as e:
        raise RunError(f"{Path(run_dir) / 'config.json'}: {e}") from None
    return config


def holds_runs(run_dir) -> bool:
    """Whether ``run_dir`` is a directory of several runs (written by ``train_runs``)."""
    try:
        return "runs" in config_values(run_dir)
    except RunError:
        return False


def seed_dirs(run_dir) -> List[Path]:
    """The runs of a directory of several runs, by seed."""
    return sorted((p for p in Path(run_dir).glob("seed-*") if (p / "config.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def read_metrics(run_dir) -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    metrics = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                metrics.append(json.loads(line))
            except ValueError:
                raise RunError(f"{path}: line {number} is not JSON (damaged; the run's checkpoints are not "
                               f"affected, but its record of epochs is)") from None
    return metrics


def write_metrics(run_dir, metrics: List[dict]) -> None:
    write_text(Path(run_dir) / "metrics.jsonl", "".join(strict_json(m) + "\n" for m in metrics))


def trained_nothing(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a start writes before its first epoch ends (config.json, an empty
    metrics.jsonl): a start stopped there (an unreadable image, a kill) that a rerun may begin again."""
    names = {path.name for path in run_dir.iterdir()}
    metrics = run_dir / "metrics.jsonl"
    return names <= {"config.json", "metrics.jsonl"} and (not metrics.is_file() or metrics.stat().st_size == 0)


def create_run_dir(config: TrainConfig, runs: Optional[int] = None, fingerprint: Optional[dict] = None) -> Path:
    """A fresh run directory (created, writable and empty, or RunError; one where a start trained nothing is
    begun again) holding the config.json of ``config`` (with ``runs``: a directory of that many runs; with
    ``fingerprint``: the data's, which a resume compares), whose run_dir it becomes."""
    if config.run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{config.dataset}-{config.model}-{config.mode}-{stamp}"
    else:
        run_dir = Path(config.run_dir)
    if run_dir.is_dir():  # a start killed before config.json was written leaves only these
        remove_leftovers(run_dir)
        with contextlib.suppress(OSError):
            (run_dir / ".write-probe").unlink()
        if trained_nothing(run_dir):
            for path in run_dir.iterdir():
                path.unlink()
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunError(f"run directory {run_dir} already exists and is not empty (resume it with --resume)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"run directory {run_dir} is not writable ({e.strerror or type(e).__name__})") from None
    config.run_dir = str(run_dir)
    values = asdict(config) if runs is None else {**asdict(config), "runs": runs}
    if fingerprint is not None:
        values[FINGERPRINT] = fingerprint
    try:
        write_text(run_dir / "config.json", strict_json(values, indent=2) + "\n")
    except WriteFailed as e:  # the folder is left empty
        raise RunError(f"{e}; nothing was trained: run the command again once the disk has space (or the "
                       f"folder is writable)") from None
    return run_dir


def original_path(config: TrainConfig, run_dir: Optional[Path]) -> Optional[Path]:
    """The Original run compared with ``config``'s run in ``run_dir``: original_dir (its seed-<seed>/ where
    it holds several runs) or <run_dir>/original; None without compare_original."""
    if config.original_dir is not None:
        given = Path(config.original_dir)
        per_seed = given / f"seed-{config.seed}"
        return per_seed if (per_seed / "config.json").is_file() else given
    return Path(run_dir) / "original" if config.compare_original else None


def check_original(config: TrainConfig, seeds=None) -> None:
    """RunError unless original_dir holds a finished run of mode original with ``config``'s data, network,
    schedule and seed (each of ``seeds``, when given)."""
    for seed in ([config.seed] if seeds is None else seeds):
        seeded = replace(config, seed=seed)
        path = original_path(seeded, None)
        other = read_config(path)
        if other.mode != "original":
            raise RunError(f"original_dir {path}: a run of mode {other.mode!r}, not original")
        differ = [name for name in SAME_SCHEDULE if getattr(other, name) != getattr(seeded, name)]
        if differ:
            raise RunError(f"original_dir {path}: " + ", ".join(f"{name} {getattr(other, name)!r} (this run: "
                                                                  f"{getattr(seeded, name)!r})" for name in differ))
        if not (path / "report.json").is_file():
            raise RunError(f"original_dir {path}: not finished (resume it first: --resume {path})")


def rng_states() -> dict:
    """The global RNG states as plain data (lists, numbers, tensors)."""
    version, words, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    if isinstance(key, torch.Tensor):  # older checkpoints: NumPy's own tuple
        key = key.numpy().astype(np.uint32)
    np.random.set_state((kind, key, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def restore(checkpoint: dict, model, ed, optimizer=None, path="checkpoint") -> None:
    """Load a checkpoint's states into those given (not None); RunError (one line) when they do not fit."""
    try:
        if model is not None:
            model.load_state_dict(checkpoint["model"])
        if ed is not None:
            if checkpoint.get("edropout") is None:
                raise ValueError("no EDropout state")
            ed.load_state_dict(checkpoint["edropout"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: does not fit the network of config.json ({distributed.first_line(e)})") from None
