"""Where files are looked for, in which order, and the verified download into the user cache."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import socket

import numpy as np
import pytest

from lottery.data import DATASETS, RemoteFile, cache_dir, load_train_test
from lottery.data.download import download
from lottery.errors import DataError
from lottery_data_testkit import *  # noqa: F401,F403 - fixtures: isolated_data_env (autouse), http_root, h


def _first_label(train):
    return train.images[0].sum().item()


def _signature(folder, h, seed):
    files = h.write_idx_set(folder, seed=seed)
    return int(files["train_images"][1][0].astype(np.int64).sum())


def test_search_order(tmp_path, monkeypatch, h, isolated_data_env):
    explicit, env_root, system = tmp_path / "explicit", tmp_path / "env", tmp_path / "system"
    sig = {
        "explicit": _signature(explicit, h, 1),
        "env": _signature(env_root / "mnist", h, 2),
        "cache": _signature(isolated_data_env / "mnist", h, 3),
        "system": _signature(system, h, 4),
    }
    assert len(set(sig.values())) == 4
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], system_dirs=(str(system),)))
    monkeypatch.setenv("LOTTERY_DATA", str(env_root))

    def loaded(data_dir=None):
        train, _ = load_train_test("mnist", data_dir, download=False)
        return _first_label(train)

    assert loaded(explicit) == sig["explicit"]  # explicit beats env var
    assert loaded() == sig["env"]  # env var beats cache
    monkeypatch.delenv("LOTTERY_DATA")
    assert loaded() == sig["cache"]  # cache beats system
    for f in (isolated_data_env / "mnist").iterdir():
        f.unlink()
    assert loaded() == sig["system"]


@pytest.mark.parametrize("download", [False, True])
def test_an_explicit_dir_without_a_complete_copy_is_refused_not_replaced(tmp_path, h, isolated_data_env, download):
    """A folder the user named is used or refused: never a silent switch to the cache (or a download)."""
    _signature(isolated_data_env / "mnist", h, 7)  # a good copy elsewhere must not be used instead
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"the data folder .*empty \(--data-dir\) holds no complete copy of mnist"):
        load_train_test("mnist", tmp_path / "empty", download=download)
    partial = h.write_idx_set(tmp_path / "partial")
    partial["train_labels"][0].unlink()
    with pytest.raises(DataError, match="lacks train-labels-idx1-ubyte"):
        load_train_test("mnist", tmp_path / "partial", download=download)


def test_a_run_logs_where_its_data_came_from(tmp_path, h, isolated_data_env):
    from lottery.data import load_splits

    _signature(tmp_path / "mine", h, 3)
    assert load_splits("mnist", tmp_path / "mine", val_size=0, download=False).source == f"{tmp_path / 'mine'} (--data-dir)"
    _signature(isolated_data_env / "mnist", h, 4)
    assert load_splits("mnist", val_size=0, download=False).source == f"{isolated_data_env / 'mnist'} (user cache)"


@pytest.mark.parametrize("layout", ["MNIST/raw", "mnist", "MNIST"])
def test_subfolder_layouts(tmp_path, h, layout):
    sig = _signature(tmp_path / layout, h, 5)
    train, _ = load_train_test("mnist", tmp_path, download=False)
    assert _first_label(train) == sig


def test_env_root_itself_not_used_for_idx(tmp_path, monkeypatch, h):
    """MNIST and Fashion-MNIST share file names: a bare $LOTTERY_DATA root would be ambiguous."""
    h.write_idx_set(tmp_path)
    monkeypatch.setenv("LOTTERY_DATA", str(tmp_path))
    with pytest.raises(DataError, match="cannot find the mnist data set"):
        load_train_test("mnist", download=False)


def test_not_found_message_lists_places_files_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("LOTTERY_DATA", str(tmp_path / "env"))
    system = str(tmp_path / "usr-share")  # the real Debian copy may be installed
    monkeypatch.setitem(DATASETS, "fashion-mnist", dataclasses.replace(DATASETS["fashion-mnist"], system_dirs=(system,)))
    with pytest.raises(DataError) as e:
        load_train_test("fashion-mnist", download=False)
    msg = str(e.value)
    for expected in [
        str(tmp_path / "env" / "fashion-mnist"),
        str(cache_dir("fashion-mnist")),
        system + " (system)",
        "t10k-labels-idx1-ubyte",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz",
        "download=False",
    ]:
        assert expected in msg
    assert msg.index(str(tmp_path / "env")) < msg.index(str(cache_dir("fashion-mnist")))


def test_partial_set_reported(tmp_path, h):
    files = h.write_idx_set(tmp_path)
    files["test_labels"][0].unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        load_train_test("mnist", tmp_path, download=False)


# --- download -----------------------------------------------------------------------------------


def _serve_idx(root, h, seed=0):
    files = h.write_idx_set(root, seed=seed)
    return {role: RemoteFile(name=p.name, sha256=h.sha256(p)) for role, (p, _) in files.items()}, files


def _register(monkeypatch, name, base_url, remote_files):
    spec = dataclasses.replace(DATASETS[name], base_url=base_url, files=remote_files, system_dirs=())
    monkeypatch.setitem(DATASETS, name, spec)
    return spec


def test_download_into_cache(http_root, h, monkeypatch, isolated_data_env):
    root, url = http_root
    remote, files = _serve_idx(root, h)
    _register(monkeypatch, "mnist", url, remote)
    train, test = load_train_test("mnist", progress=False)
    assert np.array_equal(train.images[:, 0].numpy(), files["train_images"][1])
    target = isolated_data_env / "mnist"
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == sorted(
        r.name for r in remote.values()
    )
    assert not list(target.glob("*.part"))
    for p in root.iterdir():  # a second load must use the cache, not the server
        p.unlink()
    train2, _ = load_train_test("mnist", progress=False)
    assert np.array_equal(train2.images.numpy(), train.images.numpy())


def test_download_accepts_payload_digest(http_root, h, monkeypatch):
    """Fashion-MNIST style: the archive MD5 differs (recompressed) but the uncompressed SHA-256 matches."""
    root, url = http_root
    files = h.write_idx_set(root)
    remote = {
        role: RemoteFile(
            name=p.name,
            md5="0" * 32,
            payload_sha256=hashlib.sha256(gzip.decompress(p.read_bytes())).hexdigest(),
        )
        for role, (p, _) in files.items()
    }
    _register(monkeypatch, "fashion-mnist", url, remote)
    train, _ = load_train_test("fashion-mnist", progress=False)
    assert len(train) == 60


def test_download_checksum_mismatch(http_root, h, monkeypatch, isolated_data_env):
    root, url = http_root
    remote, _ = _serve_idx(root, h)
    remote["train_labels"] = dataclasses.replace(remote["train_labels"], sha256="ab" * 32)
    _register(monkeypatch, "mnist", url, remote)
    with pytest.raises(DataError) as e:
        load_train_test("mnist", progress=False)
    msg = str(e.value)
    assert "checksum mismatch for train-labels-idx1-ubyte.gz" in msg
    assert "expected sha256 " + "ab" * 32 in msg
    assert "got sha256 " + h.sha256(root / "train-labels-idx1-ubyte.gz") in msg
    leftovers = [p.name for p in (isolated_data_env / "mnist").iterdir() if not p.name.endswith(".lock")]
    assert "train-labels-idx1-ubyte.gz" not in leftovers and not [n for n in leftovers if ".part" in n]


def test_download_mirror_env_var(http_root, h, monkeypatch):
    root, url = http_root
    remote, _ = _serve_idx(root / "mirror", h)
    _register(monkeypatch, "mnist", "http://127.0.0.1:9/unreachable/", remote)
    monkeypatch.setenv("LOTTERY_DATA_MIRROR", url + "mirror/")
    train, _ = load_train_test("mnist", progress=False)
    assert len(train) == 60


def test_download_http_error_lists_places(http_root, h, monkeypatch):
    root, url = http_root
    remote, _ = _serve_idx(root, h)
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    _register(monkeypatch, "mnist", url, remote)
    with pytest.raises(DataError) as e:
        load_train_test("mnist", progress=False)
    msg = str(e.value)
    assert "cannot find the mnist data set" in msg and "HTTP 404" in msg
    assert url + "t10k-images-idx3-ubyte.gz" in msg and "(cache)" in msg


def test_download_connection_refused(h, monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = {"archive": RemoteFile(name="cifar-10-python.tar.gz", sha256="0" * 64)}
    _register(monkeypatch, "cifar10", f"http://127.0.0.1:{port}/", remote)
    with pytest.raises(DataError, match="the download failed: cannot reach"):
        load_train_test("cifar10", progress=False)


def test_download_refuses_without_digest(http_root, tmp_path):
    root, url = http_root
    (root / "f.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="no digest is registered"):
        download(url + "f.bin", tmp_path / "f.bin", RemoteFile(name="f.bin"))
    assert not (tmp_path / "f.bin").exists()


# --- verify=True on local files -------------------------------------------------------------------


def test_verify_local_files(tmp_path, h, monkeypatch):
    files = h.write_idx_set(tmp_path / "mnist")
    remote = {role: RemoteFile(name=p.name, sha256=h.sha256(p)) for role, (p, _) in files.items()}
    _register(monkeypatch, "mnist", None, remote)
    load_train_test("mnist", tmp_path, verify=True)
    good = files["train_labels"][1].copy()
    good[0] = (good[0] + 1) % 10  # structurally fine, different content
    h.write_idx_set(tmp_path / "mnist", arrays={**h.make_idx_arrays(), "train_labels": good})
    load_train_test("mnist", tmp_path)  # default loads do not checksum
    with pytest.raises(DataError, match=r"checksum mismatch for .*train-labels-idx1-ubyte\.gz: expected sha256"):
        load_train_test("mnist", tmp_path, verify=True)


def test_verify_raw_file_without_payload_digest_warns(tmp_path, h, monkeypatch):
    files = h.write_idx_set(tmp_path / "mnist", gz=False)
    remote = {role: RemoteFile(name=p.name + ".gz", sha256="0" * 64) for role, (p, _) in files.items()}
    _register(monkeypatch, "mnist", None, remote)
    with pytest.warns(UserWarning, match="checked structurally only"):
        load_train_test("mnist", tmp_path, verify=True)


def test_cache_is_isolated_for_every_test():
    """The autouse fixture must keep the developer's real ~/.cache out of all these tests."""
    assert "xdg-cache" in str(cache_dir("mnist"))
