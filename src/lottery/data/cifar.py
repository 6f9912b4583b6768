"""Reader for the official CIFAR-10/100 "python version" batches, extracted or inside the tar.gz.

The batches are pickles, and unpickling can run arbitrary code, so they are read with an
unpickler that can only rebuild numpy arrays: a tampered file fails with a DataError instead of
executing anything. Reading straight from the archive saves users an extraction step and 180 MB.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from lottery.errors import DataError

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
CIFAR100_TRAIN = ("train",)
CIFAR100_TEST = ("test",)


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only callables the CIFAR pickles need, under every module path numpy has used for them.

    Official files (pickled by Python 2 / numpy 1.x) name ``numpy.core.multiarray._reconstruct``;
    files re-saved with numpy 2 name ``numpy._core``; protocol-2 pickles written by Python 3 encode
    bytes through ``_codecs.encode``, which only turns a str into bytes.
    """
    import codecs

    try:
        from numpy._core import multiarray as ma  # numpy >= 2
        from numpy._core import numeric as nm
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma  # type: ignore[no-redef]
        from numpy.core import numeric as nm  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(mod + ".multiarray", "_reconstruct")] = ma._reconstruct
        if hasattr(nm, "_frombuffer"):
            allowed[(mod + ".numeric", "_frombuffer")] = nm._frombuffer
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array reconstruction; anything else is refused."""

    _allowed: dict[tuple[str, str], object] | None = None

    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]  # type: ignore[index]
        except KeyError:
            raise DataError(
                f"{self.source} refers to {module}.{name}, which a CIFAR batch never needs; the file is "
                "not an official CIFAR batch (it may be malicious) and was not loaded"
            ) from None


def load_batch(data: bytes, source: str, hint: str) -> dict:
    """Unpickle one batch and normalise its keys to str (the files use latin1 byte-string keys)."""
    try:
        obj = SafeUnpickler(io.BytesIO(data), source=source).load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbled pickles raise a zoo of types
        raise DataError(f"{source} is not a readable CIFAR batch ({type(e).__name__}: {e}); {hint}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{source} holds a {type(obj).__name__}, not a CIFAR batch dict; {hint}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def batch_arrays(batch: dict, source: str, label_key: str, num_classes: int, hint: str):
    data = batch.get("data")
    labels = batch.get(label_key)
    if data is None or labels is None:
        raise DataError(f"{source} has no 'data'/'{label_key}' entries; is it from the other CIFAR? {hint}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{source}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072; {hint}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{source}: '{label_key}' is not a list of integers; {hint}") from None
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{source} has {labels.size} labels for {data.shape[0]} images; the file is damaged: {hint}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{source} contains labels outside 0..{num_classes - 1} (min {labels.min()}, max {labels.max()}); "
            f"is it from the other CIFAR? {hint}"
        )
    return data, labels


def _assemble(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    # The 3072 values are the R, G and B planes, each 32x32 row-major: exactly N x C x H x W.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _names(kind: str) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    if kind == "cifar10":
        return CIFAR10_TRAIN, CIFAR10_TEST, "labels"
    if kind == "cifar100":
        return CIFAR100_TRAIN, CIFAR100_TEST, "fine_labels"
    raise ValueError(kind)


def read_cifar_folder(folder: str | os.PathLike, kind: str, num_classes: int, hint: str):
    """(train images, train labels, test images, test labels) from an extracted batches folder."""
    folder = Path(folder)
    train_names, test_names, label_key = _names(kind)
    out = []
    for names in (train_names, test_names):
        parts = []
        for n in names:
            path = folder / n
            try:
                data = path.read_bytes()
            except OSError as e:
                raise DataError(f"cannot read {path}: {e.strerror or e}; {hint}") from None
            parts.append(batch_arrays(load_batch(data, str(path), hint), str(path), label_key, num_classes, hint))
        out.extend(_assemble(parts))
    return tuple(out)


def read_cifar_archive(archive: str | os.PathLike, kind: str, num_classes: int, hint: str):
    """The same from the official tar.gz, read in one forward pass without extracting.

    Members are consumed in archive order: seeking backwards in a gzip stream would decompress it
    again from the start for every batch.
    """
    archive = Path(archive)
    train_names, test_names, label_key = _names(kind)
    wanted = set(train_names) | set(test_names)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            for member in tf:
                base = member.name.rsplit("/", 1)[-1]
                if base not in wanted or base in found or not member.isfile():
                    continue
                f = tf.extractfile(member)
                if f is None:
                    continue
                source = f"{archive}:{member.name}"
                batch = load_batch(f.read(), source, hint)
                found[base] = batch_arrays(batch, source, label_key, num_classes, hint)
    except DataError:
        raise
    except EOFError:
        raise DataError(f"{archive} is truncated; {hint}") from None
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{archive} is not a valid tar.gz archive ({e}); {hint}") from None
    except OSError as e:
        raise DataError(f"cannot read {archive}: {e.strerror or e}; {hint}") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(f"{archive} lacks the batches {', '.join(missing)}; is it the right archive? {hint}")
    train = _assemble([found[n] for n in train_names])
    test = _assemble([found[n] for n in test_names])
    return (*train, *test)


def write_cifar_batch(path: str | os.PathLike, images: np.ndarray, labels, *, kind: str = "cifar10", protocol: int = 2):
    """Write N x 3 x 32 x 32 uint8 images as an official-style batch (bytes keys, labels a list).

    For tests and for exporting subsets; mirrors what the authors' Python 2 ``cPickle.dump`` produced.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
    label_key = b"labels" if kind == "cifar10" else b"fine_labels"
    obj = {
        b"batch_label": b"written by lottery.data.cifar",
        label_key: [int(v) for v in labels],
        b"data": images,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    if kind == "cifar100":
        obj[b"coarse_labels"] = [int(v) // 5 for v in labels]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
