"""The controls EDropout is judged against: the uniform-width criterion, Early-Bird, and the baselines that
train them in the harness (uniform, rewind, earlybird), on digits with the tests' tiny network."""

import json

import pytest
import torch
from torch import nn

from edropout import EDropout, FreezeRule, kept_parameters, models
from edropout.criteria import Magnitude, Uniform
from edropout.earlybird import EarlyBird, batchnorm_l1_
from edropout.experiments import build, loop, rundir, runs
from edropout.experiments.kinds import KINDS
from helpers import load_benchmark
from test_train import _layer_counts, _state_of, tiny, tiny_config, untimed  # noqa: F401  (tiny: a fixture)


def _random_state(ed, gen, low=0.3, high=0.7):
    keep = low + (high - low) * float(torch.rand((), generator=gen))
    return (torch.rand(ed.units.num_units, generator=gen) < keep) | ed.always_kept.cpu()


def _resnet18():
    return EDropout(models.build("resnet18", 1, 10))


def test_uniform_keeps_one_fraction_of_every_layer_and_matches_the_parameters(gen):
    ed = _resnet18()
    like = _random_state(ed, gen)
    target = kept_parameters(ed.model, like, ed.units)[1]
    seed = int(torch.randint(1000, (), generator=gen))
    state = Uniform(seed).state(ed.model, ed.units, target)
    assert abs(kept_parameters(ed.model, state, ed.units)[1] - target) <= 0.01 * target
    assert state[ed.always_kept.cpu()].all()
    layers = [layer for layer in ed.units if not layer.always_kept]
    largest = max(layers, key=lambda layer: layer.size)
    fraction = int(state[largest.start:largest.stop].sum()) / largest.size
    for layer in layers:  # one fraction, rounded per layer (at least one unit)
        kept = int(state[layer.start:layer.stop].sum())
        assert kept >= 1 and abs(kept - fraction * layer.size) <= 1 + 1e-9 * layer.size, layer.name
    assert torch.equal(state, Uniform(seed).state(ed.model, ed.units, target))
    assert not torch.equal(state, Uniform(seed + 1).state(ed.model, ed.units, target))


def test_batchnorm_l1_adds_the_sign_of_each_scale(tiny, gen):
    model = models.build("tiny", 1, 10)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.weight.data = torch.randn(m.weight.shape, generator=gen)
        m.weight.data[0] = 0.0
        m.weight.grad = torch.randn(m.weight.shape, generator=gen)
    expected = [m.weight.grad + 1e-4 * torch.sign(m.weight.detach()) for m in norms]
    batchnorm_l1_(model, 1e-4)
    for m, e in zip(norms, expected):
        torch.testing.assert_close(m.weight.grad, e, rtol=0, atol=0)
        assert m.weight.grad[0] == e[0]  # a γ at zero gets no push


def _early_bird(gen, rule, build_model=lambda: models.build("tiny", 1, 10)):
    ed = EDropout(build_model(), p_init=1.0, freeze=rule)
    for m in ed.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.randn(m.weight.shape, generator=gen)
    return ed, EarlyBird(ed, like=_random_state(ed, gen))


def test_early_bird_masks_rank_the_scales_over_the_network(tiny, gen):
    ed, bird = _early_bird(gen, FreezeRule())
    scales = bird.scales()
    assert bird.count == 24 and bird.channels.sum() == 24  # the two convs' channels; not the Linear's inputs
    for kept in (2, 5, 13, 24):
        mask = bird.mask(kept)
        assert int((mask & bird.channels).sum()) == kept and mask[~bird.channels].all()
        # each layer's largest scale, then the largest of the rest over the whole network
        firsts = [layer.start + int(scales[layer.start:layer.stop].argmax()) for layer, _ in bird.layers]
        rest = torch.where(bird.channels & ~mask, scales, torch.tensor(-1.0)).max()
        chosen = mask & bird.channels
        chosen[firsts] = False
        assert not chosen.any() or scales[chosen].min() >= rest
    assert bird.mask(1).sum() == bird.mask(2).sum()  # at least one channel per layer


