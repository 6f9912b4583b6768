"""Reader for the IDX format of MNIST and Fashion-MNIST, gzipped or not.

The header is checked against the payload length before any array is built, so a truncated download
or a file of the wrong kind is reported as one ``DataError`` naming the file, never as a numpy
reshape error or a gzip traceback deep inside the loader.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from lottery.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08
_TYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}

DEFAULT_HINT = "delete it and run again to download a fresh copy, or replace it with the original file"


def is_gzip(path: str | os.PathLike) -> bool:
    """Sniff the content rather than trusting the ``.gz`` suffix, which users get wrong both ways."""
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def read_payload(path: str | os.PathLike, hint: str = DEFAULT_HINT) -> bytes:
    """The file's bytes, decompressed if it is gzipped; any I/O or gzip failure becomes a DataError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(2) == _GZIP_MAGIC:
                f.seek(0)
                with gzip.GzipFile(fileobj=f, mode="rb") as g:
                    return g.read()
            f.seek(0)
            return f.read()
    except EOFError:
        raise DataError(f"{path} is truncated (the gzip stream ends early); {hint}") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path} is not a valid gzip file ({e}); {hint}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; {hint}") from None


def parse_idx(payload: bytes, path: str | os.PathLike, hint: str = DEFAULT_HINT) -> np.ndarray:
    """Decode an uncompressed IDX payload into a uint8 array of the dimensions its header declares."""
    if len(payload) < 4:
        raise DataError(f"{path} is truncated ({len(payload)} bytes, not even an IDX header); {hint}")
    zero, dtype, ndim = struct.unpack(">HBB", payload[:4])
    if zero != 0 or not 1 <= ndim <= 4 or dtype not in _TYPE_NAMES:
        raise DataError(
            f"{path} is not an IDX file (magic bytes {payload[:4].hex()}, expected 0000080N); {hint}"
        )
    if dtype != _UBYTE:
        raise DataError(f"{path} holds {_TYPE_NAMES[dtype]} values; only uint8 IDX files are supported")
    header_len = 4 + 4 * ndim
    if len(payload) < header_len:
        raise DataError(f"{path} is truncated inside its header; {hint}")
    dims = struct.unpack(">" + "I" * ndim, payload[4:header_len])
    expected = math.prod(dims)
    got = len(payload) - header_len
    if got < expected:
        raise DataError(
            f"{path} is truncated: its header declares {'x'.join(map(str, dims))} = {expected} values "
            f"but it holds {got}; {hint}"
        )
    if got > expected:
        raise DataError(f"{path} has {got - expected} bytes after the data its header declares; {hint}")
    return np.frombuffer(payload, dtype=np.uint8, count=expected, offset=header_len).reshape(dims)


def read_idx(path: str | os.PathLike, hint: str = DEFAULT_HINT) -> np.ndarray:
    return parse_idx(read_payload(path, hint), path, hint)


def read_idx_pair(
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    *,
    num_classes: int,
    image_size: tuple[int, int] | None = None,
    hint: str = DEFAULT_HINT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 N x 1 x H x W) and labels (int64 N) of one split, checked against each other."""
    images = read_idx(images_path, hint)
    labels = read_idx(labels_path, hint)
    if images.ndim != 3:
        raise DataError(
            f"{images_path} holds a {images.ndim}-dimensional array, expected N x H x W images; "
            f"is it a label file? {hint}"
        )
    if labels.ndim != 1:
        raise DataError(
            f"{labels_path} holds a {labels.ndim}-dimensional array, expected N labels; "
            f"is it an image file? {hint}"
        )
    if image_size is not None and tuple(images.shape[1:]) != tuple(image_size):
        raise DataError(
            f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, expected "
            f"{image_size[0]}x{image_size[1]}; is it from another data set? {hint}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{labels_path} has {labels.shape[0]} labels but {images_path} has {images.shape[0]} images; "
            f"the two files come from different downloads or one is damaged: {hint}"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise DataError(
            f"{labels_path} contains label {int(labels.max())}, outside 0..{num_classes - 1}; "
            f"is it from another data set? {hint}"
        )
    x = torch.from_numpy(images.reshape(images.shape[0], 1, *images.shape[1:]).copy())
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write a uint8 array as IDX (gzipped if ``compress`` or the name ends in ``.gz``).

    Used by the tests to produce files in the real format, and handy for exporting subsets.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, _UBYTE, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.tobytes()
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
