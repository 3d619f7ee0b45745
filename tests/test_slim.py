"""Slimming: the slim model computes what the masked model computes, with fewer parameters.

The masked reference here applies a keep-state with forward hooks, as EDropout does: a dropped Conv2d
output channel is zeroed after the BatchNorm2d that directly consumes the conv's output (else right after
the conv), a dropped Linear input feature at the Linear's input.
"""

import copy
import io
import zlib

import pytest
import torch
import torchvision
from torch import nn

from edropout.graph import channel_graph, conv_batchnorm_pairs
from edropout import prunable_units
from edropout.slim import SelectLinear, kept_by_layer, slim_layers, slim_plan
from edropout.slimfile import load_slim, save_slim

RTOL = 1e-5
MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "alexnet", "squeezenet1_1"]
# Layers whose units are all dropped in the "whole layer" case: one removable, one masked or a Linear.
WHOLE = {"resnet18": ["layer2.0.conv1", "layer3.0.conv2", "fc"],
         "resnet34": ["layer2.0.conv1", "layer3.0.conv2", "fc"],
         "resnet50": ["layer2.0.conv2", "layer3.0.conv3", "fc"],
         "resnet101": ["layer2.0.conv2", "layer3.0.conv3", "fc"],
         "alexnet": ["features.3", "classifier.4"],
         "squeezenet1_1": ["features.3.squeeze", "features.12.expand3x3"]}


# ---------------------------------------------------------------------------------------------------
# The masked reference and helpers


def add_mask_hooks(model, keep):
    pairs = conv_batchnorm_pairs(model)
    modules = dict(model.named_modules())
    handles = []
    for name, k in keep.items():
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            mk = k.to(torch.float32).view(1, -1, 1, 1)
            target = modules[pairs.get(name, name)]
            handles.append(target.register_forward_hook(lambda mod, inp, out, mk=mk: out * mk))
        else:
            mk = k.to(torch.float32)
            handles.append(m.register_forward_pre_hook(lambda mod, inp, mk=mk: (inp[0] * mk,) + tuple(inp[1:])))
    return handles


@torch.no_grad()
def masked_output(model, keep, x):
    handles = add_mask_hooks(model, keep)
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


def assert_same_output(y, ref, rtol=RTOL):
    assert y.shape == ref.shape
    err = float((y - ref).norm())
    assert err <= rtol * float(ref.norm()), f"relative error {err / float(ref.norm()):.3g}"


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, repr(model)


def assert_unchanged(model, snap):
    state, text = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k
    assert repr(model) == text


def randomise_batchnorm(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)


def random_keep(model, gen, p=0.5):
    keep = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            keep[name] = torch.rand(m.out_channels, generator=gen) < p
        elif isinstance(m, nn.Linear):
            keep[name] = torch.rand(m.in_features, generator=gen) < p
    return keep


_MODELS = {}


def torchvision_model(name):
    """The model, built once per run (weights from a fixed seed, BatchNorm statistics randomised)."""
    if name not in _MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(zlib.crc32(name.encode()))
            model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
        randomise_batchnorm(model, g)
        _MODELS[name] = model
    return _MODELS[name]


def model_input(name, gen):
    size = 32 if name.startswith("resnet") else 224
    return torch.randn(2, 3, size, size, generator=gen)


def check_slim(model, keep, x):
    """Slims ``model``; checks the output against the masked model's and that ``model`` is unchanged."""
    snap = snapshot(model)
    ref = masked_output(model, keep, x)
    slim = slim_layers(model, keep)
    assert_unchanged(model, snap)
    assert slim is not model
    with torch.no_grad():
        y = slim.eval()(x)
    assert_same_output(y, ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in slim.modules())
    return slim


# ---------------------------------------------------------------------------------------------------
# torchvision networks


