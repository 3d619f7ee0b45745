"""The networks of the EDropout experiments, built from torchvision's own architectures.

``build(name, in_channels, num_classes)`` returns ``torchvision.models.<name>(weights=None,
num_classes=num_classes)`` with its first convolution replaced by a ``Conv2d`` that takes ``in_channels``
inputs and is otherwise identical (out channels, kernel, stride, padding, bias). The replacement is
initialised the way torchvision initialises that layer (Kaiming-normal fan-out for ResNets, Kaiming-uniform
with zero bias for SqueezeNet, PyTorch's default for AlexNet), so only the input width changes. Weights are
never downloaded.

Inputs are 32x32 for the ResNets and 224x224 for AlexNet and SqueezeNet (``INPUT_SIZE``), as in the
original EDropout research code. The ResNets' first layers (``stem``, one of ``STEMS``):

    imagenet  torchvision's: 7x7 stride-2 convolution and max-pooling; a 32x32 input reaches the last stage
              as 1x1 maps (the adaptive average pool makes that work). The default.
    cifar     the released research code's (nets/realresnet.py): a 3x3 stride-1 convolution and no
              max-pooling, so the last stage runs at 4x4; about 15x the FLOPs per 32x32 image, the same
              parameters but for the first convolution's kernel.

Trainable parameters for 1 input channel and 10 classes, against the research code's tables:

    resnet18      11,175,370   table 11.1M
    resnet34      21,283,530   table 21.2M
    resnet50      23,522,250   table 23.5M
    resnet101     42,514,378   table 42.5M
    alexnet       57,029,322   table 57M
    squeezenet1_1    726,474   table 0.72M

The tables truncate to the digits shown rather than round (ResNet-34 would round to 21.3M and SqueezeNet to
0.73M); with truncation the plain architectures match every entry, so nothing else is changed.
"""

import torch.nn as nn
import torchvision

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "alexnet", "squeezenet1_1")
STEMS = ("imagenet", "cifar")
INPUT_SIZE = {name: 32 if name.startswith("resnet") else 224 for name in MODELS}


def _positive_int(value, arg):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")


def build(name: str, in_channels: int, num_classes: int, stem: str = "imagenet") -> nn.Module:
    """Build ``name`` (one of ``MODELS``), untrained, for ``in_channels`` inputs and ``num_classes`` outputs;
    a ResNet with ``stem`` (one of ``STEMS``) first layers."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {', '.join(MODELS)}, got {name!r}")
    _positive_int(in_channels, "in_channels")
    _positive_int(num_classes, "num_classes")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if stem != "imagenet" and not name.startswith("resnet"):
        raise ValueError(f"stem {stem!r} is one of the ResNets'; {name} has its own first layers")

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    path = "conv1" if name.startswith("resnet") else "features.0"
    old = model.get_submodule(path)
    kernel, stride, padding = (3, 1, 1) if stem == "cifar" else (old.kernel_size, old.stride, old.padding)
    conv = nn.Conv2d(in_channels, old.out_channels, kernel, stride=stride, padding=padding,
                     dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                     padding_mode=old.padding_mode)
    if name.startswith("resnet"):
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    elif name.startswith("squeezenet"):
        nn.init.kaiming_uniform_(conv.weight)
        nn.init.zeros_(conv.bias)
    model.set_submodule(path, conv)
    if stem == "cifar":
        model.maxpool = nn.Identity()
    return model
