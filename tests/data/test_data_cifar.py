"""CIFAR-10/100 reader: extracted batches and the tar.gz, and the restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from lottery.data import load_splits, load_train_test
from lottery.data.cifar import CIFAR10_TEST, CIFAR10_TRAIN, load_batch, write_cifar_batch
from lottery.errors import DataError
from lottery_data_testkit import *  # noqa: F401,F403 - fixtures: isolated_data_env (autouse), http_root, h


def _write_cifar10(folder, per_batch=8, protocol=2):
    """Official layout: cifar-10-batches-py/data_batch_1..5, test_batch; returns the arrays."""
    rng = np.random.default_rng(0)
    out = {}
    for name in CIFAR10_TRAIN + CIFAR10_TEST:
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        write_cifar_batch(folder / "cifar-10-batches-py" / name, x, y, protocol=protocol)
        out[name] = (x, y)
    return out


def _write_cifar100(folder, n_train=12, n_test=6):
    rng = np.random.default_rng(1)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 100, n)
        write_cifar_batch(folder / "cifar-100-python" / name, x, y, kind="cifar100")
        out[name] = (x, y)
    return out


def _tar(src_dir, inner, archive):
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src_dir / inner, arcname=inner)
    return archive


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_extracted(tmp_path, protocol):
    arrays = _write_cifar10(tmp_path, protocol=protocol)
    train, test = load_train_test("cifar10", tmp_path, download=False)
    assert train.images.shape == (40, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (8, 3, 32, 32)
    expected = np.concatenate([arrays[n][0] for n in CIFAR10_TRAIN])
    assert np.array_equal(train.images.numpy(), expected)  # channel planes land in C of N x C x H x W
    assert np.array_equal(test.labels.numpy(), arrays["test_batch"][1])
    assert train.num_classes == 10 and len(train.mean) == 3


def test_cifar10_from_archive_equals_extracted(tmp_path):
    src = tmp_path / "src"
    _write_cifar10(src)
    archive = _tar(src, "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    a_train, a_test = load_train_test("cifar10", tmp_path, download=False)  # only the archive is here
    e_train, e_test = load_train_test("cifar10", src, download=False)
    assert torch.equal(a_train.images, e_train.images) and torch.equal(a_train.labels, e_train.labels)
    assert torch.equal(a_test.images, e_test.images)
    assert archive.exists() and not (tmp_path / "cifar-10-batches-py").exists()  # nothing extracted


def test_cifar100_fine_labels_archive_and_folder(tmp_path):
    src = tmp_path / "src"
    arrays = _write_cifar100(src)
    splits = load_splits("cifar100", src, download=False, val_size=2, seed=3)
    assert len(splits.train) == 10 and len(splits.val) == 2 and len(splits.test) == 6
    assert splits.test.num_classes == 100
    assert np.array_equal(splits.test.labels.numpy(), arrays["test"][1])
    _tar(src, "cifar-100-python", tmp_path / "cifar-100-python.tar.gz")
    train, test = load_train_test("cifar100", tmp_path, download=False)
    assert np.array_equal(train.images.numpy(), arrays["train"][0])


def test_cifar_in_named_subfolder(tmp_path):
    _write_cifar10(tmp_path / "cifar10")
    train, _ = load_train_test("cifar10", tmp_path, download=False)
    assert len(train) == 40


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unpickler_refuses_code(tmp_path):
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    _write_cifar10(tmp_path)
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1 refers to (posix|os)\.system"):
        load_train_test("cifar10", tmp_path, download=False)


def test_unpickler_handles_official_style_batch():
    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251
    buf = io.BytesIO()
    pickle.dump({b"data": x, b"labels": [1, 2]}, buf, protocol=2)
    batch = load_batch(buf.getvalue(), "mem", "hint")
    assert np.array_equal(batch["data"], x) and batch["labels"] == [1, 2]


def test_truncated_batch(tmp_path):
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR batch"):
        load_train_test("cifar10", tmp_path, download=False)


def test_truncated_archive(tmp_path):
    src = tmp_path / "src"
    _write_cifar10(src)
    archive = _tar(src, "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    archive.write_bytes(archive.read_bytes()[:-2000])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz"):
        load_train_test("cifar10", tmp_path, download=False)


def test_corrupt_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00garbage" * 50)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz"):
        load_train_test("cifar10", tmp_path, download=False)


def test_archive_missing_a_batch(tmp_path):
    src = tmp_path / "src"
    _write_cifar10(src)
    (src / "cifar-10-batches-py" / "data_batch_5").unlink()
    _tar(src, "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="lacks the batches data_batch_5"):
        load_train_test("cifar10", tmp_path, download=False)


def test_label_count_mismatch_and_range(tmp_path):
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    x = np.zeros((4, 3, 32, 32), np.uint8)
    path.write_bytes(pickle.dumps({b"data": x.reshape(4, -1), b"labels": [0, 1, 2]}, protocol=2))
    with pytest.raises(DataError, match="test_batch has 3 labels for 4 images"):
        load_train_test("cifar10", tmp_path, download=False)
    write_cifar_batch(path, x, [0, 1, 2, 10])
    with pytest.raises(DataError, match=r"test_batch contains labels outside 0\.\.9"):
        load_train_test("cifar10", tmp_path, download=False)


def test_cifar100_file_in_cifar10_slot(tmp_path):
    _write_cifar10(tmp_path)
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", np.zeros((2, 3, 32, 32)), [1, 2], kind="cifar100")
    with pytest.raises(DataError, match="test_batch has no 'data'/'labels' entries"):
        load_train_test("cifar10", tmp_path, download=False)


def test_partial_extracted_folder_reported(tmp_path):
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").unlink()
    with pytest.raises(DataError, match="lacks data_batch_2"):
        load_train_test("cifar10", tmp_path, download=False)


def test_cifar10_archive_download(tmp_path, http_root, monkeypatch, isolated_data_env):
    import dataclasses
    import hashlib

    from lottery.data import DATASETS, RemoteFile

    root, url = http_root
    src = tmp_path / "src"
    arrays = _write_cifar10(src, per_batch=4)
    archive = _tar(src, "cifar-10-batches-py", root / "cifar-10-python.tar.gz")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    spec = dataclasses.replace(
        DATASETS["cifar10"], base_url=url, files={"archive": RemoteFile(archive.name, sha256=digest)}
    )
    monkeypatch.setitem(DATASETS, "cifar10", spec)
    splits = load_splits("cifar10", val_size=5, seed=0, progress=False)
    assert len(splits.train) == 15 and len(splits.val) == 5
    assert np.array_equal(splits.test.images.numpy(), arrays["test_batch"][0])
    assert (isolated_data_env / "cifar10" / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    with pytest.warns(UserWarning, match="checked structurally only"):
        load_train_test("cifar10", src, verify=True)  # extracted batches have no published digest


def test_numpy1_module_path_accepted():
    """The official files name numpy.core.multiarray (numpy 1.x); numpy 2 moved it to numpy._core."""
    x = np.arange(3072, dtype=np.uint8).reshape(1, 3072)
    data = pickle.dumps({b"data": x, b"labels": [4]}, protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in data  # GLOBAL opcode: text, no length prefix
    legacy = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    batch = load_batch(legacy, "legacy", "hint")
    assert np.array_equal(batch["data"], x)
