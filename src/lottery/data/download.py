"""Fetching a published file and checking it against the digests we know for it.

A file only lands under its final name after a digest matched, through a temporary file and an
atomic rename, so a killed download or a wrong file served by a proxy never leaves something a later
run would trust. A file lock stops parallel runs (several seeds launched at once) from downloading
the same file twice.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from lottery.data.datasets import RemoteFile
from lottery.errors import DataError
from lottery.io import temp_file_beside

_CHUNK = 1 << 20


class DownloadError(DataError):
    """The file could not be fetched at all (network, HTTP status); the caller adds where it looked."""


@dataclass(frozen=True)
class Digests:
    sha256: str
    md5: str
    payload_sha256: str | None  # of the decompressed content, None if the file is not gzip

    def matches(self, remote: RemoteFile) -> bool:
        return bool(
            (remote.sha256 and remote.sha256 == self.sha256)
            or (remote.md5 and remote.md5 == self.md5)
            or (remote.payload_sha256 and remote.payload_sha256 == self.payload_sha256)
        )

    def describe(self) -> str:
        parts = [f"sha256 {self.sha256}", f"md5 {self.md5}"]
        if self.payload_sha256:
            parts.append(f"uncompressed sha256 {self.payload_sha256}")
        return ", ".join(parts)


def expected_digests(remote: RemoteFile) -> str:
    parts = []
    if remote.sha256:
        parts.append(f"sha256 {remote.sha256}")
    if remote.md5:
        parts.append(f"md5 {remote.md5}")
    if remote.payload_sha256:
        parts.append(f"uncompressed sha256 {remote.payload_sha256}")
    return " or ".join(parts) or "(none registered)"


def _payload_sha256(path: Path) -> str | None:
    """SHA-256 of the decompressed content, or of the file itself when it is not gzipped.

    The uncompressed digest identifies IDX data independently of who compressed it; a raw file is
    its own payload. A corrupt gzip stream simply has no payload digest (so it cannot match).
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            stream = gzip.GzipFile(fileobj=f) if gz else f
            while chunk := stream.read(_CHUNK):
                h.update(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error):
        return None
    return h.hexdigest()


def file_digests(path: str | os.PathLike, *, payload: bool = True) -> Digests:
    path = Path(path)
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
                md5.update(chunk)
        return Digests(sha.hexdigest(), md5.hexdigest(), _payload_sha256(path) if payload else None)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def verify_file(path: str | os.PathLike, remote: RemoteFile, *, hint: str) -> None:
    """Full checksum of a local file against every digest we know for it (the ``verify=True`` path).

    When no known digest can apply (an uncompressed file whose only published digest is that of the
    archive) we warn rather than fail: the structural checks still ran, and failing would make
    ``verify=True`` unusable with extracted copies.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; {hint}") from None
    if not (remote.payload_sha256 or (gz and (remote.sha256 or remote.md5))):
        warnings.warn(
            f"no published digest applies to {path} (only the compressed {remote.name} has one); "
            "it was checked structurally only",
            stacklevel=3,
        )
        return
    got = file_digests(path, payload=remote.payload_sha256 is not None)
    if not got.matches(remote):
        raise DataError(
            f"checksum mismatch for {path}: expected {expected_digests(remote)}, got {got.describe()}; {hint}"
        )


def download(url: str, dest: str | os.PathLike, remote: RemoteFile, *, progress: bool | None = None,
             timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` if it is not there yet, accepting it only if a known digest matches.

    ``progress=None`` shows a tqdm bar only on a terminal, keeping logs of batch jobs clean.
    """
    dest = Path(dest)
    if not remote.has_digest:
        raise DataError(
            f"refusing to download {url}: no digest is registered for {remote.name} in "
            "lottery.data.datasets.DATASETS, so the file could not be checked"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if dest.exists():  # another process finished it while we waited for the lock
            return dest
        fd, tmp_name = temp_file_beside(dest, ".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                _fetch(url, f, remote.name, progress, timeout)
                f.flush()
                os.fsync(f.fileno())
            got = file_digests(tmp, payload=remote.payload_sha256 is not None)
            if not got.matches(remote):
                raise DataError(
                    f"checksum mismatch for {remote.name} downloaded from {url}: expected "
                    f"{expected_digests(remote)}, got {got.describe()}; the file was deleted. The server "
                    "or a proxy returned something else: try again later, or point LOTTERY_DATA_MIRROR at "
                    "a mirror holding the official files"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def _fetch(url: str, f, label: str, progress: bool | None, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "lottery-data (python urllib)"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            with tqdm(
                total=int(total) if total and total.isdigit() else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                disable=None if progress is None else not progress,
                leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url} answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot reach {url}: {e.reason}") from None
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        raise DownloadError(f"downloading {url} failed: {e}") from None
