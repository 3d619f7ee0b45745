"""EDropout over several processes: 2 CPU processes on the gloo backend.

The processes are started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in
the environment): by torchrun itself for an ``edropout train`` run, directly for the rest (faster). Every
multi-process job runs with EDROPOUT_CHECK_RANKS=1, so the ranks' states are compared at every step. The
network, data and controller of distributed_worker.py are seeded from the run's seed (conftest).

What is compared with one process, and how exactly: the states (best state at every step, the final
population) are equal; energies and weights are equal to float rounding (rtol 1e-4), since two half-batch
means averaged are not bit for bit one mean over the batch, nor DDP's averaged gradients one mean gradient.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import SEED
from distributed_worker import SCENARIOS, controlled_run, network
from edropout import EDropout, distributed
from edropout.experiments import rundir, runs
from edropout.experiments import config as configs
from test_train import TINY, tiny, tiny_config  # noqa: F401  (tiny: the fixture)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the torchrun command, wherever its script is
MAIN = TINY + "\nimport sys\nfrom edropout.experiments.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(command, world=2):
    """The processes of one job on this machine, with the environment torchrun gives them."""
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "EDROPOUT_CHECK_RANKS": "1"}
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs, timeout):
    """Each process's (stdout, stderr); every process is gone afterwards."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        kill(procs)


def kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every scenario of distributed_worker.py, run once by one job of 2 processes: results(name) -> [rank 0's,
    rank 1's]."""
    out = tmp_path_factory.mktemp("two-ranks")
    procs = start_ranks([sys.executable, str(WORKER), str(out), str(SEED), *SCENARIOS])
    outputs = finish(procs, timeout=180)
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]

    def results(name):
        per_rank = [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(2)]
        for result in per_rank:
            assert "exception" not in result, result["exception"]
        return per_rank

    return results


@pytest.mark.parametrize("energy", ["ising", "loss"])
def test_two_ranks_select_what_one_process_selects_on_the_global_batches(two_ranks, energy):
    rank0, rank1 = two_ranks(energy)
    # the ranks agree bit for bit at every step (check_ranks compared them during the run as well)
    for key in ("states", "energies", "population"):
        assert torch.equal(rank0[key], rank1[key]), key
    for name in rank0["weights"]:
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name

    # one process on the whole batches: averaged activity and scores equal the global batch's up to rounding
    # (a mean of two half-batch means, gradients averaged by DDP), so the same trials win at every step
    one = controlled_run(energy, seed=SEED)
    assert len({tuple(s.tolist()) for s in one["states"]}) > 1, "the best state never changed: a weak test"
    assert torch.equal(rank0["states"], one["states"])
    assert torch.equal(rank0["population"], one["population"])
    torch.testing.assert_close(rank0["energies"], one["energies"], rtol=1e-4, atol=1e-5)
    for name in one["weights"]:
        torch.testing.assert_close(rank0["weights"][name], one["weights"][name], rtol=1e-4, atol=1e-6)


def test_a_whole_dropped_layer_needs_no_find_unused_parameters(two_ranks):
    rank0, rank1 = two_ranks("dropped_layer")
    grads = rank0["grads"]
    # conv "2" dropped entirely: it and conv "0" (which feeds only it) get zero gradients, as does the Linear
    # "5" that reads only zeros; zero, not missing, so DDP's all-reduce saw every parameter at every step
    for name in ("0.weight", "0.bias", "2.weight", "2.bias", "5.weight"):
        assert (grads[name] == 0).all(), name
    assert (grads["5.bias"] != 0).any() and (grads["7.weight"] != 0).any()
    assert torch.equal(rank0["after"]["2.weight"], rank0["before"]["2.weight"])  # kept, not zeroed
    for name in grads:
        assert torch.equal(grads[name], rank1["grads"][name]), name


def test_check_ranks_catches_ranks_that_disagree(two_ranks):
    for r, result in enumerate(two_ranks("disagreement")):
        assert result["error"] is not None, f"rank {r} did not notice"
        assert f"rank {r}:" in result["error"] and "disagree on the population's energies at step 0" in result["error"]


def test_one_process_needs_no_process_group():
    model = network()
    ed = EDropout(model, check_ranks=True)
    assert not distributed.active() and distributed.world_size() == 1 and distributed.rank() == 0
    x = torch.randn(4, 1, 8, 8)
    model(x)
    ed.step()  # no collective call: there is no process group to call
    assert ed.steps == 1
    t = torch.ones(3)
    assert distributed.average_across_ranks_(t) is t and torch.equal(t, torch.ones(3))
    # the units of a wrapped network are the network's
    wrapped = EDropout(nn.DataParallel(network()))
    assert [(layer.name, layer.size) for layer in wrapped.units] == [(layer.name, layer.size) for layer in ed.units]


def torchrun(script_dir, *args, timeout=120):
    script = Path(script_dir) / "edropout_tiny.py"  # the edropout command with the tests' tiny network
    script.write_text(MAIN)
    env = {**os.environ, "EDROPOUT_CHECK_RANKS": "1"}
    return subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def set_epochs(run_dir, epochs):
    path = Path(run_dir) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "epochs": epochs}))