@pytest.mark.parametrize("case", ["half", "whole_layer", "all_kept"])
@pytest.mark.parametrize("name", MODELS)
def test_torchvision(name, case, gen):
    model = torchvision_model(name)
    x = model_input(name, gen)
    keep = random_keep(model, gen)
    if case == "whole_layer":
        for layer in WHOLE[name]:
            keep[layer] = torch.zeros_like(keep[layer])
    elif case == "all_kept":
        keep = {k: torch.ones_like(v) for k, v in keep.items()}
    slim = check_slim(model, keep, x)
    if case == "all_kept":
        assert n_params(slim) == n_params(model)
        assert not any(isinstance(m, SelectLinear) for m in slim.modules())
        with torch.no_grad():
            assert torch.equal(slim(x), model(x))
    else:
        assert n_params(slim) < n_params(model)
    if case == "whole_layer":
        modules = dict(slim.named_modules())
        for layer in WHOLE[name]:
            m = modules[layer]
            assert (m.out_channels if isinstance(m, nn.Conv2d) else m.in_features) >= 1


def test_what_is_removed_and_what_is_masked(gen):
    """Residual-stream channels are masked (folded into BatchNorm), the rest removed."""
    r18 = torchvision_model("resnet18")
    keep = random_keep(r18, gen)
    keep["conv1"][:2] = False
    keep["layer1.0.conv1"][:2] = False
    slim = slim_layers(r18, keep)
    # ResNet-18's stem joins the residual stream: masked. A block's first conv: removed with its BN.
    assert slim.conv1.out_channels == 64
    assert torch.all(slim.bn1.weight[~keep["conv1"]] == 0) and torch.all(slim.bn1.bias[~keep["conv1"]] == 0)
    n = int(keep["layer1.0.conv1"].sum())
    assert slim.layer1[0].conv1.out_channels == n == slim.layer1[0].bn1.num_features
    assert slim.layer1[0].conv2.in_channels == n
    assert slim.layer1[0].conv2.out_channels == 64  # joins the residual sum
    assert isinstance(slim.fc, SelectLinear) and slim.fc.in_features == int(keep["fc"].sum())

    # ResNet-50's stem feeds two convolutions (the first block has a downsample): removed.
    r50 = torchvision_model("resnet50")
    keep = random_keep(r50, gen)
    keep["conv1"][:2] = False
    slim = slim_layers(r50, keep)
    n = int(keep["conv1"].sum())
    assert slim.conv1.out_channels == n == slim.bn1.num_features == slim.layer1[0].conv1.in_channels
    assert slim.layer1[0].downsample[0].in_channels == n
    assert slim.layer1[0].conv3.out_channels == 256

    # AlexNet: dropped channels of the last conv go with their 36 Linear columns; partly dropped ones stay.
    ax = torchvision_model("alexnet")
    keep = random_keep(ax, gen)
    keep["classifier.1"] = torch.ones(9216, dtype=torch.bool)
    keep["classifier.1"][36 * 3 + 5] = False  # one column of channel 3
    keep["features.10"][3] = True
    slim = slim_layers(ax, keep)
    kept = int(keep["features.10"].sum())
    assert slim.features[10].out_channels == kept
    assert isinstance(slim.classifier[1], SelectLinear) and slim.classifier[1].in_features == 36 * kept - 1
    assert slim.classifier[1].out_features == int(keep["classifier.4"].sum())  # rows the next Linear drops
    x = model_input("alexnet", gen)
    with torch.no_grad():
        assert_same_output(slim.eval()(x), masked_output(ax, keep, x))

    # SqueezeNet's classifier convolution gives the outputs: masked; everything else removed.
    sq = torchvision_model("squeezenet1_1")
    keep = random_keep(sq, gen)
    plan = slim_plan(sq, keep)
    s = plan.summary()
    assert s["masked"] == int((~keep["classifier.1"]).sum())
    assert s["removed"] + s["masked"] == s["dropped"]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_script_trace_and_save(gen):
    for name in ["resnet18", "alexnet"]:
        model = torchvision_model(name)
        x = model_input(name, gen)
        keep = random_keep(model, gen)
        slim = slim_layers(model, keep).eval()
        with torch.no_grad():
            y = slim(x)
            assert torch.allclose(torch.jit.script(slim)(x), y, rtol=1e-5, atol=1e-6)
            if name == "resnet18":
                assert torch.allclose(torch.jit.trace(slim, x)(x), y, rtol=1e-5, atol=1e-6)
        # save_slim / load_slim: plain data, rebuilt by slimming a network of the same architecture
        units = prunable_units(model)
        state = (torch.rand(units.num_units, generator=gen) < 0.6).to(torch.uint8)
        small = slim_layers(model, kept_by_layer(units, state)).eval()
        buf = io.BytesIO()
        save_slim(buf, small, state, {"model": name})
        buf.seek(0)
        loaded = load_slim(buf, model=copy.deepcopy(model))
        with torch.no_grad():
            assert torch.equal(loaded(x), small(x)) and not loaded.training
    for contents in ({"weight": torch.randn(2)}, nn.ReLU()):  # another file; a pickled module
        buf = io.BytesIO()
        torch.save(contents, buf)
        buf.seek(0)
        with pytest.raises(ValueError, match="not a slim file"):
            load_slim(buf, model=model)


