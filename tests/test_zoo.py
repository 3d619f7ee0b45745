"""Every torchvision classification model: EDropout masks it, trains a step, and slims it to a network whose
eval-mode outputs equal the masked one's (``benchmarks/zoo.py``; models above 30M parameters under -m slow)."""

import pytest
import torch
import torchvision
from helpers import load_benchmark

zoo = load_benchmark("zoo")

LARGE = 30e6  # parameters (torchvision's count, 1000 classes): above it, slow


def _size(name):
    return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]


CASES = [pytest.param(name, marks=pytest.mark.slow) if _size(name) > LARGE else name for name in zoo.MODELS]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # googlenet and inception_v3's initialisation notice
@pytest.mark.parametrize("name", CASES)
def test_masks_trains_and_slims_to_the_masked_network(name):
    row = zoo.check(name, seed=torch.randint(1 << 30, ()).item(), count=False)  # slim checks its outputs itself
    assert 0 < row["slim"] <= 100.0
    assert row["D"] == sum(row["kinds"].values())


@pytest.mark.parametrize("name", ["swin_t", pytest.param("vit_b_16", marks=pytest.mark.slow)])
def test_transformers_slim_to_fewer_parameters(name):
    row = zoo.check(name, count=False)
    assert row["kinds"]["heads"] > 0 and row["slim"] < 75.0  # MLP hidden units removed, heads masked
