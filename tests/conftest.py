import os
import random
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

import edropout  # noqa: F401  (loads the kernels)

# Fresh random inputs on every run; EDROPOUT_TEST_SEED=<n> replays a run (the seed is in the header).
SEED = int(os.environ.get("EDROPOUT_TEST_SEED", random.SystemRandom().randrange(2**31)))

CUDA = torch.cuda.is_available() and torch.cuda.device_count() > 0

# Property tests (tests/test_properties.py): "ci" is deterministic and bounded (seconds, the default);
# `pytest --hypothesis-profile=long` searches deeper.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, suppress_health_check=_QUIET,
                          print_blob=True)
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=_QUIET, print_blob=True)
settings.load_profile("ci")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA")])]


def pytest_report_header(config):
    return f"edropout test seed: {SEED} (EDROPOUT_TEST_SEED={SEED} replays it); CUDA: {CUDA}"


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the run's seed and the test's name."""
    g = torch.Generator()
    g.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))
    return g


@pytest.fixture(autouse=True)
def full_precision_on_cuda():
    """cuDNN convolutions default to TF32 on Ampere and later GPUs (10-bit mantissas, errors near 1e-3),
    and pick different algorithms for different batch sizes: far above the tolerances of comparisons such
    as batched candidates against separate forwards. Tests compare in full float32."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
