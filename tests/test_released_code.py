"""The released research code's choices (``--preset reference``): the CIFAR stem, the margin energy with
parents' energies kept, its prunable layers and its freeze rule, each against a plain-PyTorch reference."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edropout import EDropout, MarginEnergy, ReleasedCodeRule, models, prunable_units
from edropout.experiments import cli as cli_module
from edropout.units import released_code_exclude
from test_slim import check_slim, random_keep, randomise_batchnorm
from test_train import assert_bad, cli


# ---------------------------------------------------------------------------------------------------
# The CIFAR stem

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_cifar_stem_shapes(name):
    cifar, imagenet = models.build(name, 1, 10, stem="cifar"), models.build(name, 1, 10)
    assert (cifar.conv1.kernel_size, cifar.conv1.stride, cifar.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(cifar.maxpool, nn.Identity)
    # the same network but for the first kernel's size: 64 x (7x7 - 3x3) parameters fewer
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(imagenet) - count(cifar) == 64 * (49 - 9)
    seen = {}
    cifar.layer4.register_forward_hook(lambda m, i, o: seen.update(layer4=o.shape))
    assert cifar(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert seen["layer4"][-2:] == (4, 4)  # the last stage at 4x4, as the released code's (1x1 with torchvision's)


def test_cifar_stem_only_for_resnets():
    with pytest.raises(ValueError, match="stem 'cifar' is one of the ResNets'"):
        models.build("alexnet", 1, 10, stem="cifar")
    with pytest.raises(ValueError, match="stem must be one of imagenet, cifar"):
        models.build("resnet18", 1, 10, stem="tiny")


@pytest.mark.parametrize("case", ["half", "reference_layers"])
def test_cifar_stem_masks_and_slims_exactly(case, gen):
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = models.build("resnet18", 3, 10, stem="cifar").eval()
    randomise_batchnorm(model, gen)
    keep = random_keep(model, gen)
    if case == "reference_layers":  # only the released code's layers pruned
        for name in released_code_exclude(model):
            keep[name] = torch.ones_like(keep[name])
    check_slim(model, keep, torch.randn(2, 3, 32, 32, generator=gen))


# ---------------------------------------------------------------------------------------------------
# The released code's prunable layers

@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_reference_prunable_layers_are_the_conv2s_and_the_classifier(name):
    model = models.build(name, 1, 10, stem="cifar")
    units = prunable_units(model, released_code_exclude(model))
    conv2s = [n for n, m in model.named_modules() if n.endswith(".conv2")]
    assert conv2s[0] == "layer1.0.conv2" and len(conv2s) == {"resnet18": 8, "resnet34": 16, "resnet50": 16}[name]
    assert [(layer.name, layer.kind) for layer in units] == (
        [(n, "conv_out") for n in conv2s] + [("fc", "linear_in"), ("fc", "classifier_out")])
    assert units.num_units == sum(model.get_submodule(n).out_channels for n in conv2s) + model.fc.in_features + 10


def test_reference_prunable_layers_need_a_resnet():
    with pytest.raises(ValueError, match="a ResNet's"):
        released_code_exclude(models.build("alexnet", 1, 10))


# ---------------------------------------------------------------------------------------------------
# The margin energy

class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def margin_energy_reference(model, state, units, inputs, targets):
    """−10 × the mean margin of ``model`` with ``state`` applied, one state at a time: a copy of the network
    in train mode (batch statistics), dropped conv channels zeroed after their BatchNorm, dropped Linear
    inputs zeroed before it."""
    model = copy.deepcopy(model).train()
    after = {"conv1": model.bn1, "conv2": model.bn2}
    for layer in units:
        part = state[layer.start:layer.stop].float()
        if layer.kind == "conv_out":
            after[layer.name].register_forward_hook(lambda m, i, o, p=part: o * p.view(1, -1, 1, 1))
        elif layer.kind == "linear_in":
            layer_module = model.get_submodule(layer.name)
            layer_module.register_forward_pre_hook(lambda m, i, p=part: (i[0] * p,))
    with torch.no_grad():
        z = model(inputs).double()
    true = z.gather(1, targets.view(-1, 1)).squeeze(1)
    others = z.scatter(1, targets.view(-1, 1), float("-inf")).amax(dim=1)
    return -10 * (true - others).mean()


@pytest.mark.parametrize("exclude", [[], ["conv1"]])  # bn1 absorbs a mask, or runs its own forward
@pytest.mark.parametrize("training", [True, False])
def test_margin_energy_against_one_state_at_a_time(training, exclude, device, gen):
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = SmallNet()
    randomise_batchnorm(model, gen)
    plain = copy.deepcopy(model)
    model.to(device).train(training)
    ed = EDropout(model, energy=MarginEnergy(), population=6, seed=int(torch.randint(1000, (1,), generator=gen)),
                  exclude=exclude)
    states = (torch.rand(7, ed.units.num_units, generator=gen) < 0.6).to(torch.uint8) | ed.always_kept.cpu().to(torch.uint8)
    inputs, targets = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(5, (16,), generator=gen)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}

    energies = ed.energy(states.to(device), (inputs.to(device), targets.to(device))).cpu()

    expected = torch.stack([margin_energy_reference(plain, s, ed.units, inputs, targets) for s in states])
    torch.testing.assert_close(energies.double(), expected, rtol=1e-4, atol=1e-4)
    for key, value in buffers.items():  # the running statistics that validation uses: untouched
        assert torch.equal(model.state_dict()[key].cpu(), value.cpu()), key
    assert model.training == training


def test_margin_energy_parents_are_not_scored_again(gen):
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = SmallNet()
    energy = MarginEnergy()
    ed = EDropout(model, energy=energy, population=6, seed=int(torch.randint(1000, (1,), generator=gen)))
    scored, candidate_logits = [], energy.candidate_logits

    def counting(states, inputs, batch_statistics=False):
        scored.append(states.shape[0])
        return candidate_logits(states, inputs, batch_statistics)

    energy.candidate_logits = counting
    previous = None
    for step in range(6):
        inputs, targets = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(5, (16,), generator=gen)
        F.cross_entropy(model(inputs), targets).backward()
        parents = ed.population.clone()
        ed.step(inputs, targets)
        if previous is not None:  # a member that stayed keeps its energy from the batch it was scored on
            stayed = (ed.population == parents).all(dim=1)
            assert torch.equal(ed.energies[stayed], previous[stayed])
        previous = ed.energies.clone()
    assert scored == [6] * 7  # the population once, then only each step's trials


# ---------------------------------------------------------------------------------------------------
# The released code's freeze rule

def test_released_code_rule_freezes_when_the_best_repeats_from_batch_11_of_its_epoch():
    rule = ReleasedCodeRule(start=2, epoch_steps=20, deadline=2)
    state, prunable = torch.ones(4), torch.ones(4)
    best = iter(range(1000, 0, -1))  # a new best at every step: never repeats
    settled = [rule.settled(step, state, prunable, torch.tensor(float(next(best)))) for step in range(1, 40)]
    assert not any(settled)
    # the best repeats from step 26 (in epoch 2) on: only checked from the 12th batch of epoch 2 (step 31 on)
    rule = ReleasedCodeRule(start=2, epoch_steps=20, deadline=2)
    energies = [float(100 - s) if s < 26 else 74.0 for s in range(1, 40)]
    settled = [rule.settled(s, state, prunable, torch.tensor(e)) for s, e in zip(range(1, 40), energies)]
    assert settled.index(True) + 1 == 31  # after step 31: the next is batch 11 (from 0) of epoch 2
    # a best that repeats early (epoch 1) does not count before epoch 2
    rule = ReleasedCodeRule(start=2, epoch_steps=20, deadline=2)
    assert not any([rule.settled(s, state, prunable, torch.tensor(1.0)) for s in range(1, 31)])
    assert rule.settled(31, state, prunable, torch.tensor(1.0))


def test_released_code_rule_checkpoints_its_window():
    rule = ReleasedCodeRule(start=1, epoch_steps=100)
    for s in range(1, 8):
        rule.settled(s, torch.ones(2), torch.ones(2), torch.tensor(float(s)))
    again = ReleasedCodeRule(start=1, epoch_steps=100)
    again.load_state_dict(rule.state_dict())
    assert [float(e) for e in again.best_energies] == [float(s) for s in range(1, 8)]
    with pytest.raises(ValueError, match="epoch_steps must be an integer of at least 1"):
        ReleasedCodeRule(start=1, epoch_steps=0)


# ---------------------------------------------------------------------------------------------------
# The command

def test_preset_sets_the_released_code_choices_and_flags_win():
    parse = cli_module.parser().parse_args
    config = cli_module.config_of(parse(["train", "--preset", "reference"]))
    assert (config.stem, config.energy, config.prunable, config.freeze) == ("cifar", "margin", "reference", "reference")
    config = cli_module.config_of(parse(["train", "--preset", "reference", "--energy", "ising"]))
    assert (config.stem, config.energy) == ("cifar", "ising")


def test_preset_with_resume_and_reference_choices_on_other_networks_refused(tmp_path):
    assert_bad(cli("train", "--resume", str(tmp_path), "--preset", "reference"), "--preset")
    assert_bad(cli("train", "--model", "alexnet", "--prunable", "reference"), "--prunable reference", "alexnet")
    assert_bad(cli("train", "--freeze", "reference", "--freeze-by", "0"), "--freeze reference", "--freeze-by")


@pytest.mark.slow
def test_preset_reference_trains_on_digits(tmp_path):
    run = tmp_path / "run"
    result = cli("train", "--preset", "reference", "--epochs", "2", "--limit-batches", "5", "--run-dir", str(run),
                 "--quiet", timeout=900)
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["stem"], config["energy"], config["prunable"], config["freeze"]) == (
        "cifar", "margin", "reference", "reference")
    rows = json.loads((run / "report.json").read_text())["rows"]
    assert rows and all(row.get("units") is not None for row in rows)
    assert "units %" in (run / "report.md").read_text()


def test_slim_file_of_the_reference_layers_and_cifar_stem_loads_by_name(tmp_path, gen):
    from edropout import load_slim, save_slim, slim

    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = models.build("resnet18", 1, 10, stem="cifar").eval()
    randomise_batchnorm(model, gen)
    exclude = released_code_exclude(model)
    units = prunable_units(model, exclude)
    state = (torch.rand(units.num_units, generator=gen) < 0.5) | units.always_kept()
    small = slim(model, state, units).eval()
    save_slim(tmp_path / "slim.pt", small, state, {"model": "resnet18", "in_channels": 1, "num_classes": 10,
                                                   "stem": "cifar", "exclude": exclude})
    x = torch.randn(2, 1, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(load_slim(tmp_path / "slim.pt")(x), small(x))
