"""Registry, splits, the synthetic data set, and (if installed) Debian's real Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lottery.data import (
    ArrayDataset,
    dataset_info,
    dataset_names,
    default_augment,
    load_splits,
    make_synthetic,
    split_train_val,
)
from lottery.data.splits import split_indices
from lottery.errors import ConfigError, UnknownNameError
from lottery_data_testkit import *  # noqa: F401,F403 - fixtures: isolated_data_env (autouse), http_root, h


def test_names_and_aliases():
    assert dataset_names() == ["cifar10", "cifar100", "fashion-mnist", "imagenet", "mnist", "synthetic"]
    for alias in ("FashionMNIST", "fashion_mnist", "Fashion-MNIST"):
        assert dataset_info(alias).name == "fashion-mnist"
    assert dataset_info("CIFAR-10").name == "cifar10"


def test_unknown_name_lists_known():
    with pytest.raises(UnknownNameError, match="unknown data set 'svhn'; known data sets: cifar10, cifar100"):
        load_splits("svhn")
    with pytest.raises(UnknownNameError):
        dataset_info("svhn")


def test_dataset_info_without_loading():
    assert dataset_info("fashion-mnist").input_shape == (1, 28, 28)
    assert dataset_info("mnist").num_classes == 10
    assert dataset_info("cifar10").input_shape == (3, 32, 32)
    assert dataset_info("cifar100").num_classes == 100
    assert dataset_info("imagenet").input_shape == (3, 224, 224)
    info = dataset_info("synthetic", shape=(3, 16, 16), num_classes=4)
    assert info.input_shape == (3, 16, 16) and info.num_classes == 4 and len(info.mean) == 3
    with pytest.raises(ConfigError):
        dataset_info("mnist", shape=(1, 2, 2))
    assert default_augment("cifar10") and default_augment("cifar100") and not default_augment("fashion-mnist")


def test_synthetic_deterministic_and_balanced():
    a_train, a_test = make_synthetic(shape=(3, 8, 8), num_classes=5, train_size=100, test_size=50, seed=3)
    b_train, b_test = make_synthetic(shape=(3, 8, 8), num_classes=5, train_size=100, test_size=50, seed=3)
    c_train, _ = make_synthetic(shape=(3, 8, 8), num_classes=5, train_size=100, test_size=50, seed=4)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_test.labels, b_test.labels)
    assert not torch.equal(a_train.images, c_train.images)
    assert a_train.images.dtype == torch.uint8 and a_train.images.shape == (100, 3, 8, 8)
    assert torch.bincount(a_train.labels).tolist() == [20] * 5
    assert not torch.equal(a_train.images[:50], a_test.images)  # independent noise
    pixels = a_train.images.double() / 255
    assert a_train.mean[0] == pytest.approx(pixels[:, 0].mean().item(), abs=1e-6)


def test_synthetic_is_learnable():
    """A linear model trained for a few steps must beat chance clearly on the held-out test set."""
    train, test = make_synthetic(shape=(1, 12, 12), num_classes=4, train_size=400, test_size=200, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(144, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def prep(ds):
        return ((ds.images.float() / 255 - ds.mean[0]) / ds.std[0]).flatten(1), ds.labels

    x, y = prep(train)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    xt, yt = prep(test)
    assert (model(xt).argmax(1) == yt).float().mean() > 0.8


def test_load_splits_synthetic_seeded_and_disjoint():
    s1 = load_splits("synthetic", val_size=30, seed=1, train_size=200, test_size=40)
    s2 = load_splits("synthetic", val_size=30, seed=1, train_size=200, test_size=40)
    s3 = load_splits("synthetic", val_size=30, seed=2, train_size=200, test_size=40)
    assert len(s1.train) == 170 and len(s1.val) == 30 and len(s1.test) == 40
    assert torch.equal(s1.val.images, s2.val.images) and torch.equal(s1.train.labels, s2.train.labels)
    assert not torch.equal(s1.val.images, s3.val.images)  # the split depends on the seed ...
    assert torch.equal(s1.test.images, s3.test.images)  # ... the data set does not
    assert load_splits("synthetic", train_size=200, test_size=10).val.images.shape[0] == 20  # default: a tenth


def test_split_indices_partition():
    for seed in range(3):
        train, val = split_indices(100, 25, seed)
        assert len(val) == 25 and len(train) == 75
        assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))
        assert torch.equal(train, train.sort().values)
    assert torch.equal(split_indices(100, 25, 7)[1], split_indices(100, 25, 7)[1])
    assert not torch.equal(split_indices(100, 25, 7)[1], split_indices(100, 25, 8)[1])


def test_split_keeps_samples_and_metadata():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    ds = ArrayDataset(images, torch.arange(10) % 3, 3, (0.5,), (0.2,), "toy")
    train, val = split_train_val(ds, 4, seed=0)
    ids = torch.cat([train.images[:, 0, 0, 0], val.images[:, 0, 0, 0]]).sort().values
    assert torch.equal(ids, torch.arange(10, dtype=torch.uint8))
    assert torch.equal(val.labels, val.images[:, 0, 0, 0].long() % 3)
    assert (val.num_classes, val.mean, val.std, val.name) == (3, (0.5,), (0.2,), "toy")
    assert split_train_val(ds, 0)[1] is None
    with pytest.raises(ConfigError, match="val_size"):
        split_train_val(ds, 10)


def test_unknown_option_rejected():
    with pytest.raises(ConfigError, match="unknown option.*color"):
        load_splits("synthetic", color=True)
    with pytest.raises(ConfigError, match="takes none"):
        load_splits("mnist", crop_size=3)


DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist)",
)
def test_real_debian_fashion_mnist():
    splits = load_splits("fashion-mnist", val_size=5000, seed=0, download=False)
    assert len(splits.train) + len(splits.val) == 60000 and len(splits.test) == 10000
    assert splits.train.images.shape[1:] == (1, 28, 28)
    for ds in (splits.train, splits.val, splits.test):
        assert ds.labels.min() == 0 and ds.labels.max() == 9
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    full = torch.cat([splits.train.images, splits.val.images]).double() / 255
    assert full.mean().item() == pytest.approx(splits.train.mean[0], abs=1e-3)
    assert full.std().item() == pytest.approx(splits.train.std[0], abs=1e-3)
