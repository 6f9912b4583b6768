"""The in-memory data set type shared by every reader, and the train/validation/test splits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ArrayDataset:
    """A whole split held in memory: ``images`` uint8 N x C x H x W, ``labels`` int64 N.

    Holding raw uint8 (not floats) keeps CIFAR-10 at 150 MB instead of 600 MB and lets the loader
    normalise and augment whole batches at once (the airbench recipe).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor) -> "ArrayDataset":
        """The samples at ``indices`` (a copy), with this data set's class count and normalisation."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return ArrayDataset(
            self.images.index_select(0, indices),
            self.labels.index_select(0, indices),
            self.num_classes,
            self.mean,
            self.std,
            self.name,
        )


@dataclass
class Splits:
    """Training, held-out validation (drawn from the training files) and the official test split."""

    train: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset
    source: str = ""  # where the files were found (folder and how), for the run's log
