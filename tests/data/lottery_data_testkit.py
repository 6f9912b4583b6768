"""Fixtures for the data tests: small files in the real formats and a local HTTP server.

Every test runs with an empty user cache and no ``$LOTTERY_DATA``/mirror, so nothing on the machine
(or a developer's ~/.cache) leaks into the results. Each test module star-imports this file: a
``conftest.py`` here would shadow ``tests/conftest.py``, which other test folders import by name.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from lottery.data.idx import write_idx

__all__ = ["isolated_data_env", "http_root", "h"]

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True)
def isolated_data_env(tmp_path, monkeypatch):
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("LOTTERY_DATA", raising=False)
    monkeypatch.delenv("LOTTERY_DATA_MIRROR", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return cache / "lottery"


def make_idx_arrays(n_train=60, n_test=20, seed=0, hw=(28, 28), num_classes=10):
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % num_classes).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % num_classes).astype(np.uint8),
    }


def write_idx_set(folder: Path, *, gz=True, seed=0, n_train=60, n_test=20, arrays=None) -> dict:
    """Write the four MNIST-format files into ``folder``; returns role -> (path, array)."""
    arrays = arrays or make_idx_arrays(n_train, n_test, seed)
    out = {}
    for role, name in IDX_NAMES.items():
        path = Path(folder) / (name + (".gz" if gz else ""))
        write_idx(path, arrays[role])
        out[role] = (path, arrays[role])
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def http_root(tmp_path):
    """(folder, base URL): a threaded HTTP server on 127.0.0.1 serving files from ``folder``."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class Helpers:
    """Writers shared by the test files, handed out as the ``h`` fixture."""

    IDX_NAMES = IDX_NAMES
    make_idx_arrays = staticmethod(make_idx_arrays)
    write_idx_set = staticmethod(write_idx_set)
    sha256 = staticmethod(sha256)


@pytest.fixture
def h():
    return Helpers
