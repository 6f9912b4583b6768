"""The in-memory BatchLoader: reproducible per-epoch order, coverage, augmentation, normalisation."""

from __future__ import annotations

import pytest
import torch

from lottery.data import ArrayDataset, BatchLoader, epoch_seed, make_loader, make_synthetic
from lottery.data.loader import crop_flip
from lottery.errors import ConfigError
from lottery_data_testkit import *  # noqa: F401,F403 - fixtures: isolated_data_env (autouse), http_root, h


def _indexed(n=103, shape=(3, 8, 8), name="toy"):
    """Each sample's label is its index, so batches reveal the order."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    c = shape[0]
    return ArrayDataset(images, torch.arange(n), n, (0.4,) * c, (0.2,) * c, name)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_same_seed_and_epoch_same_batches():
    ds = _indexed()
    a = _epoch(BatchLoader(ds, 16, shuffle=True, augment=True, seed=3), 4)
    b = _epoch(BatchLoader(ds, 16, shuffle=True, augment=True, seed=3), 4)
    assert len(a) == len(b) == 7
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_epoch_replay_without_earlier_epochs():
    ds = _indexed()
    loader = BatchLoader(ds, 10, augment=True, seed=1)
    for e in range(3):
        last = _epoch(loader, e)
    fresh = _epoch(BatchLoader(ds, 10, augment=True, seed=1), 2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(last, fresh))


def test_epochs_and_seeds_differ():
    ds = _indexed()
    loader = BatchLoader(ds, 16, seed=0)
    order = [torch.cat([y for _, y in _epoch(loader, e)]) for e in range(3)]
    assert not torch.equal(order[0], order[1]) and not torch.equal(order[1], order[2])
    other = torch.cat([y for _, y in _epoch(BatchLoader(ds, 16, seed=1), 0)])
    assert not torch.equal(order[0], other)
    assert epoch_seed(0, 1) != epoch_seed(1, 0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_once_per_epoch(drop_last):
    ds = _indexed(103)
    loader = BatchLoader(ds, 16, seed=2, drop_last=drop_last, augment=True)
    for e in range(2):
        batches = _epoch(loader, e)
        assert len(batches) == len(loader) == (6 if drop_last else 7)
        ys = torch.cat([y for _, y in batches])
        if drop_last:
            assert len(ys) == 96 and len(set(ys.tolist())) == 96
        else:
            assert torch.equal(ys.sort().values, torch.arange(103))
        assert all(x.shape[1:] == (3, 8, 8) for x, _ in batches)


def test_normalisation():
    ds = _indexed(20)
    x, y = next(iter(BatchLoader(ds, 20, shuffle=False)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (ds.images.float() / 255 - 0.4) / 0.2
    assert torch.allclose(x, expected, atol=1e-5)
    mnist_like = ArrayDataset(
        torch.full((4, 1, 2, 2), 255, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), 10, (0.1307,), (0.3081,)
    )
    x, _ = next(iter(BatchLoader(mnist_like, 4, shuffle=False)))
    assert torch.allclose(x, torch.full_like(x, (1 - 0.1307) / 0.3081))


def test_augmentation_changes_pixels_keeps_shape_and_labels():
    ds = _indexed(64)
    plain = next(iter(BatchLoader(ds, 64, shuffle=False)))
    aug = next(iter(BatchLoader(ds, 64, shuffle=False, augment=True, seed=0)))
    assert aug[0].shape == plain[0].shape and torch.equal(aug[1], plain[1])
    assert not torch.equal(aug[0], plain[0])
    zero = (0 - 0.4) / 0.2  # padding is black before normalisation
    assert torch.isclose(aug[0], torch.tensor(zero)).any()


def test_crop_flip_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 2, 5, 7), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 9, (12, 2), generator=g)
    flips = torch.rand(12, generator=g) < 0.5
    out = crop_flip(x, offsets, flips, pad=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(12):
        dy, dx = offsets[i].tolist()
        ref = padded[i, :, dy : dy + 5, dx : dx + 7]
        if flips[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    centred = crop_flip(x, torch.full((12, 2), 4), torch.zeros(12, dtype=torch.bool), pad=4)
    assert torch.equal(centred, x)


def test_make_loader_defaults():
    train, test = make_synthetic(shape=(3, 8, 8), train_size=40, test_size=10)
    cifar_like = ArrayDataset(train.images, train.labels, 10, train.mean, train.std, "cifar10")
    assert make_loader(cifar_like, 8, train=True, seed=0).augment is True
    assert make_loader(cifar_like, 8, train=False, seed=0).augment is False
    assert make_loader(cifar_like, 8, train=True, seed=0, augment=False).augment is False
    mnist_like = ArrayDataset(train.images, train.labels, 10, train.mean, train.std, "fashion-mnist")
    assert make_loader(mnist_like, 8, train=True, seed=0).augment is False
    evaluation = make_loader(test, 4, train=False, seed=0)
    assert not evaluation.shuffle
    assert torch.equal(torch.cat([y for _, y in evaluation]), test.labels)  # eval order is file order
    assert make_loader(train, 8, train=True, seed=0).augment is False  # synthetic: off
    with pytest.raises(ConfigError):
        make_loader(train, 0, train=True)
    with pytest.raises(ConfigError):
        make_loader([1, 2], 8, train=True)


def test_training_with_loader_reduces_loss():
    train, _ = make_synthetic(shape=(1, 10, 10), num_classes=3, train_size=300, test_size=10, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(100, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = make_loader(train, 32, train=True, seed=0)
    epoch_loss = []
    for e in range(4):
        loader.set_epoch(e)
        total = 0.0
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
        epoch_loss.append(total / len(train))
    assert epoch_loss[-1] < 0.5 * epoch_loss[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    ds = _indexed(50)
    cpu = _epoch(BatchLoader(ds, 16, augment=True, seed=4), 1)
    gpu = _epoch(BatchLoader(ds, 16, augment=True, seed=4, device="cuda"), 1)
    assert gpu[0][0].device.type == "cuda"
    assert all(torch.allclose(a.cpu(), b, atol=1e-6) and torch.equal(ya.cpu(), yb) for (a, ya), (b, yb) in zip(gpu, cpu))
