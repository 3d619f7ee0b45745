"""How the channels of a network flow from the layers that make them to the layers that use them.

``conv_batchnorm_pairs(model)`` tells which ``BatchNorm2d`` directly consumes each ``Conv2d``'s output: a
dropped Conv2d output channel is zeroed after that BatchNorm (or right after the conv when there is
none), so the pairs say where EDropout's masks go.

``channel_graph(model, pairs)`` is what slimming (:mod:`edropout.slim`) needs: on the ``torch.fx``
graph of the model, every channel of every traced tensor is followed back to the channel of the layer
that made it, its *producer*: a ``Conv2d`` output channel or a ``Linear`` output feature. A channel keeps
its producer through per-channel ops (BatchNorm2d, ReLU and other elementwise activations, pooling,
dropout, ``torch.cat`` along channels, flattening a conv map into features) and reaches its *uses*: the
input channels of a ``Conv2d`` and the input features of a ``Linear``. Every other use (a residual sum,
the network's output, an op this module does not know) *blocks* the channels it sees: they can be
neither removed nor assumed unused. Each channel also carries whether it is exactly zero wherever its
producer's unit is dropped (it passed the mask point and only zero-preserving ops since).

Both trace with ``torch.fx.symbolic_trace``. When that fails (data-dependent control flow, say),
``conv_batchnorm_pairs`` falls back to module order and ``channel_graph`` returns ``None``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from numbers import Number
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_batchnorm_pairs", "trace", "Flow", "Use", "ChannelGraph", "channel_graph"]


def trace(model: nn.Module) -> Optional[torch.fx.GraphModule]:
    """``torch.fx.symbolic_trace(model)``, or ``None`` when the model cannot be traced symbolically."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001  (fx raises many kinds: TraceError, TypeError, NotImplementedError...)
        return None


def _call_sites(gm: torch.fx.GraphModule) -> Dict[str, List[torch.fx.Node]]:
    sites: Dict[str, List[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sites.setdefault(node.target, []).append(node)
    return sites


def _pairs_from_graph(gm: torch.fx.GraphModule, modules: Dict[str, nn.Module]) -> Dict[str, str]:
    pairs: Dict[str, str] = {}
    for name, nodes in _call_sites(gm).items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            continue
        found = set()
        for node in nodes:
            bns = [u.target for u in node.users
                   if u.op == "call_module" and isinstance(modules.get(u.target), nn.BatchNorm2d)
                   and u.args and u.args[0] is node]
            found.add(bns[0] if len(bns) == 1 else None)
        if len(found) == 1 and None not in found:
            bn_name = found.pop()
            if modules[bn_name].num_features == conv.out_channels:
                pairs[name] = bn_name
    return pairs


def _pairs_from_order(model: nn.Module) -> Dict[str, str]:
    pairs: Dict[str, str] = {}
    named = [(n, m) for n, m in model.named_modules() if not list(m.children())]  # leaves, in order
    for (name, module), (next_name, next_module) in zip(named, named[1:]):
        if (isinstance(module, nn.Conv2d) and isinstance(next_module, nn.BatchNorm2d)
                and next_module.num_features == module.out_channels):
            pairs[name] = next_name
    return pairs


def conv_batchnorm_pairs(model: nn.Module) -> Dict[str, str]:
    """Conv2d name -> name of the BatchNorm2d that directly consumes that conv's output.

    Found on the ``torch.fx`` graph (a conv called at several places is paired only when every call feeds
    the same BatchNorm2d). When the model cannot be traced, a BatchNorm2d that comes right after the conv
    in ``model.named_modules()`` with ``num_features == out_channels`` is taken as its pair. Convs with no
    such BatchNorm2d are absent.
    """
    gm = trace(model)
    if gm is None:
        return _pairs_from_order(model)
    return _pairs_from_graph(gm, dict(model.named_modules()))


# ----------------------------------------------------------------------------------------------------
# Channel flow

# Modules and functions that act on each channel alone and map 0 to 0 (in train and eval mode).
_ZERO_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
                 nn.Mish, nn.Hardswish, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
                 nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool2d)
_ZERO_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.hardtanh, F.elu,
                   F.celu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, torch.tanh, F.tanh, F.softsign,
                   F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.max_pool2d,
                   F.hardshrink, F.softshrink}
_ZERO_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "float", "detach"}
# Per-channel ops that do not keep 0 at 0.
_AFFINE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_AFFINE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus}
_AFFINE_METHODS = {"sigmoid"}
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                   torch.max_pool2d}


def _per_channel_module(m: nn.Module, x: "Flow") -> bool:
    if isinstance(m, _POOLS):
        return x.dim == 1 and x.rep == 1 and not getattr(m, "return_indices", False)
    return isinstance(m, _ZERO_MODULES + _AFFINE_MODULES)


def _keeps_zero_module(m: nn.Module) -> bool:
    if isinstance(m, nn.Hardtanh):  # ReLU6 too
        return m.min_val <= 0 <= m.max_val
    return isinstance(m, _ZERO_MODULES)