def test_hooks_on_the_input_are_not_copied(gen):
    model = torchvision_model("resnet18")
    x = model_input("resnet18", gen)
    keep = random_keep(model, gen)
    handles = add_mask_hooks(model, keep)
    try:
        with torch.no_grad():
            ref = model(x)
        slim = slim_layers(model, keep)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        assert_same_output(slim.eval()(x), ref)


def test_train_mode_matches(gen):
    """BatchNorm in train mode (batch statistics): still the masked model's output."""
    model = torchvision_model("resnet18")
    x = torch.randn(4, 3, 32, 32, generator=gen)
    keep = random_keep(model, gen)
    slim = slim_layers(model, keep)
    train_copy = copy.deepcopy(model).train()
    ref = masked_output(train_copy, keep, x)
    # Batch statistics over 4 samples of a 1 x 1 map (the last stage) divide by small standard deviations,
    # which magnify the rounding differences of the slimmer convolutions' sums: 10x the eval-mode tolerance.
    with torch.no_grad():
        assert_same_output(slim.train()(x), ref, rtol=10 * RTOL)


# ---------------------------------------------------------------------------------------------------
# Users' networks


class UserCNN(nn.Module):
    """A grouped conv, a concatenation, a BatchNorm after a ReLU (not a mask point: it does not keep
    zeros), a residual sum, view-flatten and a two-Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.branch_a = nn.Conv2d(24, 8, 1)
        self.branch_b = nn.Conv2d(24, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.skip = nn.Conv2d(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(64, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = self.bn3(torch.relu(torch.cat([self.branch_a(x), torch.relu(self.branch_b(x))], 1)))
        x = torch.relu(self.conv3(x) + self.skip(x))
        x = self.pool(x)
        x = x.view(x.size(0), -1)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def user_model(gen):
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        model = UserCNN().eval()
    randomise_batchnorm(model, gen)
    return model


def test_user_cnn_pairs_and_graph():
    model = UserCNN()
    assert conv_batchnorm_pairs(model) == {"conv1": "bn1", "conv2": "bn2"}
    g = channel_graph(model)
    blocked = dict(zip(g.producers, g.blocked))
    assert blocked["conv3"].all() and blocked["skip"].all()  # residual sum
    assert not blocked["conv1"].any() and not blocked["branch_a"].any() and not blocked["fc1"].any()
    # Dropped branch channels are zero before bn3, not after it: they are masked.
    keep = {"branch_a": torch.tensor([False] * 4 + [True] * 4), "branch_b": torch.tensor([True] * 7 + [False])}
    assert slim_plan(model, keep).summary() == {"dropped": 5, "removed": 0, "masked": 5}
    assert blocked["fc2"].all()  # the output


@pytest.mark.parametrize("trial", range(4))
def test_user_cnn(trial, gen):
    model = user_model(gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    keep = random_keep(model, gen)
    slim = check_slim(model, keep, x)
    assert n_params(slim) < n_params(model)
    c2 = slim.conv2
    assert c2.groups == 2 and c2.weight.shape[0] == c2.out_channels and c2.weight.shape[1] * 2 == c2.in_channels
    assert slim.conv1.out_channels <= 16 and slim.bn1.num_features == slim.conv1.out_channels


def test_user_cnn_group_balancing(gen):
    """conv1's dropped channels all in conv2's first group: only as many go as the second group allows."""
    model = user_model(gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    k = torch.ones(16, dtype=torch.bool)
    k[[0, 1, 2, 3, 9]] = False  # group 0 (inputs 0-7) loses 4, group 1 (8-15) loses 1
    keep = {"conv1": k}
    slim = check_slim(model, keep, x)
    assert slim.conv1.out_channels == 14 and slim.conv2.in_channels == 14
    plan = slim_plan(model, keep).summary()
    assert plan == {"dropped": 5, "removed": 2, "masked": 3}
    # conv2's own output channels: 5 dropped in group 0 and 2 in group 1 -> 2 removed from each.
    k2 = torch.ones(24, dtype=torch.bool)
    k2[[0, 1, 2, 3, 4, 12, 13]] = False
    slim = check_slim(model, {"conv2": k2}, x)
    assert slim.conv2.out_channels == 20


def test_user_cnn_all_units_of_a_layer(gen):
    model = user_model(gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    for layer, n in [("conv1", 16), ("branch_a", 8), ("fc1", 64), ("fc2", 32)]:
        keep = random_keep(model, gen)
        keep[layer] = torch.zeros(n, dtype=torch.bool)
        check_slim(model, keep, x)


class Shared(nn.Module):
    """A conv and a Linear called twice: their channels and inputs stay (masks folded)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.conv0(x))
        x = torch.relu(self.bn(self.conv(torch.relu(self.conv(x)))))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(torch.relu(self.fc(torch.relu(self.fc(x)))))


