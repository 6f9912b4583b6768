"""A seeded synthetic data set whose labels can actually be learned.

Tests and smoke runs need data that needs no download yet behaves like a classification problem:
a training step must lower the loss and pruning must be able to hurt accuracy. Each class gets a
smooth random pattern (so random crops and flips keep most of it); samples are that pattern plus
pixel noise, clipped to uint8.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lottery.data.base import ArrayDataset
from lottery.errors import ConfigError

_CHUNK = 4096


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def class_patterns(shape: tuple[int, int, int], num_classes: int, seed: int) -> np.ndarray:
    """num_classes x C x H x W float patterns in about [-1, 1], smooth at a quarter of the image size."""
    c, h, w = shape
    coarse = _rng(seed, 0).standard_normal((num_classes, c, max(2, (h + 3) // 4), max(2, (w + 3) // 4)))
    fine = F.interpolate(torch.from_numpy(coarse), size=(h, w), mode="bilinear", align_corners=False)
    fine = fine.numpy()
    return fine / np.abs(fine).reshape(num_classes, -1).max(axis=1).reshape(-1, 1, 1, 1)


def _sample(patterns: np.ndarray, n: int, rng: np.random.Generator, contrast: float, noise: float):
    num_classes = patterns.shape[0]
    labels = rng.permutation(np.arange(n) % num_classes)  # balanced classes, random order
    images = np.empty((n, *patterns.shape[1:]), dtype=np.uint8)
    for start in range(0, n, _CHUNK):  # float64 noise for all of a CIFAR-sized set would need 1.2 GB
        y = labels[start : start + _CHUNK]
        x = 128.0 + contrast * patterns[y] + noise * rng.standard_normal((len(y), *patterns.shape[1:]))
        images[start : start + len(y)] = np.clip(np.rint(x), 0, 255)
    return images, labels.astype(np.int64)


def make_synthetic(
    *,
    shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    train_size: int = 2000,
    test_size: int = 500,
    seed: int = 0,
    noise: float = 48.0,
    contrast: float = 64.0,
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) with the same class patterns and independent noise; identical for a given seed.

    ``noise`` and ``contrast`` are in pixel units (0..255); the defaults make the classes separable
    but not trivially so for a linear model.
    """
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"synthetic shape must be (channels, height, width), got {shape}")
    if num_classes < 2:
        raise ConfigError(f"synthetic num_classes must be at least 2, got {num_classes}")
    if train_size < 1 or test_size < 1:
        raise ConfigError(f"synthetic train_size and test_size must be positive, got {train_size}, {test_size}")
    patterns = class_patterns(shape, num_classes, seed)  # type: ignore[arg-type]
    xtr, ytr = _sample(patterns, train_size, _rng(seed, 1), contrast, noise)
    xte, yte = _sample(patterns, test_size, _rng(seed, 2), contrast, noise)
    pixels = xtr.transpose(1, 0, 2, 3).reshape(shape[0], -1) / 255.0
    mean = tuple(float(m) for m in pixels.mean(axis=1))
    std = tuple(max(float(s), 1e-3) for s in pixels.std(axis=1))

    def ds(x, y):
        return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), num_classes, mean, std, "synthetic")

    return ds(xtr, ytr), ds(xte, yte)
