"""lottery.io: files written atomically get the mode the umask gives a new file (shared run folders)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lottery import cli
from lottery.io import atomic_write_bytes, new_file_mode, write_json


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert new_file_mode() == mode
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    write_json(tmp_path / "b.json", {"a": 1})
    for name in ("a.bin", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_a_run_folder_is_readable_by_the_group_under_a_shared_umask(tmp_path, umask):
    umask(0o002)
    code = cli.main(["train", "--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-train-size", "64",
                     "--synthetic-test-size", "32", "--val-size", "32", "--training-steps", "1ep", "--batch-size", "32",
                     "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o664 for p in files), \
        {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
