"""A network's prunable units: one block per layer, in module order.

Units are every ``Conv2d`` output channel (a kernel), every ``Linear`` input feature (a hidden unit; a
transformer's MLP hidden units are its second Linear's inputs) and every attention head of an
``nn.MultiheadAttention`` or of torchvision's Swin attention (a head's units are its slice of the output
projection's inputs; the layers inside an attention module are its heads, not units of their own). A layer
whose weight the network reads directly, not through the layer's own forward (torchvision's Swin attention
passes ``qkv.weight`` to a function), could not be masked by its forward: when the network traces
(``torch.fx``), such layers are left out.
The classifier's outputs are units that are always kept (the reference implementation's "output layer must be one"): the
outputs of the last ``Linear`` when the network ends in one (an extra block), or the output channels of
the last ``Conv2d`` when that is the classifier (SqueezeNet). With 102 classes this gives D = 3046
(SqueezeNet 1.1), 5414 (ResNet-18), 9126 (ResNet-34), 18662 (AlexNet), 28710 (ResNet-50) and 54822
(ResNet-101). The reference implementation's published counts differ for four of them: for the ResNets (6208, 9920, 32448,
58560) it also counted the downsample branches' BatchNorm channels (896 for ResNet-18/34, 3840 for
ResNet-50/101) and did not count the classifier's 102 outputs; those BatchNorm channels are not units of
their own here (a downsample convolution's channels are units, and its BatchNorm goes with each). Its
SqueezeNet count (3558) is 512 more than ours, the classifier convolution's input channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Sequence, Union

import torch
from torch import nn

__all__ = ["Layer", "PrunableUnits", "prunable_units", "released_code_exclude"]


@dataclass(frozen=True)
class Layer:
    """One block of units: the units of one module."""

    name: str  # the module's name in the model
    kind: str  # "conv_out", "linear_in", "heads" (an attention module's) or "classifier_out" (the final Linear's outputs)
    size: int  # number of units
    start: int  # index of the first unit in the state vector
    always_kept: bool
    module: nn.Module = field(repr=False, compare=False)

    @property
    def stop(self) -> int:
        return self.start + self.size

    def kernels(self) -> torch.Tensor:
        """The units' weights, one row per unit: conv kernels flattened, or Linear weight columns."""
        if self.kind == "conv_out":
            return self.module.weight.detach().flatten(1)
        if self.kind == "linear_in":
            return self.module.weight.detach().t()
        if self.kind == "heads":  # each head's columns of the output projection, flattened
            w = output_projection(self.module).weight.detach()
            return w.view(w.shape[0], self.size, -1).transpose(0, 1).flatten(1)
        raise ValueError(f"{self.name}: the classifier's outputs have no kernels of their own")


class PrunableUnits(Sequence):
    """The layers of units of a model (a sequence of :class:`Layer`), D = ``num_units`` in all."""

    def __init__(self, layers: List[Layer]):
        self.layers = layers

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def num_units(self) -> int:
        return self.layers[-1].stop if self.layers else 0

    def always_kept(self, device=None) -> torch.Tensor:
        """bool [D]: the units every state keeps (the classifier's outputs)."""
        mask = torch.zeros(self.num_units, dtype=torch.bool, device=device)
        for layer in self.layers:
            if layer.always_kept:
                mask[layer.start : layer.stop] = True
        return mask

    def summary(self, state: torch.Tensor = None) -> str:
        """A table of the layers (and, given a state, the units each keeps)."""
        rows = [f"{'layer':<28} {'kind':<15} {'units':>7} {'first':>7}" + (f" {'kept':>7}" if state is not None else "")]
        for layer in self.layers:
            row = f"{layer.name or '(output)':<28} {layer.kind:<15} {layer.size:>7} {layer.start:>7}"
            if state is not None:
                row += f" {int(state[layer.start:layer.stop].sum()):>7}"
            rows.append(row)
        rows.append(f"D = {self.num_units} units in {len(self.layers)} layers")
        return "\n".join(rows)


