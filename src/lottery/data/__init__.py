"""Data sets for the experiments: readers for the real file formats, file search and download, splits,
and loaders.

Typical use::

    splits = load_splits("fashion-mnist", val_size=5000, seed=0)
    loader = make_loader(splits.train, 128, train=True, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            ...

Modules: ``datasets`` (registry and published digests), ``locate``/``download`` (where files come
from), ``idx``/``cifar``/``imagefolder``/``synthetic`` (readers), ``splits`` (train/val/test),
``loader`` (batches).
"""

from lottery.data.base import ArrayDataset, Splits
from lottery.data.datasets import (
    DATASETS,
    DatasetSpec,
    RemoteFile,
    canonical_name,
    dataset_info,
    dataset_names,
    default_augment,
    get_spec,
)
from lottery.data.imagefolder import ImageFolderDataset, ImageFolderLoader
from lottery.data.loader import BatchLoader, epoch_seed, make_loader
from lottery.data.locate import ENV_DATA, ENV_MIRROR, cache_dir, candidate_places, locate
from lottery.data.splits import load_splits, load_train_test, split_train_val
from lottery.data.synthetic import make_synthetic

__all__ = [
    "ArrayDataset",
    "BatchLoader",
    "DATASETS",
    "DatasetSpec",
    "ENV_DATA",
    "ENV_MIRROR",
    "ImageFolderDataset",
    "ImageFolderLoader",
    "RemoteFile",
    "Splits",
    "cache_dir",
    "canonical_name",
    "candidate_places",
    "dataset_info",
    "dataset_names",
    "default_augment",
    "epoch_seed",
    "get_spec",
    "load_splits",
    "load_train_test",
    "locate",
    "make_loader",
    "make_synthetic",
    "split_train_val",
]
