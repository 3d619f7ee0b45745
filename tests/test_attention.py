"""Attention heads as units: a dropped head contributes exactly nothing and none of its weights gets a
gradient (nn.MultiheadAttention, both layouts, and torchvision's Swin attention), candidates scored in one
batched forward equal their own forwards, and slimming removes the heads."""

import copy
import importlib

import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

import edropout
from edropout import EDropout
from edropout.heads import SlimMultiheadAttention, SlimWindowAttention


class Transformer(nn.Module):
    """Tokens of 16 features: an attention block and an MLP block, each with a residual; mean-pooled head."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(8, 16)
        self.attention = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):  # x: [B, L, 8]
        x = self.embed(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = x + self.mlp(x)
        return self.head(x.mean(dim=1))


class Windows(nn.Module):
    """Swin attention on a 4x4 grid of 16 features (windows of 2, shifted by 1), pooled head."""

    def __init__(self, v2=False):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 1)
        attention = ShiftedWindowAttentionV2 if v2 else ShiftedWindowAttention
        self.attention = attention(16, window_size=[2, 2], shift_size=[1, 1], num_heads=4)
        self.head = nn.Linear(16, 5)

    def forward(self, x):  # x: [B, 3, 4, 4]
        x = self.embed(x).permute(0, 2, 3, 1)
        x = x + self.attention(x)
        return self.head(x.mean(dim=(1, 2)))


NETWORKS = {"mha": (Transformer, (6, 5, 8)), "mha-sequence-first": (lambda: Transformer(False), (6, 5, 8)),
            "swin": (Windows, (6, 3, 4, 4)), "swin-v2": (lambda: Windows(True), (6, 3, 4, 4))}


def _network(kind, gen):
    make, shape = NETWORKS[kind]
    torch.manual_seed(int(torch.randint(1 << 30, (), generator=gen)))
    return make(), torch.randn(*shape, generator=gen)


def _heads_layer(ed):
    (layer,) = [layer for layer in ed.units if layer.kind == "heads"]
    return layer


def _state_dropping(ed, heads, gen):
    """A random state of the other units, with ``heads`` of the attention dropped and the rest kept."""
    layer = _heads_layer(ed)
    state = (torch.rand(ed.units.num_units, generator=gen) < 0.7) | ed.units.always_kept()
    state[layer.start:layer.stop] = True
    state[layer.start + torch.tensor(heads, dtype=torch.long)] = False
    return state


@pytest.mark.parametrize("kind", NETWORKS)
def test_heads_are_units_and_the_layers_inside_attention_are_not(kind, gen):
    model, _ = _network(kind, gen)
    units = edropout.prunable_units(model)
    assert [(layer.name, layer.kind, layer.size) for layer in units if "attention" in layer.name] == \
        [("attention", "heads", 4)]


@pytest.mark.parametrize("kind", NETWORKS)
def test_a_dropped_head_contributes_nothing_and_gets_no_gradient(kind, gen):
    model, x = _network(kind, gen)
    reference = copy.deepcopy(model)  # the same network with the dropped head's projection columns zeroed
    ed = EDropout(model, seed=int(torch.randint(1000, (), generator=gen)))
    dropped = sorted(torch.randperm(4, generator=gen)[:2].tolist())
    state = _state_dropping(ed, dropped, gen)
    ed.freeze(state)
    for layer in ed.units:  # the other units of the reference: a hook-free copy of the masking
        if layer.kind != "heads":
            module = reference.get_submodule(layer.name)
            m = state[layer.start:layer.stop].float()
            if layer.kind == "conv_out":
                module.register_forward_hook(lambda mod, i, out, m=m: out * m.view(1, -1, 1, 1))
            elif layer.kind == "linear_in":
                module.register_forward_pre_hook(lambda mod, args, m=m: (args[0] * m,))
    projection = reference.attention.out_proj if kind.startswith("mha") else reference.attention.proj
    columns = torch.ones(4).index_fill(0, torch.tensor(dropped), 0).repeat_interleave(4)
    with torch.no_grad():
        projection.weight.mul_(columns)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        reference.train(mode == "train")
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    model.train()
    model(x).square().sum().backward()
    attention = model.attention
    inner = attention.in_proj_weight if kind.startswith("mha") else attention.qkv.weight
    rows = inner.grad.view(3, 4, 4, -1)  # (q, k, v) x head x head_dim x in
    proj = attention.out_proj if kind.startswith("mha") else attention.proj
    for h in range(4):
        zero = h in dropped
        assert (rows[:, h].abs().max() == 0) == zero, h
        assert (proj.weight.grad.view(16, 4, 4)[:, h].abs().max() == 0) == zero, h


@pytest.mark.parametrize("kind", NETWORKS)
def test_candidates_in_one_batched_forward_equal_their_own_forwards(kind, gen):
    model, x = _network(kind, gen)
    ed = EDropout(model, energy=edropout.EnergyLoss(subbatch=None))
    states = torch.stack([_state_dropping(ed, torch.randperm(4, generator=gen)[:k].tolist(), gen)
                          for k in (0, 1, 2, 3)]).to(torch.uint8)
    together = ed._candidate_logits(states, x)
    model.eval()
    for k in range(len(states)):
        with ed.applying(states[k]), torch.no_grad():
            torch.testing.assert_close(together[k], model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", NETWORKS)
def test_slim_removes_the_dropped_heads(kind, gen):
    model, x = _network(kind, gen)
    ed = EDropout(model)
    state = _state_dropping(ed, [1, 3], gen)
    small = edropout.slim(model, state, ed.units, check_input=x)  # raises unless outputs are equal
    percent, kept = edropout.kept_parameters(model, state, ed.units)
    # removed: the q, k, v rows and output projection columns of two heads of four
    attention = small.attention
    assert isinstance(attention, SlimMultiheadAttention if kind.startswith("mha") else SlimWindowAttention)
    inner = attention.in_proj_weight if kind.startswith("mha") else attention.qkv.weight
    projection = attention.out_proj if kind.startswith("mha") else attention.proj
    assert inner.shape == (3 * 2 * 4, 16) and projection.in_features == 8
    assert kept <= sum(p.numel() for p in small.parameters())
    if kind.startswith("mha"):
        assert kept == sum(p.numel() for p in small.parameters()) - _zeroed_elsewhere(small)


def _zeroed_elsewhere(small):
    """Parameters slimming zeroed to mask units it could not remove, outside the attention."""
    zero_columns = (small.embed.weight == 0).all(dim=0).sum() * small.embed.out_features
    return int(zero_columns)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("batch_first", [True, False])
def test_slim_multihead_attention_equals_the_masked_one(batch_first, gen):
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    kept = torch.tensor([True, False, True, True])
    masked = copy.deepcopy(attention)
    with torch.no_grad():
        masked.out_proj.weight.mul_(kept.float().repeat_interleave(4))
    slim = SlimMultiheadAttention(attention, kept).eval()
    shape = (6, 3, 16) if batch_first else (3, 6, 16)  # 6 = batch
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    padding = torch.rand(6, 3, generator=gen) < 0.3
    padding[:, 0] = False
    causal = torch.ones(3, 3, dtype=torch.bool).triu(1)
    per_head = torch.randn(6 * 4, 3, 3, generator=gen)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": causal}, {"attn_mask": per_head},
                   {"attn_mask": causal.float() * -1e4, "key_padding_mask": padding}, {"need_weights": False}):
        expected, _ = masked(q, k, v, **kwargs)
        got, _ = slim(q, k, v, **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    one = (q[0] if batch_first else q[:, 0])  # unbatched: [L, E]
    torch.testing.assert_close(slim(one, one, one)[0], masked(one, one, one)[0], rtol=1e-4, atol=1e-5)


def test_slim_refuses_a_network_that_differs(gen, monkeypatch):
    model, x = _network("mha", gen)
    ed = EDropout(model)
    state = _state_dropping(ed, [0], gen)
    slim_module = importlib.import_module("edropout.slim")
    build = slim_module._build

    def broken(slim, plan):  # a slimming that forgets the heads
        plan.heads.clear()
        return build(slim, plan)
    monkeypatch.setattr(slim_module, "_build", broken)
    with pytest.raises(ValueError, match="^slim: the slim network's outputs differ from the masked network's"):
        edropout.slim(model, state, ed.units, check_input=x)


@pytest.mark.parametrize("kind", NETWORKS)
def test_a_slim_file_with_removed_heads_loads_into_a_fresh_network(kind, gen, tmp_path):
    model, x = _network(kind, gen)
    ed = EDropout(model)
    state = _state_dropping(ed, [0, 2], gen)
    small = edropout.slim(model, state, ed.units).eval()
    edropout.save_slim(tmp_path / "slim.pt", small, state, {"model": kind})
    fresh, _ = _network(kind, gen)  # the same architecture, other weights
    again = edropout.load_slim(tmp_path / "slim.pt", model=fresh)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x))
