"""The networks of the experiments: torchvision architectures with an adapted first convolution."""

from decimal import Decimal

import pytest
import torch
import torch.nn as nn
import torchvision

from edropout.models import INPUT_SIZE, MODELS, build

# Trainable parameters of the 1-channel, 10-class models in the research code's tables, in millions.
TABLE = {"resnet18": "11.1", "resnet34": "21.2", "resnet50": "23.5", "resnet101": "42.5", "alexnet": "57",
         "squeezenet1_1": "0.72"}
FIRST_CONV = {name: "conv1" if name.startswith("resnet") else "features.0" for name in MODELS}


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def classifier_out(model):
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


def test_names_and_sizes():
    assert MODELS == ("resnet18", "resnet34", "resnet50", "resnet101", "alexnet", "squeezenet1_1")
    assert INPUT_SIZE == {"resnet18": 32, "resnet34": 32, "resnet50": 32, "resnet101": 32, "alexnet": 224,
                          "squeezenet1_1": 224}


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_matches_table(name):
    # The table truncates to the digits it shows: 11,175,370 is "11.1M".
    count = trainable(build(name, 1, 10))
    shown = TABLE[name]
    digits = len(shown.partition(".")[2])
    assert count * 10**digits // 10**6 == int(Decimal(shown) * 10**digits), (name, count)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward(name, in_channels, gen):
    num_classes = 10 if in_channels == 1 else 7
    model = build(name, in_channels, num_classes).eval()
    conv = model.get_submodule(FIRST_CONV[name])
    assert conv.in_channels == in_channels
    assert classifier_out(model) == num_classes
    size = INPUT_SIZE[name]
    x = torch.randn(2, in_channels, size, size, generator=gen)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, num_classes)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", MODELS)
def test_same_as_torchvision_but_first_conv(name):
    ours = build(name, 1, 3)
    theirs = getattr(torchvision.models, name)(weights=None, num_classes=3)
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys()
    first = FIRST_CONV[name] + ".weight"
    assert a[first].shape == b[first].shape[:1] + (1,) + b[first].shape[2:]
    assert all(a[k].shape == b[k].shape for k in a if k != first)
    old, new = theirs.get_submodule(FIRST_CONV[name]), ours.get_submodule(FIRST_CONV[name])
    for attr in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(new, attr) == getattr(old, attr), attr
    assert (new.bias is None) == (old.bias is None)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_channels,num_classes", [(1, 1), (3, 100)])
def test_class_counts(name, in_channels, num_classes):
    model = build(name, in_channels, num_classes)
    assert model.get_submodule(FIRST_CONV[name]).in_channels == in_channels
    assert classifier_out(model) == num_classes


@pytest.mark.parametrize("in_channels,num_classes", [(1, 1), (2, 100), (3, 1000), (4, 2)])
def test_resnet18_count_grows_with_channels_and_classes(in_channels, num_classes):
    model = build("resnet18", in_channels, num_classes)
    assert model.conv1.in_channels == in_channels
    assert model.fc.out_features == num_classes
    # Each extra input channel adds one 7x7 kernel to each of the 64 stem filters; the classifier grows by 513.
    assert trainable(model) == 11_175_370 + (in_channels - 1) * 64 * 49 + (num_classes - 10) * 513


@pytest.mark.parametrize("args,words", [
    (("resnet", 1, 10), ["name", "resnet18", "squeezenet1_1", "'resnet'"]),
    (("ResNet18", 1, 10), ["name", "one of"]),
    (("vgg16", 3, 10), ["name", "vgg16"]),
    (("resnet18", 0, 10), ["in_channels", "positive", "0"]),
    (("alexnet", -1, 10), ["in_channels", "positive"]),
    (("alexnet", 1.0, 10), ["in_channels", "int"]),
    (("squeezenet1_1", 1, 0), ["num_classes", "positive", "0"]),
    (("resnet50", 3, True), ["num_classes", "int"]),
])
def test_bad_input(args, words):
    with pytest.raises(ValueError, match=words[0]) as info:
        build(*args)
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