def test_early_bird_draws_its_ticket_once_the_masks_settle(tiny, gen):
    ed, bird = _early_bird(gen, FreezeRule(distance=0.1, window=5, every=2))
    ticket = bird.ticket()
    for step in range(1, 11):  # the scales do not move: the 5th mask, at step 10, settles
        assert not ed.frozen
        bird.step()
    assert ed.frozen and ed.frozen_at == {"epoch": 0, "step": 10} and ed.freeze_rule.distances == [0.0]
    assert torch.equal(ed.state.bool().cpu(), ticket)
    # the scales moving by more than the distance: no ticket until the deadline, then the ticket of that moment
    ed, bird = _early_bird(gen, FreezeRule(distance=0.1, window=5, every=1, deadline=2))
    norms = [m for m in ed.model.modules() if isinstance(m, nn.BatchNorm2d)]
    for epoch in range(2):
        for _ in range(6):
            for m in norms:
                m.weight.data = torch.randn(m.weight.shape, generator=gen)
            bird.step()
        assert not ed.frozen
        bird.end_epoch()
    assert ed.frozen and ed.frozen_at == {"epoch": 2, "step": 12}
    assert torch.equal(ed.state.bool().cpu(), bird.ticket()) and max(ed.freeze_rule.distances) > 0.1


def test_early_bird_ticket_matches_the_parameters_of_its_reference(gen):
    ed, bird = _early_bird(gen, FreezeRule(), build_model=lambda: models.build("resnet18", 1, 10))
    ticket = bird.ticket()
    assert abs(kept_parameters(ed.model, ticket, ed.units)[1] - bird.params) <= 0.01 * bird.params
    assert ticket[~bird.channels].all()  # the classifier's inputs are not pruned by it


def _interrupting(monkeypatch, name, saves):
    """Training raises after ``saves`` last.pt writes of sibling run ``name`` (a run cut short)."""
    written = []
    save = loop.save_checkpoint

    def save_then_stop(checkpoint, path):
        save(checkpoint, path)
        if path.parent.name == name and path.name == "last.pt":
            written.append(path)
            if len(written) == saves:
                raise KeyboardInterrupt(f"{name} cut short")
    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)


def test_uniform_rewind_and_earlybird_baselines(tmp_path, tiny, monkeypatch):
    # the state settles at step 5 (a record every step, any distance): mid-epoch, in the second epoch
    values = dict(epochs=4, limit_batches=3, settle_every=1, settle_distance=1.0,
                  baselines="uniform,rewind,earlybird")
    config = tiny_config(tmp_path / "run", **values)
    assert config.compare_original  # rewind starts from the Original
    run_dir = runs.train(config, quiet=True, print_report=False)
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    by = {row["method"]: row for row in rows}
    assert [row["method"] for row in rows][:6] == ["Original", "EDropout(F)", "EDropout(P)", "Uniform (scratch)",
                                                   "Magnitude + rewind", "Early-Bird"]
    for name in ("uniform", "rewind", "earlybird"):
        assert json.loads((run_dir / name / "report.json").read_text())["rows"] == [by[KINDS[name].row]]
        assert json.loads((run_dir / name / "config.json").read_text())["mode"] == name
    model, ed = build.build_network(tiny_config(run_dir), 1, 10)
    edropout_state = _state_of(run_dir / "best.pt")
    target = kept_parameters(model, edropout_state, ed.units)[1]
    metrics = rundir.read_metrics(run_dir)
    frozen_at = next(m["frozen_at"] for m in metrics if m["frozen"])
    assert frozen_at == {"epoch": 1, "step": 5}

    # uniform: one fraction of every layer, the closest #p to EDropout(P)'s, fresh weights fixed from the start
    uniform = _state_of(run_dir / "uniform" / "best.pt")
    assert torch.equal(uniform, Uniform(0).state(model, ed.units, target))
    assert all(m["frozen"] for m in rundir.read_metrics(run_dir / "uniform"))

    # rewind: the Original pruned by magnitude to EDropout's widths, trained for the steps EDropout trained
    # after its freeze (7: the last of epoch 2, then epochs 3 and 4), the learning rate restarted there
    rewind_metrics = rundir.read_metrics(run_dir / "rewind")
    assert [m["epoch"] for m in rewind_metrics] == [2, 3, 4]
    assert [3 * m["train_flops"] for m in rewind_metrics] == [rewind_metrics[1]["train_flops"]] + \
        [3 * rewind_metrics[1]["train_flops"]] * 2
    assert rewind_metrics[0]["lr"] == 1.0 and rewind_metrics[-1]["lr"] == 1.0
    build.restore(torch.load(run_dir / "original" / "best.pt", weights_only=True), model, None)
    rewound = _state_of(run_dir / "rewind" / "best.pt")
    assert torch.equal(rewound, Magnitude().state(ed.units, edropout_state))
    assert _layer_counts(ed, rewound) == _layer_counts(ed, edropout_state)
    original_flops = sum(m["train_flops"] for m in rundir.read_metrics(run_dir / "original"))
    rewind_flops = sum(m["train_flops"] for m in rewind_metrics)
    assert by["Magnitude + rewind"]["train_tflops"] == pytest.approx((original_flops + rewind_flops) / 1e12)

    # earlybird: dense until the ticket (the Linear's inputs kept), slim after; the authors' rule and schedule
    eb_config = json.loads((run_dir / "earlybird" / "config.json").read_text())
    assert (eb_config["settle_distance"], eb_config["lr_after_freeze"], eb_config["p_init"]) == (0.1, "continue", 1.0)
    eb_metrics = rundir.read_metrics(run_dir / "earlybird")
    assert any(m["frozen"] for m in eb_metrics) and eb_metrics[0]["kept"] == 1.0
    ticket = _state_of(run_dir / "earlybird" / "best.pt")
    linear = next(layer for layer in ed.units if layer.kind == "linear_in")
    assert ticket[linear.start:linear.stop].all() and not ticket.all()
    assert eb_metrics[-1]["search_flops"] == 0 and eb_metrics[0]["search_flops"] > 0

    # each baseline cut short and resumed gives what it gave uninterrupted
    again = tiny_config(tmp_path / "again", **values)
    for name in ("uniform", "rewind", "earlybird"):
        _interrupting(monkeypatch, name, 1)
        with pytest.raises(KeyboardInterrupt):
            runs.train(again, quiet=True, print_report=False) if name == "uniform" else \
                runs.train(None, resume=tmp_path / "again", quiet=True, print_report=False)
        monkeypatch.undo()
        assert (tmp_path / "again" / name / "last.pt").is_file() and not (tmp_path / "again" / name / "report.json").exists()
    runs.train(None, resume=tmp_path / "again", quiet=True, print_report=False)
    resumed = json.loads((tmp_path / "again" / "report.json").read_text())["rows"]
    assert untimed(resumed) == untimed(rows)