def prunable_units(model: nn.Module, exclude: Iterable[Union[str, nn.Module]] = ()) -> PrunableUnits:
    """The units of ``model``: every Conv2d output channel and Linear input feature, in module order, one
    block per layer, plus the classifier's outputs (always kept). Layers in ``exclude`` (module names or
    modules) are left out: their units are not part of the state and are never dropped."""
    excluded = set()
    names = {id(m): n for n, m in model.named_modules()}
    for item in exclude:
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise ValueError(f"exclude: {type(item).__name__} module is not part of the model")
            excluded.add(names[id(item)])
        else:
            if item not in dict(model.named_modules()):
                raise ValueError(f"exclude: no module named {item!r} in the model")
            excluded.add(item)

    attention = {n: m for n, m in model.named_modules() if is_attention(m)}
    inside = {n for a in attention for n, _ in model.get_submodule(a).named_modules(prefix=a) if n != a}
    read_directly = _read_directly(model)
    found = [(n, m) for n, m in model.named_modules()
             if (isinstance(m, (nn.Conv2d, nn.Linear)) and n not in inside and n not in read_directly)
             or n in attention]
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for _, m in found):
        raise ValueError("model has no Conv2d or Linear layer: it has no prunable units")
    last_name, last = [(n, m) for n, m in found if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
    layers: List[Layer] = []
    start = 0
    for name, module in found:
        if name in excluded:
            continue
        if name in attention:
            layers.append(Layer(name, "heads", module.num_heads, start, False, module))
        elif isinstance(module, nn.Conv2d):
            layers.append(Layer(name, "conv_out", module.out_channels, start, module is last, module))
        else:
            layers.append(Layer(name, "linear_in", module.in_features, start, False, module))
        start += layers[-1].size
    if isinstance(last, nn.Linear):
        layers.append(Layer(last_name, "classifier_out", last.out_features, start, True, last))
    return PrunableUnits(layers)


def released_code_exclude(model: nn.Module) -> List[str]:
    """The layers the released research code never masks, as an ``exclude`` list for a ResNet: all but every
    block's ``conv2`` and the classifier (the code masks the state-dict keys containing ``conv2`` and the
    ``fc`` inputs). Its ``sparsifier`` also skips the first ``conv2`` (``layer1.0.conv2``: in the state,
    never masked); here that layer is prunable like the others, since units a state holds but never applies
    would only blur the search."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not any(n.endswith(".conv2") for n in names) or not isinstance(model.get_submodule(names[-1]), nn.Linear):
        raise ValueError("model: the released code's prunable layers are a ResNet's: blocks with a conv2 and a "
                         "Linear classifier")
    return [n for n in names[:-1] if not n.endswith(".conv2")]


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module whose heads are units: ``nn.MultiheadAttention`` (one
    projection of q, k and v) and torchvision's Swin attention (v1 and v2)."""
    if isinstance(module, nn.MultiheadAttention):
        return module._qkv_same_embed_dim and module.out_proj.in_features % module.num_heads == 0
    return type(module).__name__ in SWIN_ATTENTION and type(module).__module__ == "torchvision.models.swin_transformer"


SWIN_ATTENTION = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")


def output_projection_name(attention: nn.Module) -> str:
    """The name of the Linear that maps an attention module's concatenated heads to its output."""
    return "out_proj" if isinstance(attention, nn.MultiheadAttention) else "proj"


def output_projection(attention: nn.Module) -> nn.Linear:
    return getattr(attention, output_projection_name(attention))


def head_columns(attention: nn.Module, per_head: torch.Tensor) -> torch.Tensor:
    """A per-head vector ``[num_heads]`` of ``attention`` spread over its output projection's input columns
    (each head owns a contiguous slice of them)."""
    return per_head.repeat_interleave(output_projection(attention).in_features // per_head.numel())


def _read_directly(model: nn.Module) -> set:
    """Names of the Conv2d and Linear layers whose weight the traced network reads as a tensor (not through
    the layer's forward); empty when the network does not trace."""
    from .graph import trace

    gm = trace(model)
    if gm is None:
        return set()
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return {n.target.rsplit(".", 1)[0] for n in gm.graph.nodes
            if n.op == "get_attr" and "." in n.target and n.target.rsplit(".", 1)[0] in layers}
