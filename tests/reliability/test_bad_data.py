"""Bad data through the command line: truncated, corrupted or wrong-format files, labels out of range,
images of the wrong size for the data set or the model. Each gets one clear line naming the problem (and
the file), exit code 2, and no training step."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import faultkit as fk  # noqa: E402

from conftest import TensorBatches  # noqa: E402
from lottery import cli  # noqa: E402
from lottery.data.cifar import write_cifar_batch  # noqa: E402
from lottery.data.idx import write_idx  # noqa: E402
from lottery.engine import Trainer  # noqa: E402
from lottery.errors import ConfigError  # noqa: E402
from lottery.experiment import DataBundle, build_model  # noqa: E402
from lottery.hparams import ModelHparams, TrainingHparams  # noqa: E402
from lottery.models import model_names  # noqa: E402

IDX = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
       "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
RUN = ["--val-size", "20", "--batch-size", "32", "--epochs", "1", "--threads", "1", "--no-progress", "--no-download"]


@pytest.fixture(autouse=True)
def _no_data_from_elsewhere(tmp_path, monkeypatch):
    """Only the files a test writes: an empty user cache, no $LOTTERY_DATA or mirror, no download."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LOTTERY_DATA", raising=False)
    monkeypatch.delenv("LOTTERY_DATA_MIRROR", raising=False)


def _arrays(n_train=120, n_test=40, hw=(28, 28), classes=10):
    rng = np.random.default_rng(0)
    return {"train_images": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
            "train_labels": (np.arange(n_train) % classes).astype(np.uint8),
            "test_images": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
            "test_labels": (np.arange(n_test) % classes).astype(np.uint8)}


def _raw_idx(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    return struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape) \
        + array.tobytes()


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _halve(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_middle(data: bytes) -> bytes:
    b = bytearray(data)
    for i in range(len(b) // 2, len(b) // 2 + 16):
        b[i] ^= 0xFF
    return bytes(b)


# case -> (role of the file that is bad, its content from the good arrays, what the error line must say)
IDX_CASES = {
    "truncated payload": ("train_images", lambda a: _gz(_raw_idx(a["train_images"])[:-100]), "is truncated"),
    "truncated gzip": ("train_images", lambda a: _halve(_gz(_raw_idx(a["train_images"]))), "truncated"),
    "gzip trailer cut": ("train_labels", lambda a: _gz(_raw_idx(a["train_labels"]))[:-4], "truncated"),
    "corrupt gzip": ("test_images", lambda a: _flip_middle(_gz(_raw_idx(a["test_images"]))), "not a valid gzip"),
    "html error page": ("train_images", lambda a: b"<html><body>404 Not Found</body></html>", "is not an IDX file"),
    "empty file": ("test_labels", lambda a: b"", "is truncated"),
    "a pickle": ("train_images", lambda a: pickle.dumps({"data": [1, 2, 3]}), "is not an IDX file"),
    "labels in the image file": ("train_images", lambda a: _gz(_raw_idx(a["train_labels"])), "is it a label file"),
    "images in the label file": ("test_labels", lambda a: _gz(_raw_idx(a["test_images"])), "is it an image file"),
    "labels out of range": ("train_labels", lambda a: _gz(_raw_idx(np.where(a["train_labels"] == 3, 12, a["train_labels"]).astype(np.uint8))),
                            "contains label 12, outside 0..9"),
    "32x32 images for 28x28 mnist": ("test_images", lambda a: _gz(_raw_idx(np.zeros((40, 32, 32), np.uint8))),
                                     "holds 32x32 images, expected 28x28"),
    "fewer labels than images": ("train_labels", lambda a: _gz(_raw_idx(a["train_labels"][:100])), "has 100 labels but"),
    "trailing bytes": ("test_labels", lambda a: _gz(_raw_idx(a["test_labels"]) + b"\0" * 7), "7 bytes after the data"),
    "int32 values": ("train_labels", lambda a: _gz(_raw_idx(a["train_labels"].astype(">i4"), 0x0C)), "holds int32 values"),
}


def _cli(args) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args)
    return code, [ln for ln in err.getvalue().splitlines() if ln.startswith("lottery: error:")], err.getvalue()


def _assert_one_clear_line(tmp_path, args, *needles) -> str:
    code, lines, err = _cli([*args, "--out", str(tmp_path / "runs")])
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not list((tmp_path / "runs").rglob("*.safetensors"))  # no training step, no checkpoint
    return lines[0]


def test_good_idx_files_train(tmp_path):
    """The control: the same small files, undamaged, train."""
    for role, name in IDX.items():
        write_idx(tmp_path / "mnist" / name, _arrays()[role])
    code, lines, err = _cli(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"), *RUN,
                             "--out", str(tmp_path / "runs")])
    assert code == 0, err


