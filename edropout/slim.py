"""Physical slimming: turning a state into a smaller network with the same outputs.

``slim(model, state)`` returns a copy of ``model`` whose eval-mode outputs equal those of ``model``
with ``state`` applied as EDropout's masks (a dropped Conv2d output channel zeroed after the BatchNorm2d
that directly consumes it, or after the conv; a dropped Linear input feature zeroed at the Linear's
input). ``model`` itself is left as it is. Dropped units are

* **removed** where nothing else sees them: a conv output channel goes together with its BatchNorm2d
  channel and the input channels of the next convolutions (through ReLU, pooling, dropout, ``torch.cat``)
  or the input features of the next Linear (through a flatten); a Linear input column goes, and so does
  the producing Linear's output row when that Linear feeds it through elementwise ops only. A channel is
  removed only when every use of it reads zero or ignores it in the masked model, so a conv channel whose
  flattened features a Linear keeps in part stays, and only the dropped columns go; where the tensor
  reaching a Linear still carries features that it drops, a :class:`SelectLinear` selects the kept ones.
  Channels no use reads at all (a conv channel whose features the next Linear drops entirely, a Linear
  output row the next Linear drops) are removed too, dropped or not;
* **masked** where the structure needs them: channels that join a residual sum or reach the output (a
  ResNet's stem and block outputs in the residual stream, a classifier convolution). The mask is folded
  into the parameters (the BatchNorm2d's weight and bias zeroed for that channel, or the conv's weight
  and bias when no BatchNorm follows), so the result is a plain module with no hooks: it
  ``torch.jit.script``\\ s and traces, and :mod:`edropout.slimfile` stores it as plain data.

Dropped attention heads are removed (:mod:`edropout.heads`: an attention module of the kept heads); an
``nn.MultiheadAttention`` with bias_k, bias_v or add_zero_attn keeps them, masked (their output projection
columns zeroed), and so does an attention whose every head is dropped.

Grouped convolutions keep the same number of channels in every group: per group, only as many channels
are removed as in the group that can lose the fewest (and at least one channel per group stays); the
others are masked. Every layer keeps at least one channel or feature (masked if dropped), so a layer whose
units are all dropped becomes a one-channel layer that outputs zeros.

**Why not torch-pruning.** torch-pruning 1.6.1 (``DependencyGraph``, ``get_pruning_group``,
``prune_conv_out_channels``, ``prune_linear_in_channels``) was evaluated on ResNet-18/50, AlexNet,
SqueezeNet 1.1 and a grouped CNN. Its dependency groups express "prune these indices everywhere they are
coupled", not the masked semantics: (1) pruning a channel of a conv that feeds a residual sum returns the
whole residual group (the stem, every block's last conv and BatchNorm of the stage, the next stage's
inputs), so following it would remove channels that other layers still write; it has no notion of
masking them instead; (2) pruning AlexNet's ``classifier.1`` input feature 5 returns all 36 features of
channel 0 and ``features.10``'s output channel 0: partial Linear-input pruning after a flatten is not
possible; (3) pruning SqueezeNet's classifier convolution prunes the network's output; (4) pruning
channels 0-2 of a conv that feeds a ``groups=2`` conv fails with an index error (in-channel pruning of a
grouped conv assumes the same indices in every group); (5) it cannot know that a dropped channel is zero
downstream or that a Linear ignores a channel's features, which decides what may go. Using it would mean
checking and overriding each of its groups against our own analysis, so this module does without it and
works on :func:`edropout.graph.channel_graph`, a ``torch.fx`` channel-flow analysis, and plain tensor
slicing. Models that ``torch.fx`` cannot trace are slimmed with masks folded and Linear columns selected
only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .graph import ChannelGraph, channel_graph, conv_batchnorm_pairs
from .heads import SlimMultiheadAttention, SlimWindowAttention, removable_heads, slim_attention
from .masks import UnitMasks
from .units import PrunableUnits, head_columns, is_attention, output_projection, prunable_units

__all__ = ["slim", "slim_layers", "kept_by_layer", "slim_plan", "kept_parameters", "SlimPlan", "SelectLinear",
           "check_kept"]


class SelectLinear(nn.Linear):
    """A Linear that first keeps the input features ``index`` (a buffer) of its input's last dimension."""

    def __init__(self, index: torch.Tensor, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_buffer("index", index.to(device=self.weight.device, dtype=torch.long))

    @classmethod
    def from_linear(cls, linear: nn.Linear, index: torch.Tensor) -> "SelectLinear":
        """``linear`` (sharing its parameters) behind a selection of its input features ``index``."""
        sel = cls(torch.zeros(0, dtype=torch.long), linear.in_features, linear.out_features,
                  linear.bias is not None, device="meta", dtype=linear.weight.dtype)
        sel.weight, sel.bias = linear.weight, linear.bias
        sel.index = index.to(device=linear.weight.device, dtype=torch.long)
        sel.train(linear.training)
        return sel

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input.index_select(-1, self.index), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", input features selected by index"


def check_kept(model: nn.Module, kept: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``kept`` checked against ``model``; returns it with every tensor on the CPU. Raises a one-line
    ValueError naming the offending key."""
    if not isinstance(kept, Mapping):
        raise ValueError(f"kept must be a dict of module name -> bool tensor, got {type(kept).__name__}")
    modules = dict(model.named_modules())
    out = {}
    for name, mask in kept.items():
        if name not in modules:
            raise ValueError(f"kept[{name!r}]: the model has no module of that name")
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            n, what = m.out_channels, "out_channels of the Conv2d"
        elif isinstance(m, nn.Linear):
            n, what = m.in_features, "in_features of the Linear"
        elif is_attention(m):
            n, what = m.num_heads, "heads of the attention"
        else:
            raise ValueError(f"kept[{name!r}]: expected a Conv2d, Linear or attention module, got {type(m).__name__}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (n,):
            got = (f"{mask.dtype} tensor of shape {list(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            raise ValueError(f"kept[{name!r}]: expected a torch.bool tensor of shape [{n}] ({what}), got {got}")
        out[name] = mask.detach().to("cpu")
    return out


@dataclass
class LayerPlan:
    """What slimming does to one Conv2d or Linear (``kind`` "conv" or "linear"), as bool masks over its own
    indices. ``dropped``: its dropped units; ``remove``: output channels (Conv2d) or output features
    (Linear) removed; ``mask``: dropped Conv2d channels that stay, zeroed; ``in_remove``: Conv2d input
    channels removed. For a Linear, ``arriving`` are the input features the slim tensor reaching it still
    carries, ``columns`` those it keeps (a SelectLinear picks them when they differ from ``arriving``) and
    ``zero_columns`` kept columns zeroed (a Linear whose every input is dropped keeps one)."""

    kind: str
    dropped: torch.Tensor
    remove: torch.Tensor
    mask: torch.Tensor
    in_remove: Optional[torch.Tensor] = None  # conv input channels removed
    columns: Optional[torch.Tensor] = None
    arriving: Optional[torch.Tensor] = None
    zero_columns: Optional[torch.Tensor] = None


@dataclass
class SlimPlan:
    """Per Conv2d / Linear name, its :class:`LayerPlan`; ``bn_remove``: BatchNorm2d channels removed;
    ``heads``: per attention module, its dropped heads, masked (their output projection columns zeroed);
    ``pairs``: :func:`~edropout.graph.conv_batchnorm_pairs`; ``traced``: whether ``torch.fx`` could trace
    the model (else conv masks are only folded and Linear columns selected)."""

    layers: Dict[str, LayerPlan] = field(default_factory=dict)
    heads: Dict[str, torch.Tensor] = field(default_factory=dict)  # attention name -> dropped heads (masked)
    bn_remove: Dict[str, torch.Tensor] = field(default_factory=dict)
    pairs: Dict[str, str] = field(default_factory=dict)
    traced: bool = True

    def summary(self) -> Dict[str, int]:
        """Dropped units, and how many of them are removed and masked: a conv channel is removed or
        masked; a dropped Linear input feature is removed (its column goes) unless the Linear would have
        none left."""
        dropped, removed = sum(int(h.sum()) for h in self.heads.values()), 0
        for lp in self.layers.values():
            if lp.kind == "conv":
                dropped += int(lp.dropped.sum())
                removed += int((lp.dropped & lp.remove).sum())
            else:
                dropped += int(lp.dropped.sum())
                removed += int((lp.dropped & ~lp.columns).sum())
        return {"dropped": dropped, "removed": removed, "masked": dropped - removed}


def _removable(g: ChannelGraph, kept: Dict[str, torch.Tensor], modules: Dict[str, nn.Module]) -> List[torch.Tensor]:
    """Per producer, the channels that no use reads (zero there, or ignored by a Linear's mask), adjusted
    so that grouped convs keep equal groups and every producer keeps a channel."""
    dropped = [(~kept[name]) if (kind == "conv" and name in kept) else torch.zeros(n, dtype=torch.bool)
               for name, kind, n in zip(g.producers, g.kinds, g.sizes)]
    live = [b.clone() for b in g.blocked]

    for use in g.uses:
        f = use.flow
        has = f.prod >= 0
        ignored = torch.zeros(len(f), dtype=torch.bool)
        for p in f.prod[has].unique().tolist():
            sel = f.prod == p
            ignored[sel] = f.zeroed[sel] & dropped[p][f.chan[sel]]
        if use.kind == "linear" and use.module in kept:
            ignored |= (~kept[use.module]).view(len(f), use.rep).all(1)
        for p in f.prod[has & ~ignored].unique().tolist():
            live[p][f.chan[(f.prod == p) & ~ignored]] = True

    removable = [~l for l in live]
    grouped_uses = [u for u in g.uses if u.kind == "conv" and modules[u.module].groups > 1]
    changed = True
    while changed:
        changed = False
        # A grouped conv's output: the same count removed in every group, at least one left per group.
        for p, (name, kind) in enumerate(zip(g.producers, g.kinds)):
            groups = modules[name].groups if kind == "conv" else 1
            r = removable[p].view(groups, -1)
            k = min(int(r.sum(1).min()), r.shape[1] - 1)
            for row in r:
                extra = row.nonzero().flatten()[k:]
                if extra.numel():
                    row[extra] = False
                    changed = True
        # A grouped conv's input: the same count removed in every group, at least one left per group.
        for use in grouped_uses:
            f = use.flow
            rem = torch.zeros(len(f), dtype=torch.bool)
            for p in f.prod[f.prod >= 0].unique().tolist():
                sel = f.prod == p
                rem[sel] = removable[p][f.chan[sel]]
            r = rem.view(modules[use.module].groups, -1)
            k = min(int(r.sum(1).min()), r.shape[1] - 1)
            for gi, row in enumerate(r):
                extra = row.nonzero().flatten()[k:]
                for i in (extra + gi * r.shape[1]).tolist():
                    removable[int(f.prod[i])][int(f.chan[i])] = False
                    changed = True
    return removable


def _removed_at(flow, removable: List[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(len(flow), dtype=torch.bool)
    for p in flow.prod[flow.prod >= 0].unique().tolist():
        sel = flow.prod == p
        out[sel] = removable[p][flow.chan[sel]]
    return out


def slim_plan(model: nn.Module, kept: Mapping[str, torch.Tensor]) -> SlimPlan:
    """What :func:`slim_layers` removes and masks (see the module docstring), in the model's own indices."""
    kept = check_kept(model, kept)
    modules = dict(model.named_modules())
    pairs = conv_batchnorm_pairs(model)
    g = channel_graph(model, pairs)
    plan = SlimPlan(pairs=pairs, traced=g is not None)

    removable: Dict[str, torch.Tensor] = {}
    by_index: List[torch.Tensor] = []
    uses = {}
    if g is not None:
        by_index = _removable(g, kept, modules)
        removable = dict(zip(g.producers, by_index))
        uses = {u.module: u for u in g.uses}
        for bn, flow in g.carriers:
            plan.bn_remove[bn] = _removed_at(flow, by_index)

    for name, m in modules.items():
        if name in kept and is_attention(m):
            plan.heads[name] = ~kept[name]
        elif isinstance(m, nn.Conv2d):
            dropped = ~kept[name] if name in kept else torch.zeros(m.out_channels, dtype=torch.bool)
            remove = removable.get(name, torch.zeros(m.out_channels, dtype=torch.bool))
            lp = LayerPlan("conv", dropped, remove, dropped & ~remove)
            use = uses.get(name)
            lp.in_remove = (_removed_at(use.flow, by_index) if use is not None
                            else torch.zeros(m.in_channels, dtype=torch.bool))
            plan.layers[name] = lp
        elif isinstance(m, nn.Linear):
            dropped = ~kept[name] if name in kept else torch.zeros(m.in_features, dtype=torch.bool)
            remove = removable.get(name, torch.zeros(m.out_features, dtype=torch.bool))
            use = uses.get(name)
            if use is not None:
                arriving = ~_removed_at(use.flow, by_index).repeat_interleave(use.rep)
            else:
                arriving = torch.ones(m.in_features, dtype=torch.bool)
            columns = arriving & ~dropped
            zero_columns = torch.zeros_like(columns)
            if not columns.any():  # keep one column (zeroed when dropped)
                first = int(arriving.nonzero()[0])
                columns[first] = True
                zero_columns[first] = bool(dropped[first])
            plan.layers[name] = LayerPlan("linear", dropped, remove, torch.zeros_like(remove),
                                          columns=columns, arriving=arriving, zero_columns=zero_columns)
    return plan


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=like.requires_grad)


def _index(mask: torch.Tensor, device) -> torch.Tensor:
    return mask.nonzero().flatten().to(device)


def _remove_outputs(m: nn.Module, w: torch.Tensor, remove: torch.Tensor, size_attr: str, dev) -> torch.Tensor:
    """``w`` without the output rows ``remove`` of layer ``m``, whose bias and ``size_attr`` follow."""
    if not remove.any():
        return w
    keep_out = _index(~remove, dev)
    if m.bias is not None:
        m.bias = _param(m.bias[keep_out], m.bias)
    setattr(m, size_attr, keep_out.numel())
    return w[keep_out]


@torch.no_grad()
def _build(slim: nn.Module, plan: SlimPlan) -> nn.Module:
    modules = dict(slim.named_modules())
    # 0. Dropped heads: removed where the attention allows it, else their output projection columns zeroed.
    for name, dropped in plan.heads.items():
        if removable_heads(modules[name]) and not dropped.all():
            _set_module(slim, name, slim_attention(modules[name], ~dropped))
            continue
        proj = output_projection(modules[name])
        proj.weight[:, _index(head_columns(modules[name], dropped), proj.weight.device)] = 0
    # 1. Fold masks, in the original indices.
    for name, lp in plan.layers.items():
        m = modules[name]
        if lp.kind == "conv" and lp.mask.any():
            idx = _index(lp.mask, m.weight.device)
            bn = modules[plan.pairs[name]] if name in plan.pairs else None
            if bn is not None and bn.affine:
                bn.weight[idx] = 0
                bn.bias[idx] = 0
            else:
                m.weight[idx] = 0
                if bn is not None:  # no affine: the channel is a constant, the bias; make it the mean
                    if bn.running_mean is not None:
                        bn.running_mean[idx] = m.bias[idx] if m.bias is not None else 0
                elif m.bias is not None:
                    m.bias[idx] = 0
        elif lp.kind == "linear" and lp.zero_columns.any():
            m.weight[:, _index(lp.zero_columns, m.weight.device)] = 0

    # 2. Remove channels.
    for name, lp in plan.layers.items():
        m = modules[name]
        dev = m.weight.device
        if lp.kind == "conv":
            w = m.weight
            if lp.in_remove.any():
                g = m.groups
                in_per, out_per = m.in_channels // g, m.out_channels // g
                keep_in = (~lp.in_remove).view(g, in_per)
                w = torch.cat([w[gi * out_per:(gi + 1) * out_per][:, _index(keep_in[gi], dev)] for gi in range(g)])
                m.in_channels = int(keep_in.sum())
            w = _remove_outputs(m, w, lp.remove, "out_channels", dev)
            if w is not m.weight:
                m.weight = _param(w, m.weight)
        else:
            w = _remove_outputs(m, m.weight, lp.remove, "out_features", dev)
            if not torch.equal(lp.columns, torch.ones_like(lp.columns)):
                w = w[:, _index(lp.columns, dev)]
            if w is not m.weight:
                m.weight = _param(w, m.weight)
            m.in_features = m.weight.shape[1]
            if not torch.equal(lp.columns, lp.arriving):
                # The tensor reaching it carries features it drops: select the kept ones.
                where = _index(lp.columns[lp.arriving], dev)
                _set_module(slim, name, SelectLinear.from_linear(m, where))
    for name, rm in plan.bn_remove.items():
        if rm.any():
            bn = modules[name]
            keep_idx = _index(~rm, (bn.weight if bn.affine else bn.running_mean).device)
            if bn.affine:
                bn.weight = _param(bn.weight[keep_idx], bn.weight)
                bn.bias = _param(bn.bias[keep_idx], bn.bias)
            if bn.running_mean is not None:
                bn.running_mean = bn.running_mean[keep_idx].contiguous()
                bn.running_var = bn.running_var[keep_idx].contiguous()
            bn.num_features = keep_idx.numel()
    return slim


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def slim_layers(model: nn.Module, kept: Mapping[str, torch.Tensor]) -> nn.Module:
    """A physically smaller copy of ``model`` whose outputs equal the masked model's (module docstring).

    ``kept``: module name -> bool tensor of its kept units, ``[out_channels]`` for a Conv2d,
    ``[in_features]`` for a Linear; names not in it are fully kept. ``model`` is not modified.
    """
    plan = slim_plan(model, kept)
    return _build(_copy_without_hooks(model), plan)


def kept_by_layer(units, state: torch.Tensor) -> Dict[str, torch.Tensor]:
    """A state over ``units`` (uint8 or bool [D]) as the ``kept`` dict of :func:`slim_layers`."""
    if state.dim() != 1 or state.numel() != units.num_units:
        raise ValueError(f"state must have shape [{units.num_units}] (D units), got {list(state.shape)}")
    return {layer.name: state[layer.start:layer.stop].detach().cpu().bool() for layer in units
            if layer.kind != "classifier_out" and not layer.always_kept}


def slim(model: nn.Module, state: torch.Tensor, units=None, check_input: Optional[torch.Tensor] = None) -> nn.Module:
    """The physically smaller copy of ``model`` with ``state`` (uint8 or bool [D] over ``units``, by default
    ``edropout.prunable_units(model)``; an EDropout controller's is ``ed.state`` over ``ed.units``) applied:
    :func:`slim_layers` of its per-layer kept units.

    ``check_input``: a batch for ``model``; the slim network's eval-mode outputs on it are compared with the
    masked network's (a copy of ``model`` with ``state`` applied by :class:`~edropout.masks.UnitMasks`),
    and a ValueError is raised rather than a network that differs."""
    units = prunable_units(model) if units is None else units
    small = slim_layers(model, kept_by_layer(units, state))
    if check_input is not None:
        expected, got = _masked_output(model, state, units, check_input), _eval_output(small, check_input)
        scale = float(expected.abs().max()) + 1e-12
        difference = float((expected - got).abs().max()) if expected.shape == got.shape else float("inf")
        if not difference <= 1e-4 * scale:
            raise ValueError(f"slim: the slim network's outputs differ from the masked network's on check_input "
                             f"(max |difference| {difference:.3g}, outputs up to {scale:.3g}); not returned")
    return small


def _eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was_training)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def _masked_output(model: nn.Module, state: torch.Tensor, units, x: torch.Tensor) -> torch.Tensor:
    """``model``'s eval-mode output on ``x`` with ``state`` applied, on a copy without any other masks."""
    copy_ = _copy_without_hooks(model)
    modules = dict(copy_.named_modules())
    copy_units = PrunableUnits([replace(layer, module=modules[layer.name]) for layer in units])
    masks = UnitMasks(copy_, copy_units, conv_batchnorm_pairs(copy_))
    masks.mask.copy_(state.to(masks.mask))
    return _eval_output(copy_, x)


def kept_parameters(model: nn.Module, state: torch.Tensor, units=None) -> Tuple[float, int]:
    """(R, #p): the percentage and the number of ``model``'s trainable parameters that still act with
    ``state`` applied (over ``units``, by default ``edropout.prunable_units(model)``): those of the slim
    model, less those it zeroes to mask dropped units it cannot remove (a masked conv channel's kernel,
    bias and BatchNorm weight and bias; a zeroed Linear column). Where every dropped unit is removable
    this is the slim model's parameter count."""
    return slim_and_kept_parameters(model, state, units)[1:]


def slim_and_kept_parameters(model: nn.Module, state: torch.Tensor, units=None) -> Tuple[nn.Module, float, int]:
    """(slim network, R, #p): :func:`slim` and :func:`kept_parameters` of ``state`` from one slimming."""
    units = prunable_units(model) if units is None else units
    plan = slim_plan(model, kept_by_layer(units, state))
    small = _build(_copy_without_hooks(model), plan)
    count = sum(p.numel() for p in small.parameters() if p.requires_grad)
    modules = dict(small.named_modules())
    for name, lp in plan.layers.items():
        if name not in modules:  # inside an attention module whose heads were removed: nothing masked
            continue
        module = modules[name]  # the slim layer: a masked channel's kernel has the slim input width
        if lp.kind == "conv" and lp.mask.any():
            per_channel = module.weight[0].numel() + (1 if module.bias is not None else 0)
            bn = modules[plan.pairs[name]] if name in plan.pairs else None
            per_channel += 2 if bn is not None and bn.affine else 0
            count -= int(lp.mask.sum()) * per_channel
        elif lp.kind == "linear" and lp.zero_columns is not None:
            count -= int(lp.zero_columns.sum()) * module.out_features
    for name, dropped in plan.heads.items():  # a dropped head's zeroed output projection columns
        if not isinstance(modules[name], (SlimMultiheadAttention, SlimWindowAttention)):
            proj = output_projection(modules[name])
            count -= int(head_columns(modules[name], dropped).sum()) * proj.out_features
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return small, 100.0 * count / total, count


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose modules have no forward or backward hooks and no masked forwards
    (EDropout's masks are not carried into the slim model, which applies them itself)."""
    memo = {}
    for m in model.modules():
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if d is not None:
                memo[id(d)] = type(d)()
        forward = m.__dict__.get("forward")
        if getattr(forward, "absorbs_mask", False):  # a masked forward (edropout.masks): the class's instead
            memo[id(forward)] = None
    result = copy.deepcopy(model, memo)
    for m in result.modules():
        if "forward" in m.__dict__ and m.__dict__["forward"] is None:
            del m.forward
    return result