@dataclass
class Flow:
    """Where the channels of one traced tensor come from.

    ``prod[i]``/``chan[i]``: producer index (into ``ChannelGraph.producers``; -1 for none) and channel of
    the tensor's channel i; ``zeroed[i]``: the channel is exactly zero whenever its producer unit is
    dropped. ``dim`` is the channel dimension (1 for conv maps, -1 for Linear features; a flattened map is
    2-D, so both), ``ndim`` the tensor's rank when known, and ``rep`` how many consecutive features each
    channel spans: 1, or ``None`` after flattening a conv map until a Linear tells (in_features / channels).
    """

    prod: torch.Tensor
    chan: torch.Tensor
    zeroed: torch.Tensor
    dim: int
    ndim: Optional[int]
    rep: Optional[int] = 1

    def __len__(self) -> int:
        return self.prod.numel()

    def replace(self, **kw) -> "Flow":
        d = dict(prod=self.prod, chan=self.chan, zeroed=self.zeroed, dim=self.dim, ndim=self.ndim, rep=self.rep)
        d.update(kw)
        return Flow(**d)

    @property
    def last_dim(self) -> bool:
        return self.dim == -1 or (self.ndim is not None and self.dim == self.ndim - 1)


@dataclass
class Use:
    """A layer using traced channels as its inputs: ``kind`` is "conv" (input channels) or "linear"
    (input features; channel i of the flow is features ``i*rep .. i*rep + rep - 1``)."""

    module: str
    kind: str
    flow: Flow
    rep: int = 1


@dataclass
class ChannelGraph:
    """Producers (Conv2d and Linear modules called once), their kinds and sizes; the uses of their channels;
    the BatchNorm2d modules carrying them (name, flow of the BatchNorm's input); and, per producer, the
    channels some use blocks (they must stay)."""

    producers: List[str] = field(default_factory=list)
    kinds: List[str] = field(default_factory=list)  # "conv" or "linear"
    sizes: List[int] = field(default_factory=list)
    uses: List[Use] = field(default_factory=list)
    carriers: List[Tuple[str, Flow]] = field(default_factory=list)
    blocked: List[torch.Tensor] = field(default_factory=list)

    def block(self, flow: Flow) -> None:
        for p in flow.prod.unique().tolist():
            if p >= 0:
                self.blocked[p][flow.chan[flow.prod == p]] = True


def _norm_dim(dim: int, ndim: Optional[int]) -> Optional[int]:
    if dim >= 0:
        return dim
    return None if ndim is None else dim + ndim


def _same_dim(a: int, b: int, ndim: Optional[int]) -> bool:
    return a == b or (ndim is not None and _norm_dim(a, ndim) == _norm_dim(b, ndim))