@pytest.mark.parametrize("case", list(IDX_CASES))
def test_bad_idx_file_is_one_clear_line(tmp_path, case):
    role, content, needle = IDX_CASES[case]
    arrays = _arrays()
    folder = tmp_path / "mnist"
    for r, name in IDX.items():
        write_idx(folder / name, arrays[r])
    (folder / IDX[role]).write_bytes(content(arrays))
    _assert_one_clear_line(tmp_path, ["train", "--dataset", "mnist", "--data-dir", str(folder), *RUN],
                           needle, IDX[role])


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _cifar_folder(root: Path, bad: str | None = None, marker: Path | None = None) -> Path:
    folder = root / "cifar10" / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        images = rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
        labels = np.arange(20) % 10
        write_cifar_batch(folder / name, images, labels)
    target = folder / "data_batch_2"
    images = rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    if bad == "label 10":
        write_cifar_batch(target, images, [10] + [0] * 19)
    elif bad == "label -1":
        write_cifar_batch(target, images, [-1] + [0] * 19)
    elif bad == "truncated":
        target.write_bytes(target.read_bytes()[:500])
    elif bad == "grey 1024-pixel rows":
        with open(target, "wb") as f:
            pickle.dump({b"data": np.zeros((20, 1024), np.uint8), b"labels": [0] * 20}, f, protocol=2)
    elif bad == "code in the pickle":
        with open(target, "wb") as f:
            pickle.dump({b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 20, b"x": _Payload(marker)}, f)
    elif bad == "cifar-100 batch":
        with open(target, "wb") as f:
            pickle.dump({b"data": np.zeros((20, 3072), np.uint8), b"fine_labels": [0] * 20}, f, protocol=2)
    return root / "cifar10"


CIFAR_CASES = {
    "label 10": "outside 0..9",
    "label -1": "outside 0..9",
    "truncated": "is not a readable CIFAR batch",
    "grey 1024-pixel rows": "expected uint8 N x 3072",
    "code in the pickle": "(it may be malicious) and was not loaded",
    "cifar-100 batch": "is it from the other CIFAR?",
}


@pytest.mark.parametrize("case", list(CIFAR_CASES))
def test_bad_cifar_batch_is_one_clear_line(tmp_path, case):
    marker = tmp_path / "marker"
    data_dir = _cifar_folder(tmp_path / "data", case, marker)
    _assert_one_clear_line(tmp_path, ["train", "--dataset", "cifar10", "--model", "conv2", "--data-dir", str(data_dir),
                                      *RUN], CIFAR_CASES[case], "data_batch_2")
    assert not marker.exists()  # the restricted unpickler never ran the payload


def test_images_too_small_for_the_model_is_one_clear_line(tmp_path):
    line = _assert_one_clear_line(tmp_path, ["train", "--model", "conv6", *fk.SYNTH[:2], "--synthetic-shape", "1,4,4",
                                             *fk.SYNTH[4:]], "model 'conv6'", "4x4 are too small")
    assert "at least 8" in line


def test_the_experiment_layer_builds_the_model_for_the_data(tmp_path):
    """LeNet is registered for 1x28x28; on 3x32x32 data the experiment layer builds it for 3x32x32."""
    code, lines, err = _cli(["train", "--model", "lenet_300_100", *fk.SYNTH[:2], "--synthetic-shape", "3,32,32",
                             *fk.SYNTH[4:], "--epochs", "1", "--out", str(tmp_path)])
    assert code == 0, err


SHAPES = [(1, 1, 1), (1, 3, 5), (3, 7, 7), (1, 8, 8)]


@pytest.mark.parametrize("model", model_names())
def test_every_model_takes_the_data_shape_or_refuses_it_clearly(model):
    """Built by the experiment layer for the data's shape, a model runs on it or is a ConfigError naming the
    model: never a shape error from inside the forward pass."""
    for shape in SHAPES:
        bundle = DataBundle(splits=None, num_classes=7, input_shape=shape, augment=False)
        try:
            net = build_model(ModelHparams(model=model), bundle, seed=0)
        except ConfigError as e:
            assert f"model {model!r}" in str(e) and "too small" in str(e)
            continue
        with torch.no_grad():
            assert tuple(net.eval()(torch.zeros(2, *shape)).shape) == (2, 7)


def test_data_of_another_shape_than_the_model_is_a_clear_error():
    """Through the library (a model built for 1x28x28, 3x32x32 batches): a ConfigError naming both shapes."""
    bundle = DataBundle(splits=None, num_classes=10, input_shape=(1, 28, 28), augment=False)
    model = build_model(ModelHparams(), bundle, seed=0)
    x, y = torch.zeros(64, 3, 32, 32), torch.zeros(64, dtype=torch.int64)
    trainer = Trainer(model, TensorBatches(x, y, 32), TrainingHparams(training_steps="1ep", batch_size=32),
                      progress=False, log=lambda m: None)
    with pytest.raises(ConfigError, match=r"built for 1x28x28 images but the training data has 3x32x32"):
        trainer.fit()
