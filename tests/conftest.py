import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    """Every test starts from a fixed seed and the default backend choice."""
    torch.manual_seed(1234)
    monkeypatch.delenv("LORAQ_BACKEND", raising=False)
    yield
