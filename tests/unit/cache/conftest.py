"""Tiny data, teachers and students for the teacher-cache tests."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kdistill.testing.models import TinyMLP

NUM_SAMPLES, IN_FEATURES, HIDDEN, NUM_CLASSES, BATCH = 20, 16, 32, 10, 6


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [N], x [N, D], y [N])``; ids are not 0..N-1 on purpose."""
    ids = torch.arange(NUM_SAMPLES) * 7 + 100
    x = torch.randn(NUM_SAMPLES, IN_FEATURES)
    y = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,))
    return ids, x, y


@pytest.fixture
def loader(data) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=BATCH, shuffle=False)


@pytest.fixture
def teacher() -> TinyMLP:
    return TinyMLP(IN_FEATURES, HIDDEN, NUM_CLASSES)


@pytest.fixture
def student() -> TinyMLP:
    return TinyMLP(IN_FEATURES, HIDDEN, NUM_CLASSES)  # its own initialization