def test_shared_modules(gen):
    model = Shared().eval()
    randomise_batchnorm(model, gen)
    assert conv_batchnorm_pairs(model) == {}  # the conv's first call does not feed the BatchNorm
    x = torch.randn(2, 3, 8, 8, generator=gen)
    for _ in range(3):
        keep = random_keep(model, gen)
        slim = check_slim(model, keep, x)
        assert slim.conv0.out_channels == slim.conv.out_channels == slim.conv.in_channels == 8


def test_pairs_of_torchvision_models():
    with torch.device("meta"):
        r50 = torchvision.models.resnet50()
        ax = torchvision.models.alexnet()
    pairs = conv_batchnorm_pairs(r50)
    assert len(pairs) == 53 and pairs["conv1"] == "bn1" and pairs["layer1.0.conv3"] == "layer1.0.bn3"
    assert pairs["layer4.0.downsample.0"] == "layer4.0.downsample.1"
    assert conv_batchnorm_pairs(ax) == {}


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        if x.sum() > 0:
            x = x * 2
        x = self.conv2(x).mean((2, 3))
        return self.fc(x)


def test_untraceable_model_is_masked(gen):
    model = Untraceable().eval()
    randomise_batchnorm(model, gen)
    assert channel_graph(model) is None
    assert conv_batchnorm_pairs(model) == {"conv": "bn"}  # module order
    x = torch.randn(2, 3, 8, 8, generator=gen)
    keep = random_keep(model, gen)
    keep["fc"][0] = False
    slim = check_slim(model, keep, x)
    assert slim.conv.out_channels == 8  # masks folded, nothing removed from convs
    assert isinstance(slim.fc, SelectLinear)


# ---------------------------------------------------------------------------------------------------
# Bad keep-states


@pytest.mark.parametrize("key, value, match", [
    ("nope", torch.ones(3, dtype=torch.bool), "kept\\['nope'\\]: the model has no module"),
    ("bn1", torch.ones(16, dtype=torch.bool), "kept\\['bn1'\\]: expected a Conv2d, Linear or attention module.*BatchNorm2d"),
    ("conv1", torch.ones(15, dtype=torch.bool), "kept\\['conv1'\\]: expected a torch.bool tensor of shape \\[16\\]"),
    ("conv1", torch.ones(16), "kept\\['conv1'\\]: .*got torch.float32"),
    ("fc1", torch.ones(64, dtype=torch.uint8), "kept\\['fc1'\\]: expected a torch.bool tensor of shape \\[64\\] "
                                               "\\(in_features"),
    ("fc1", [True] * 64, "kept\\['fc1'\\]: .*got list"),
])
def test_bad_kept(key, value, match):
    model = UserCNN()
    with pytest.raises(ValueError, match=match) as err:
        slim_layers(model, {key: value})
    assert "\n" not in str(err.value)
