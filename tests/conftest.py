"""Shared fixtures: tiny seeded data and models so every test runs in seconds on 2 cores."""

from __future__ import annotations

import torch
import pytest
from torch import nn


class TensorBatches:
    """A minimal loader with the engine's interface: seeded per-epoch order, ``set_epoch``, ``len``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.x, self.y, self.batch_size, self.seed, self.shuffle = x, y, batch_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.y), generator=g)
        else:
            order = torch.arange(len(self.y))
        for i in range(0, len(self.y), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]


def blobs(n: int = 256, dim: int = 20, classes: int = 4, seed: int = 0):
    """Gaussian blobs around fixed class centres (the same for every seed): learnable, so training
    on one sample must reduce the loss on another."""
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(12345)) * 1.5
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return x, y


@pytest.fixture
def tiny_data():
    x, y = blobs()
    xt, yt = blobs(n=128, seed=1)
    return TensorBatches(x, y, 32, seed=0), TensorBatches(xt, yt, 64, shuffle=False)


def tiny_mlp(seed: int = 0, dim: int = 20, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, classes))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread per test process: on a busy 2-core machine two OpenMP threads spin against
    each other (measured ~15x slower), and one thread keeps CPU results reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