def _arg(node: torch.fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _neutral_use(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """A use that reads only the batch size: ``x.size(0)``, ``x.shape[0]``."""
    if user.op == "call_method" and user.target == "size":
        return _arg(user, 1, "dim") == 0
    if user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",):
        return all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0
                   for u in user.users)
    return False


def channel_graph(model: nn.Module, pairs: Optional[Dict[str, str]] = None) -> Optional[ChannelGraph]:
    """The channel flow of ``model`` (see the module docstring), or ``None`` when it cannot be traced.

    ``pairs`` (default ``conv_batchnorm_pairs(model)``) says where the conv masks are applied.
    """
    gm = trace(model)
    if gm is None:
        return None
    modules = dict(model.named_modules())
    if pairs is None:
        pairs = _pairs_from_graph(gm, modules)
    sites = _call_sites(gm)
    bn_of = {bn: conv for conv, bn in pairs.items()}
    g = ChannelGraph()
    flows: Dict[torch.fx.Node, Flow] = {}

    def new_producer(name: str, kind: str, size: int) -> int:
        g.producers.append(name)
        g.kinds.append(kind)
        g.sizes.append(size)
        g.blocked.append(torch.zeros(size, dtype=torch.bool))
        return len(g.producers) - 1

    for node in gm.graph.nodes:
        # Uses of traced tensors by ops not handled below block them; neutral uses (batch size) do not.
        ins = [a for a in node.all_input_nodes if a in flows and not _neutral_use(node, a)]
        x = flows.get(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) else None
        out: Optional[Flow] = None
        handled = False

        m = modules[node.target] if node.op == "call_module" else None
        # A Conv2d, Linear or BatchNorm2d called at several places (or given a second tensor): unknown.
        # Its inputs are blocked below, and so are its own channels. Stateless modules may be shared.
        unknown = isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) and (
            len(sites[node.target]) > 1 or any(a is not node.args[0] for a in ins))
        if unknown:
            if isinstance(m, (nn.Conv2d, nn.Linear)) and node.target not in g.producers:
                kind, n = ("conv", m.out_channels) if isinstance(m, nn.Conv2d) else ("linear", m.out_features)
                g.blocked[new_producer(node.target, kind, n)][:] = True
        elif isinstance(m, nn.Conv2d):
            if x is not None and x.dim == 1 and x.ndim == 4 and len(x) == m.in_channels:
                g.uses.append(Use(node.target, "conv", x))
            elif x is not None:
                g.block(x)
            p, n = new_producer(node.target, "conv", m.out_channels), m.out_channels
            zeroed = node.target not in pairs  # else zeroed after its BatchNorm
            out = Flow(torch.full((n,), p), torch.arange(n), torch.full((n,), zeroed), 1, 4)
            handled = True
        elif isinstance(m, nn.Linear):
            if x is not None and x.last_dim and x.rep is None and m.in_features % len(x) == 0:
                g.uses.append(Use(node.target, "linear", x, m.in_features // len(x)))
            elif x is not None and x.last_dim and x.rep == 1 and len(x) == m.in_features:
                g.uses.append(Use(node.target, "linear", x, 1))
            elif x is not None:
                g.block(x)
            p, n = new_producer(node.target, "linear", m.out_features), m.out_features
            ndim = x.ndim if x is not None else None
            out = Flow(torch.full((n,), p), torch.arange(n), torch.zeros(n, dtype=torch.bool), -1, ndim)
            handled = True
        elif node.op == "call_module":
            if isinstance(m, nn.BatchNorm2d) and x is not None and x.dim == 1 and x.rep == 1:
                g.carriers.append((node.target, x))
                src = node.args[0]
                mask_point = node.target in bn_of and src.op == "call_module" and src.target == bn_of[node.target]
                out = x.replace(zeroed=torch.full((len(x),), mask_point))
            elif isinstance(m, nn.Flatten) and x is not None:
                out = _flatten(x, m.start_dim, m.end_dim)
            elif x is not None and all(a is node.args[0] for a in ins) and _per_channel_module(m, x):
                out = x if _keeps_zero_module(m) else x.replace(zeroed=torch.zeros_like(x.zeroed))
            handled = out is not None
        elif node.op == "call_function":
            fn = node.target
            others = [a for a in ins if a is not node.args[0]] if node.args else ins
            if fn in _ZERO_FUNCTIONS | _AFFINE_FUNCTIONS and x is not None and not others:
                if fn not in _POOL_FUNCTIONS or (x.dim == 1 and x.rep == 1 and not _arg(node, 99, "return_indices")):
                    keeps_zero = fn in _ZERO_FUNCTIONS and (fn is not F.hardtanh or _arg(node, 1, "min_val", -1.0)
                                                            <= 0 <= _arg(node, 2, "max_val", 1.0))
                    out = x if keeps_zero else x.replace(zeroed=torch.zeros_like(x.zeroed))
                    handled = True
            elif fn is torch.flatten and x is not None and not others:
                out = _flatten(x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
                handled = out is not None
            elif fn is torch.cat:
                out = _cat(node, flows)
                handled = out is not None
            elif fn in (operator.mul, torch.mul, operator.truediv, torch.div, operator.add, torch.add,
                        operator.sub, torch.sub) and len(node.args) == 2 and not node.kwargs:
                a, b = node.args
                commutes = fn in (operator.mul, torch.mul, operator.add, torch.add)
                if (isinstance(b, Number) and a in ins) or (isinstance(a, Number) and b in ins and commutes):
                    f = flows[a] if a in ins else flows[b]
                    keeps_zero = fn in (operator.mul, torch.mul, operator.truediv, torch.div)
                    out = f if keeps_zero else f.replace(zeroed=torch.zeros_like(f.zeroed))
                    handled = True
        elif node.op == "call_method":
            name = node.target
            others = ins[1:] if ins and ins[0] is node.args[0] else ins
            if x is not None and not others:
                if name in _ZERO_METHODS or name in _AFFINE_METHODS:
                    out = x if name in _ZERO_METHODS else x.replace(zeroed=torch.zeros_like(x.zeroed))
                    handled = True
                elif name == "flatten":
                    out = _flatten(x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
                    handled = out is not None
                elif name in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1:
                    out = _flatten(x, 1, -1)  # x.view(x.size(0), -1)
                    handled = out is not None
            elif name == "size" and not ins:
                handled = True

        if out is not None:
            flows[node] = out
        if not handled:
            for a in ins:
                g.block(flows[a])
    return g


def _flatten(x: Flow, start: int, end: int) -> Optional[Flow]:
    if x.ndim is None:
        return None
    start, end = _norm_dim(start, x.ndim), _norm_dim(end, x.ndim)
    if start == end:
        return x
    if x.ndim == 4 and x.dim == 1 and x.rep == 1 and start == 1 and end == 3:
        return x.replace(ndim=2, rep=None)
    return None


def _cat(node: torch.fx.Node, flows: Dict[torch.fx.Node, Flow]) -> Optional[Flow]:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors:
        return None
    parts = [flows.get(t) for t in tensors]
    if any(p is None for p in parts):
        return None
    first = parts[0]
    if any(p.rep != 1 or p.dim != first.dim or p.ndim != first.ndim for p in parts):
        return None
    if not _same_dim(dim, first.dim, first.ndim):
        return None
    return Flow(torch.cat([p.prod for p in parts]), torch.cat([p.chan for p in parts]),
                torch.cat([p.zeroed for p in parts]), first.dim, first.ndim, 1)