def test_the_controls_aggregate_over_seeds_with_the_comparison_figure(tmp_path, tiny):
    config = tiny_config(tmp_path / "runs", epochs=2, limit_batches=2, baselines="uniform,rewind,earlybird,scratch")
    parent = runs.train_runs(config, runs=2, quiet=True)
    result = json.loads((parent / "report.json").read_text())
    methods = [row["method"] for row in result["rows"]]
    assert methods[:7] == ["Original", "EDropout(F)", "EDropout(P)", "Random (scratch)", "Uniform (scratch)",
                           "Magnitude + rewind", "Early-Bird"]
    assert len(methods) == len(set(methods))
    for i, method in enumerate(methods):
        values = [run["rows"][i]["top1"] for run in result["runs"]]
        assert result["rows"][i]["top1"] == pytest.approx(sum(values) / 2), method
    text = (parent / "report.md").read_text()
    assert all(text.count(f"| {method} |") == 1 for method in methods)
    assert "borrows EDropout's per-layer widths" in text and "Magnitude + rewind: the Original's training" in text
    for folder in (parent, parent / "seed-0", parent / "seed-1" / "rewind"):
        assert (folder / "compare.png").stat().st_size > 10_000

    # benchmarks/paid_for.py: EDropout(P) against each control per seed, from the same reports
    assert load_benchmark("paid_for").main([str(parent), "--out", str(tmp_path / "paid.md")]) == 0
    text = (tmp_path / "paid.md").read_text()
    for i, method in enumerate(["Original", "Random (scratch)", "Uniform (scratch)", "Magnitude + rewind", "Early-Bird"]):
        line = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        differences = [run["rows"][2]["top1"] - next(r["top1"] for r in run["rows"] if r["method"] == method)
                       for run in result["runs"]]
        assert " / ".join(f"{d:+.2f}" for d in differences) in line and f"{min(differences):+.2f}" in line
    assert "Goals: above Random (scratch) at no more cost:" in text and "above Original" not in text


def test_mode_random_alone_reports_each_row_once(tmp_path, tiny):
    parent = runs.train_runs(tiny_config(tmp_path / "runs", mode="random", epochs=1, limit_batches=2), runs=2,
                             quiet=True)
    text = (parent / "report.md").read_text()
    assert text.count("| Random(0.5)(F) |") == 1 and text.count("| Random(0.5)(P) |") == 1
