import pytest
import torch
import torchvision
from torch import nn

import edropout

# D for 102 classes: every Conv2d output channel, every Linear input feature, and a Linear classifier's outputs.
EXPECTED_D = {"squeezenet1_1": 3046, "resnet18": 5414, "resnet34": 9126, "alexnet": 18662, "resnet50": 28710,
              "resnet101": 54822}


@pytest.mark.parametrize("name", sorted(EXPECTED_D))
def test_units_of_torchvision_models(name):
    with torch.device("meta"):  # shapes only, no weights to initialise
        model = getattr(torchvision.models, name)(num_classes=102)
    units = edropout.prunable_units(model)
    assert units.num_units == EXPECTED_D[name] == sum(layer.size for layer in units)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(units) == len(convs) + len(linears) + (1 if linears else 0)
    # the classifier's 102 outputs are always kept, whether a Linear (an extra block) or a Conv2d
    assert int(units.always_kept().sum()) == 102
    assert units[-1].always_kept and units[-1].size == 102
    assert [layer.start for layer in units] == [sum(layer.size for layer in units.layers[:i]) for i in range(len(units))]
    assert f"D = {EXPECTED_D[name]} units" in units.summary()


def test_kernels_exclude_and_summary():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 4))
    units = edropout.prunable_units(model)
    assert [(l.name, l.kind, l.size, l.start) for l in units] == [
        ("0", "conv_out", 5, 0), ("2", "linear_in", 20, 5), ("4", "linear_in", 8, 25), ("4", "classifier_out", 4, 33)]
    assert units[0].kernels().shape == (5, 27)
    assert units[1].kernels().shape == (20, 8)
    with pytest.raises(ValueError, match="no kernels"):
        units[3].kernels()
    fewer = edropout.prunable_units(model, exclude=["2", model[0]])
    assert [(l.name, l.start) for l in fewer] == [("4", 0), ("4", 8)] and fewer.num_units == 12
    state = torch.ones(units.num_units, dtype=torch.uint8)
    state[:2] = 0
    assert "     3" in units.summary(state).splitlines()[1]


def test_bad_input():
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        edropout.prunable_units(nn.ReLU())
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="exclude: no module named 'x'"):
        edropout.prunable_units(model, exclude=["x"])
    with pytest.raises(ValueError, match="exclude: Linear module is not part"):
        edropout.prunable_units(model, exclude=[nn.Linear(1, 1)])
