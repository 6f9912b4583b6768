"""Loading a registered data set by name and holding out a validation split from its training files.

Hyperparameters (the sparsity penalty, rewinding epoch, temperature schedule) are chosen on the
validation split, never on the official test set; it is drawn from the training files with a seeded
permutation so that every run with the same seed sees the same split.
"""

from __future__ import annotations

import os
import warnings

import torch

from lottery.data.base import ArrayDataset, Splits
from lottery.data.cifar import read_cifar_archive, read_cifar_folder
from lottery.data.datasets import DatasetSpec, get_spec
from lottery.data.download import verify_file
from lottery.data.idx import read_idx_pair
from lottery.data.imagefolder import ImageFolderDataset
from lottery.data.locate import describe_source, locate
from lottery.data.synthetic import make_synthetic
from lottery.errors import ConfigError

_OPTIONS = {
    "synthetic": {"shape", "num_classes", "train_size", "test_size", "noise", "contrast", "data_seed"},
    "imagefolder": {"crop_size", "resize_size", "scale"},
}


def _check_options(spec: DatasetSpec, options: dict) -> None:
    allowed = _OPTIONS.get(spec.kind, set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        takes = f"it takes {', '.join(sorted(allowed))}" if allowed else "it takes none"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for data set {spec.name!r}; {takes}")


def load_train_test(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    verify: bool = False,
    mirror: str | None = None,
    progress: bool | None = None,
    **options,
):
    """The full official training and test sets of ``name`` as ``(train, test)``.

    Local files are checked structurally on every load (cheap); ``verify=True`` also checksums them
    against the published digests (slow on ImageNet-sized data, so off by default).
    """
    return _load_train_test(name, data_dir, download=download, verify=verify, mirror=mirror, progress=progress,
                            **options)[:2]


def _load_train_test(name, data_dir, *, download, verify, mirror, progress, **options):
    """``(train, test, source)``: the data sets and where their files were found (for the run's log)."""
    spec = get_spec(name)
    _check_options(spec, options)
    if spec.kind == "synthetic":
        data_seed = options.pop("data_seed", 0)
        return (*make_synthetic(seed=data_seed, **options), f"generated (synthetic, data seed {data_seed})")

    found = locate(spec, data_dir, download_missing=download, mirror=mirror, progress=progress)
    source = describe_source(found)
    hint = found.hint
    if spec.kind == "imagefolder":
        train = ImageFolderDataset.scan(found.files["train"], mean=spec.mean, std=spec.std, name=spec.name, **options)
        test = ImageFolderDataset.scan(
            found.files["val"], classes=train.classes, mean=spec.mean, std=spec.std, name=spec.name, **options
        )
        return train, test, source

    if verify and not found.downloaded:  # a fresh download was verified already
        if "batches" in found.files:
            warnings.warn(
                f"only the {spec.name} archive has a published digest; the extracted batches in "
                f"{found.files['batches']} were checked structurally only",
                stacklevel=2,
            )
        for role, path in found.files.items():
            if role in spec.files:
                verify_file(path, spec.files[role], hint=hint)

    if spec.kind == "idx":
        size = spec.input_shape[1:]
        f = found.files
        xtr, ytr = read_idx_pair(f["train_images"], f["train_labels"], num_classes=spec.num_classes,
                                 image_size=size, hint=hint)
        xte, yte = read_idx_pair(f["test_images"], f["test_labels"], num_classes=spec.num_classes,
                                 image_size=size, hint=hint)
    elif "batches" in found.files:
        xtr, ytr, xte, yte = read_cifar_folder(found.files["batches"], spec.kind, spec.num_classes, hint)
    else:
        xtr, ytr, xte, yte = read_cifar_archive(found.files["archive"], spec.kind, spec.num_classes, hint)
    return (
        ArrayDataset(xtr, ytr, spec.num_classes, spec.mean, spec.std, spec.name),
        ArrayDataset(xte, yte, spec.num_classes, spec.mean, spec.std, spec.name),
        source,
    )


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) index tensors, disjoint, covering 0..n-1, each sorted; fixed by ``seed``."""
    if not 0 <= val_size < n:
        raise ConfigError(f"val_size must be between 0 and {n - 1} (the training set has {n} samples), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def split_train_val(dataset, val_size: int, seed: int = 0):
    """Hold out ``val_size`` samples of ``dataset`` (ArrayDataset or ImageFolderDataset) as validation."""
    train_idx, val_idx = split_indices(len(dataset), int(val_size), seed)
    if val_size == 0:
        return dataset, None
    return dataset.subset(train_idx), dataset.subset(val_idx)


def load_splits(
    name: str,
    data_dir: str | os.PathLike | None = None,
    val_size: int | None = None,
    seed: int = 0,
    download: bool = True,
    *,
    verify: bool = False,
    mirror: str | None = None,
    progress: bool | None = None,
    **options,
) -> Splits:
    """Train / validation / test splits of a registered data set.

    ``val_size=None`` takes the data set's default (5000 for MNIST-like and CIFAR, 10000 for
    ImageNet, a tenth of ``train_size`` for synthetic); 0 gives ``val=None``. ``seed`` fixes which
    training samples are held out. ``options`` are the synthetic data set's (``shape``,
    ``num_classes``, ``train_size``, ``test_size``, ``noise``, ``contrast``, ``data_seed``) or the image
    folder's (``crop_size``, ``resize_size``, ``scale``).
    """
    spec = get_spec(name)
    train, test, source = _load_train_test(
        name, data_dir, download=download, verify=verify, mirror=mirror, progress=progress, **options
    )
    if val_size is None:
        val_size = spec.default_val_size if spec.default_val_size >= 0 else len(train) // 10
    train, val = split_train_val(train, val_size, seed)
    return Splits(train=train, val=val, test=test, source=source)
