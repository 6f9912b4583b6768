"""Batches from an in-memory data set as whole-tensor operations (the airbench recipe).

Small data sets (MNIST, CIFAR) fit in memory, even on a GPU, as uint8. Indexing, cropping,
flipping and normalising a whole batch with a handful of tensor ops is far cheaper than a
``DataLoader`` calling Python code per sample and collating the results.

Every random draw of an epoch (order, crop offsets, flips) comes from a generator seeded by
``(seed, epoch)`` alone, so epoch ``e`` can be replayed exactly without replaying epochs
``0..e-1``: a killed run resumes bit-for-bit from its last checkpoint.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from lottery.data.base import ArrayDataset
from lottery.data.batching import Normalizer, epoch_seed  # noqa: F401  (epoch_seed: also imported from here)
from lottery.errors import ConfigError


def crop_windows(padded: torch.Tensor, pad: int) -> torch.Tensor:
    """A view of every crop of a zero-padded N x C x (H+2p) x (W+2p) tensor: N x (2p+1) x (2p+1) x C x H x W.

    Indexing this view with (sample, dy, dx) selects the batch and crops it in one gather, with no
    per-batch padding and no copy of the data set beyond the padded one.
    """
    n, c, hp, wp = padded.shape
    sn, sc, sh, sw = padded.stride()
    k = 2 * pad + 1
    return padded.as_strided((n, k, k, c, hp - 2 * pad, wp - 2 * pad), (sn, sh, sw, sc, sh, sw))


def gather_crops(windows: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Crop sample ``idx[i]`` at ``offsets[i]`` (dy, dx) and mirror it where ``flips[i]``."""
    out = windows[idx, offsets[:, 0], offsets[:, 1]]
    return torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop with zero padding ``pad`` plus horizontal flip of a batch (offsets in 0..2*pad)."""
    windows = crop_windows(F.pad(x, (pad, pad, pad, pad)), pad)
    return gather_crops(windows, torch.arange(x.shape[0], device=x.device), offsets, flips)


class BatchLoader:
    """Iterate ``(x, y)`` batches of an ``ArrayDataset``: x float32 normalised N x C x H x W, y int64.

    The uint8 images are moved to ``device`` once; per batch only indices move. ``augment`` is random
    crop (zero padding ``pad``) plus horizontal flip. The loader holds its own (padded) copy when
    augmenting, so build it once per run rather than once per epoch.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        pad: int = 4,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if pad < 0:
            raise ConfigError(f"crop padding must be >= 0, got {pad}")
        if dataset.images.dtype != torch.uint8 or dataset.images.dim() != 4:
            raise ConfigError(
                f"BatchLoader needs uint8 N x C x H x W images (0..255), got {dataset.images.dtype} "
                f"{tuple(dataset.images.shape)}"
            )
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.seed = int(seed)
        self.drop_last = drop_last
        self.pad = int(pad)
        self.device = torch.device(device)
        self.labels = dataset.labels.to(self.device)
        if augment:
            # Pad the whole set once (CIFAR: 150 -> 240 MB) so a batch is selected and cropped by a
            # single gather; the unpadded copy is then not needed on the device.
            p = self.pad
            self.images = None
            self._windows = crop_windows(F.pad(dataset.images.to(self.device), (p, p, p, p)), p)
        else:
            self.images = dataset.images.to(self.device).contiguous()
        self.normalize = Normalizer(dataset.mean, dataset.std, self.device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_samples
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        if self.augment:
            offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g).to(self.device)
            flips = (torch.rand(n, generator=g) < 0.5).to(self.device)
        stop = len(self) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.augment:
                end = start + idx.shape[0]
                x = gather_crops(self._windows, idx, offsets[start:end], flips[start:end])
            else:
                x = self.images.index_select(0, idx)
            yield self.normalize(x), self.labels.index_select(0, idx)


def default_num_workers() -> int:
    """Leave one core to the training process; decoding JPEGs is what the workers are for."""
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def make_loader(
    dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    augment: bool | None = None,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    drop_last: bool = False,
):
    """The loader for ``dataset``: a ``BatchLoader`` in memory, a worker-based one for image folders.

    Both have ``set_epoch``, ``__len__`` and ``__iter__`` yielding normalised float batches, so the
    training loop does not care which it got. ``train`` shuffles; ``augment=None`` picks the data
    set's default for training (crop+flip for CIFAR, none for digits) and none for evaluation.
    """
    from lottery.data.datasets import DATASETS, canonical_name
    from lottery.data.imagefolder import ImageFolderDataset, ImageFolderLoader

    if isinstance(dataset, ImageFolderDataset):
        return ImageFolderLoader(
            dataset,
            batch_size,
            shuffle=train,
            augment=train if augment is None else augment,
            seed=seed,
            drop_last=drop_last,
            device=device,
            num_workers=default_num_workers() if num_workers is None else num_workers,
        )
    if isinstance(dataset, ArrayDataset):
        if augment is None:
            augment = False
            if train and dataset.name:
                try:
                    augment = DATASETS[canonical_name(dataset.name)].augment
                except KeyError:
                    augment = False
        return BatchLoader(
            dataset, batch_size, shuffle=train, augment=augment, seed=seed, drop_last=drop_last, device=device
        )
    raise ConfigError(f"make_loader takes an ArrayDataset or ImageFolderDataset, not {type(dataset).__name__}")