def last(run_dir):
    return torch.load(Path(run_dir) / "last.pt", weights_only=True)


def test_resume_with_another_number_of_processes(tmp_path, tiny):  # noqa: F811
    # epoch 1 in 1 process, epoch 2 on 2 (torchrun; every rank's state checked at every step), epoch 3 in 1
    run_dir = runs.train(tiny_config(tmp_path / "run", epochs=1, limit_batches=3, freeze_by=0), quiet=True)
    assert last(run_dir)["edropout"]["steps"] == 3

    set_epochs(run_dir, 2)
    result = torchrun(tmp_path, "train", "--resume", str(run_dir), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| EDropout(P) |") == 1  # rank 0 alone reports
    second = last(run_dir)
    assert second["edropout"]["steps"] == 6 and second["edropout"]["epoch"] == 2 and second["epoch"] == 2

    set_epochs(run_dir, 3)
    runs.train(None, resume=run_dir, quiet=True)
    third = last(run_dir)
    assert third["edropout"]["steps"] == 9 and third["edropout"]["epoch"] == 3
    metrics = rundir.read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert 0 < m["kept"] < 1 and m["train_top1"] >= 0


@pytest.mark.parametrize("failure", ["dies", "hangs"])
def test_a_rank_that_fails_stops_the_job_with_one_line(tmp_path, failure):
    # rank 1 dies (exits) or hangs (stops answering) after its second step; rank 0 must not wait forever
    stop = {"dies": "os._exit(3)", "hangs": "time.sleep(300)"}[failure]
    code = TINY + f'''
import os, sys, time
from edropout.controller import EDropout
from edropout.experiments.cli import main
_step = EDropout.step
def step(self, *args, **kwargs):
    _step(self, *args, **kwargs)
    if os.environ["RANK"] == "1" and self.steps == 2:
        {stop}
EDropout.step = step
raise SystemExit(main(sys.argv[1:]))
'''
    started = time.time()
    procs = start_ranks([sys.executable, "-c", code, "train", "--model", "tiny", "--epochs", "1", "--batch-size", "32",
                         "--limit-batches", "6", "--device", "cpu", "--run-dir", str(tmp_path / "run"), "--quiet",
                         "--dist-timeout", "5"])
    try:
        _, stderr = procs[0].communicate(timeout=60)
    finally:
        kill(procs)  # rank 1: gone, or asleep
    assert time.time() - started < 45
    assert procs[0].returncode == 1, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edropout: rank 0 of 2: lost the other processes"), stderr[-3000:]


def test_a_process_group_that_cannot_start_is_one_line(tmp_path, monkeypatch, capsys):
    from edropout.experiments.cli import main
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--device", "cpu", "--run-dir", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("edropout: process group (gloo, WORLD_SIZE=2) could not start: ") and "MASTER_ADDR" in error
    assert error.count("\n") == 1 and not (tmp_path / "run").exists()


def test_batch_not_divisible_by_the_processes(tmp_path, tiny, monkeypatch):  # noqa: F811
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # as in a job of 2 processes
    with pytest.raises(configs.RunError, match="^batch_size 33 .* divisible by the 2 processes$"):
        runs.train(tiny_config(tmp_path / "run", batch_size=33), quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_loss_not_finite_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    # rank 1 alone meets a NaN loss at its second step: both ranks stop there, neither waits for the timeout
    code = TINY + '''
import os, sys
import torch.nn.functional as F
from edropout.experiments.cli import main
_cross_entropy, _steps = F.cross_entropy, []
def cross_entropy(logits, targets, *args, **kwargs):
    loss = _cross_entropy(logits, targets, *args, **kwargs)
    if kwargs.get("reduction", "mean") == "mean" and logits.requires_grad:  # a training step
        _steps.append(1)
        if os.environ["RANK"] == "1" and len(_steps) == 2:
            return loss * float("nan")
    return loss
F.cross_entropy = cross_entropy
raise SystemExit(main(sys.argv[1:]))
'''
    started = time.time()
    procs = start_ranks([sys.executable, "-c", code, "train", "--model", "tiny", "--epochs", "2", "--batch-size", "32",
                         "--limit-batches", "4", "--device", "cpu", "--run-dir", str(tmp_path / "run"), "--quiet",
                         "--dist-timeout", "120"])
    outputs = finish(procs, timeout=100)
    assert time.time() - started < 90  # far below the 120 s the others would wait for a rank that left
    assert [p.returncode for p in procs] == [1, 1], [err[-2000:] for _, err in outputs]
    lines = outputs[0][1].strip().splitlines()
    assert len(lines) == 1 and "training diverged: loss nan on rank(s) 1 of 2 at epoch 1, step 2" in lines[0], lines
    assert outputs[1][1].strip() == ""  # rank 0 speaks for the job
    assert not (tmp_path / "run" / "report.json").exists()
