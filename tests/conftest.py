from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

# Modules whose tests start server processes, Ray clusters or Docker: `make test-fast` leaves them out.
INTEGRATION = {
    "tests/api/test_drain.py", "tests/api/test_e2e.py", "tests/api/test_grpc.py", "tests/api/test_header_limits.py",
    "tests/api/test_heavy_renders.py", "tests/api/test_kserve_client.py", "tests/api/test_lifecycle.py",
    "tests/api/test_ray_proxy.py", "tests/api/test_schema_fuzz.py", "tests/api/test_triton_client.py",
    "tests/test_bench_h2.py", "tests/test_bench_paired.py", "tests/test_rayserve.py", "tests/test_docker.py",
    "tests/test_gpu_check.py",
}


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "needs_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
        if item.nodeid.split("::")[0] in INTEGRATION:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _restore_rng():
    """Each test may seed freely; the next one starts from the same global state."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


class TinyNet(nn.Module):
    """A seeded 10-class CNN with an in-place ReLU after its last block, like DenseNet."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu_(self.features(x))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model
