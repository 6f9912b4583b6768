"""IDX (MNIST/Fashion-MNIST) reader: round trips and every kind of damaged file."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lottery.data import load_splits, load_train_test
from lottery.data.idx import parse_idx, read_idx, read_idx_pair, write_idx
from lottery.errors import DataError
from lottery_data_testkit import *  # noqa: F401,F403 - fixtures: isolated_data_env (autouse), http_root, h


@pytest.mark.parametrize("gz", [True, False])
def test_reads_written_set(tmp_path, h, gz):
    files = h.write_idx_set(tmp_path, gz=gz)
    train, test = load_train_test("mnist", tmp_path, download=False)
    assert train.images.dtype == torch.uint8 and train.images.shape == (60, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and test.labels.shape == (20,)
    assert np.array_equal(train.images[:, 0].numpy(), files["train_images"][1])
    assert np.array_equal(test.labels.numpy(), files["test_labels"][1])
    assert train.num_classes == 10 and train.name == "mnist" and train.mean == (0.1307,)


def test_mixed_gz_and_raw_in_one_folder(tmp_path, h):
    files = h.write_idx_set(tmp_path, gz=True)
    path, arr = files["test_labels"]
    path.unlink()
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", arr)
    _, test = load_train_test("mnist", tmp_path, download=False)
    assert np.array_equal(test.labels.numpy(), arr)


def test_gzip_detected_by_content_not_suffix(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", arr, compress=True)  # gzipped without .gz
    assert np.array_equal(read_idx(tmp_path / "x"), arr)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.booleans())
def test_idx_round_trip(tmp_path_factory, dims, gz):
    arr = np.random.default_rng(len(dims)).integers(0, 256, dims, dtype=np.uint8)
    path = tmp_path_factory.mktemp("idx") / ("a.gz" if gz else "a")
    write_idx(path, arr)
    assert np.array_equal(read_idx(path), arr)


def _damage(path, data: bytes):
    path.write_bytes(data)
    return path


def _raw(arr):
    return struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def test_truncated_raw_file(tmp_path, h):
    files = h.write_idx_set(tmp_path, gz=False)
    path = files["train_images"][0]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte is truncated"):
        load_splits("mnist", tmp_path, download=False, val_size=0)


def test_truncated_gzip(tmp_path, h):
    files = h.write_idx_set(tmp_path, gz=True)
    path = files["train_images"][0]
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is truncated") as e:
        load_splits("mnist", tmp_path, download=False, val_size=0)
    assert "delete" in str(e.value) or "replace" in str(e.value)


def test_corrupt_gzip(tmp_path, h):
    files = h.write_idx_set(tmp_path, gz=True)
    path = files["test_images"][0]
    data = bytearray(path.read_bytes())
    data[20:40] = b"\xff" * 20  # damage the deflate stream, keep the gzip magic
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_splits("mnist", tmp_path, download=False, val_size=0)


def test_garbage_with_gzip_magic(tmp_path):
    path = _damage(tmp_path / "f.gz", b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(DataError, match=r"f\.gz is not a valid gzip file"):
        read_idx(path)


def test_wrong_magic(tmp_path, h):
    files = h.write_idx_set(tmp_path, gz=False)
    path = files["train_labels"][0]
    path.write_bytes(b"\x50\x4b\x03\x04" + path.read_bytes()[4:])  # a zip header
    with pytest.raises(DataError, match="train-labels-idx1-ubyte is not an IDX file"):
        load_splits("mnist", tmp_path, download=False, val_size=0)


def test_non_uint8_idx_rejected(tmp_path):
    path = _damage(tmp_path / "f", struct.pack(">HBBI", 0, 0x0D, 1, 1) + b"\0\0\0\0")
    with pytest.raises(DataError, match="float32"):
        read_idx(path)


def test_trailing_bytes(tmp_path):
    arr = np.zeros((2, 2), np.uint8)
    path = _damage(tmp_path / "f", _raw(arr) + b"xx")
    with pytest.raises(DataError, match="2 bytes after"):
        read_idx(path)


def test_label_count_mismatch(tmp_path, h):
    arrays = h.make_idx_arrays()
    arrays["train_labels"] = arrays["train_labels"][:-1]
    h.write_idx_set(tmp_path, arrays=arrays)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz has 59 labels but .*train-images.* has 60"):
        load_splits("mnist", tmp_path, download=False, val_size=0)


def test_labels_out_of_range(tmp_path, h):
    arrays = h.make_idx_arrays()
    arrays["test_labels"][3] = 10
    h.write_idx_set(tmp_path, arrays=arrays)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz contains label 10, outside 0\.\.9"):
        load_splits("mnist", tmp_path, download=False, val_size=0)


def test_swapped_files_and_wrong_image_size(tmp_path):
    images = tmp_path / "i"
    labels = tmp_path / "l"
    write_idx(images, np.zeros((3, 28, 28), np.uint8))
    write_idx(labels, np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="label file"):
        read_idx_pair(labels, labels, num_classes=10)
    with pytest.raises(DataError, match="image file"):
        read_idx_pair(images, images, num_classes=10)
    write_idx(images, np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(DataError, match="32x32 images, expected 28x28"):
        read_idx_pair(images, labels, num_classes=10, image_size=(28, 28))


def test_empty_and_unreadable(tmp_path):
    with pytest.raises(DataError, match="not even an IDX header"):
        parse_idx(b"", tmp_path / "empty")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "missing")
    empty_gz = tmp_path / "e.gz"
    empty_gz.write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match="not even an IDX header"):
        read_idx(empty_gz)
