"""Lazy ImageNet-style folder: scanning, transforms, the worker-based loader and bad images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lottery.data import ImageFolderDataset, ImageFolderLoader, load_splits, make_loader
from lottery.data.imagefolder import random_resized_crop_box
from lottery.errors import DataError
from lottery_data_testkit import *  # noqa: F401,F403 - fixtures: isolated_data_env (autouse), http_root, h

CLASSES = ["cat", "dog", "eel"]


def _png(path, w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imagenet"
    seed = 0
    for split, per_class in (("train", 4), ("val", 2)):
        for c in CLASSES:
            for i in range(per_class):
                seed += 1
                ext = ".png" if i % 2 == 0 else ".PNG"
                _png(root / split / c / f"{c}_{i}{ext}", 20 + i, 14 + c.__len__(), seed)
    _png(root / "train" / "dog" / "grey.png", 12, 12, 99, mode="L")  # greyscale becomes RGB
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return root


def _opts():
    return dict(crop_size=8, resize_size=10)


def test_scan_and_splits(folder):
    splits = load_splits("imagenet", folder.parent, val_size=3, seed=0, **_opts())
    train, val, test = splits.train, splits.val, splits.test
    assert isinstance(train, ImageFolderDataset)
    assert train.classes == CLASSES and test.classes == CLASSES
    assert len(train) + len(val) == 13 and len(val) == 3 and len(test) == 6
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.input_shape == (3, 8, 8) and train.num_classes == 3
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    x, y = train[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 8, 8)


def test_loader_batches_and_reproducibility(folder):
    train = ImageFolderDataset.scan(folder / "train", **_opts())
    loader = make_loader(train, 4, train=True, seed=5, num_workers=0)
    assert isinstance(loader, ImageFolderLoader) and len(loader) == 4
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 4, 1]
    assert all(b[0].dtype == torch.float32 and b[0].shape[1:] == (3, 8, 8) for b in batches)
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted(train.labels.tolist())
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    loader.set_epoch(1)
    other = list(loader)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other))


def test_workers_do_not_change_results(folder):
    train = ImageFolderDataset.scan(folder / "train", **_opts())
    a = list(make_loader(train, 5, train=True, seed=1, num_workers=0))
    b = list(make_loader(train, 5, train=True, seed=1, num_workers=2))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_eval_is_resize_then_centre_crop(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    _png(tmp_path / "train" / "a" / "x.png", 1, 1, 0)
    Image.fromarray(img).save(tmp_path / "train" / "a" / "x.png")
    ds = ImageFolderDataset.scan(tmp_path / "train", crop_size=10, resize_size=10)
    x, _ = ds[0]  # shorter side already 10: the centre 10x10 window, unchanged
    assert torch.equal(x, torch.from_numpy(img[:, 5:15]).permute(2, 0, 1))
    loader = make_loader(ds, 1, train=False, seed=0, num_workers=0)
    (xb, _), = list(loader)
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    assert torch.allclose(xb, (x[None].float() / 255 - mean) / std, atol=1e-5)


def test_random_resized_crop_box_within_image():
    rng = np.random.default_rng(0)
    for w, h in [(20, 14), (300, 20), (5, 400), (1, 1)]:
        for _ in range(50):
            left, top, right, bottom = random_resized_crop_box(w, h, rng)
            assert 0 <= left < right <= w and 0 <= top < bottom <= h


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_named(folder, workers):
    bad = folder / "train" / "cat" / "cat_0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    train = ImageFolderDataset.scan(folder / "train", **_opts())
    loader = make_loader(train, 16, train=True, seed=0, num_workers=workers)
    with pytest.raises(DataError, match=r"cannot decode image .*cat_0\.png") as e:
        list(loader)
    assert "Traceback" not in str(e.value)


def test_folder_errors(folder, tmp_path):
    (folder / "val" / "fox").mkdir()
    _png(folder / "val" / "fox" / "f.png", 8, 8, 1)
    with pytest.raises(DataError, match="missing from the training split: fox"):
        load_splits("imagenet", folder, val_size=0, **_opts())
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(DataError, match="no images in"):
        load_splits("imagenet", empty, val_size=0)
    with pytest.raises(DataError, match="holds no complete copy of imagenet"):
        load_splits("imagenet", tmp_path / "nowhere")
