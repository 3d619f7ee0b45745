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
    layers = edropout.unit_layout(model)
    assert sum(layer.size for layer in layers) == EXPECTED_D[name]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == len(convs) + len(linears) + (1 if linears else 0)
    assert [layer.always_kept for layer in layers].count(True) == (1 if linears else 0)


def test_kernels_are_unit_rows():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(20, 4))
    layers = edropout.unit_layout(model)
    assert [(l.kind, l.size) for l in layers] == [("conv_out", 5), ("linear_in", 20), ("classifier_out", 4)]
    assert layers[0].kernels(model[0]).shape == (5, 27)
    assert layers[1].kernels(model[2]).shape == (20, 4)
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        edropout.unit_layout(nn.ReLU())
