"""Disk full and read-only folders: a clear one-line error, the last good checkpoint intact, then a resume.

Faults are injected in-process where ``lottery.io`` writes (creating the temporary file, writing it,
fsync, the rename): a full disk fails while writing, a read-only or forbidden folder when the temporary
file is created. A folder made read-only for real (chmod) only works for users other than root, which
ignores permissions; as root (as in CI containers) the read-only file system is simulated instead by
making every write-mode ``os.open``/``mkdir``/``unlink``/``replace`` below the folder fail with EROFS.
To exercise the chmod branch as root, drop the capability that lets root ignore permissions:
``setpriv --bounding-set=-dac_override,-dac_read_search,-fowner python -m pytest tests/reliability/test_disk_faults.py``.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import faultkit as fk  # noqa: E402

import lottery.io as lio  # noqa: E402
from conftest import TensorBatches, blobs, tiny_mlp  # noqa: E402
from lottery import cli  # noqa: E402
from lottery.engine import Trainer, load_checkpoint  # noqa: E402
from lottery.errors import LotteryError, StorageError  # noqa: E402
from lottery.hparams import TrainingHparams  # noqa: E402

HP = TrainingHparams(training_steps="3ep", batch_size=32, lr=0.1, momentum=0.9)
IPE = 8  # 256 samples / 32


class _Proxy:
    """A module stand-in: the given attributes replaced, everything else the real module's."""

    def __init__(self, real, **replaced):
        self._real = real
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._real, name)


class DiskFault:
    """Make ``lottery.io``'s writes of paths containing ``match`` fail from the ``nth`` one on.

    ``where``: ``mkstemp`` (creating the temporary file: read-only folder, no permission, no inode
    left), ``write`` (half the bytes written, then the disk is full), ``fsync`` or ``replace``.
    """

    def __init__(self, monkeypatch, where: str, err: int, match: str = "checkpoint", nth: int = 2):
        self.where, self.err, self.match, self.nth = where, err, match, nth
        self.seen = 0
        self.fired = 0
        self._fds: set[int] = set()
        real_os, real_tempfile = lio.os, lio.tempfile

        def fail(path):
            self.fired += 1
            raise OSError(self.err, os.strerror(self.err), str(path))

        def hits(name: str) -> bool:
            if self.match not in name:
                return False
            self.seen += 1
            return self.seen >= self.nth

        def mkstemp(prefix="", suffix="", dir=None, **kw):
            hit = hits(prefix)
            if hit and where == "mkstemp":
                fail(dir)
            fd, tmp = real_tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir, **kw)
            if hit:
                self._fds.add(fd)
            return fd, tmp

        class HalfThenFull:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                fail("(write)")

            def __getattr__(self, name):
                return getattr(self.f, name)

        def fdopen(fd, *a, **kw):
            f = real_os.fdopen(fd, *a, **kw)
            return HalfThenFull(f) if (fd in self._fds and where == "write") else f

        def fsync(fd):
            if fd in self._fds and where == "fsync":
                fail("(fsync)")
            return real_os.fsync(fd)

        def replace(src, dst):  # mkstemp has counted this write already
            if where == "replace" and self.match in str(dst) and self.seen >= self.nth:
                fail(dst)
            return real_os.replace(src, dst)

        monkeypatch.setattr(lio, "tempfile", _Proxy(real_tempfile, mkstemp=mkstemp))
        monkeypatch.setattr(lio, "os", _Proxy(real_os, fdopen=fdopen, fsync=fsync, replace=replace))


def _train(path, callbacks=()):
    x, y = blobs()
    model = tiny_mlp()
    trainer = Trainer(model, TensorBatches(x, y, 32), HP, checkpoint_path=path, callbacks=list(callbacks),
                      progress=False, log=lambda m: None)
    trainer.fit()
    return model


FAULTS = [
    ("write", errno.ENOSPC),   # disk full while writing the checkpoint
    ("fsync", errno.EDQUOT),   # quota exceeded when flushing
    ("fsync", errno.EIO),      # I/O error when flushing
    ("mkstemp", errno.ENOSPC),  # no room for a new file
    ("mkstemp", errno.EROFS),  # file system remounted read-only
    ("mkstemp", errno.EACCES),  # folder made read-only / permission removed
    ("replace", errno.EIO),    # the rename fails
]


@pytest.mark.parametrize("where,err", FAULTS, ids=[f"{w}-{errno.errorcode[e]}" for w, e in FAULTS])
def test_failed_checkpoint_write_is_clear_and_keeps_the_last_good_one(tmp_path, monkeypatch, where, err):
    reference = _train(None)
    path = tmp_path / "run" / "checkpoint.safetensors"
    with monkeypatch.context() as m:
        fault = DiskFault(m, where, err, nth=2)  # the epoch-1 checkpoint is written, epoch 2's fails
        with pytest.raises(StorageError) as info:
            _train(path)
        assert fault.fired == 1
    e = info.value
    assert isinstance(e, LotteryError) and isinstance(e, OSError) and e.errno == err
    msg = str(e)
    assert "\n" not in msg and f"cannot write {path}" in msg and os.strerror(err) in msg
    assert "last checkpoint is intact" in msg and "run the same command again" in msg
    # The last good checkpoint is there, whole, from epoch 1; no temporary file was left behind.
    ckpt = load_checkpoint(path)
    assert ckpt.info["iteration"] == IPE
    assert all(torch.isfinite(v).all() for v in ckpt.model_state.values())
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.safetensors"]
    # Space is back: the same call resumes and ends with exactly the uninterrupted weights.
    resumed = _train(path)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


# -- through the command line -----------------------------------------------------------------------------
TRAIN = ["train", *fk.SYNTH, "--epochs", "3"]


def _cli(args, capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("lottery: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@contextmanager
def read_only(root: Path, monkeypatch):
    """``root`` and everything below it read-only: chmod where that works, else a simulated EROFS."""
    root = Path(root)
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    for p, mode in modes.items():
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    probe = root / ".probe"
    try:
        probe.touch()
        real = False  # root: permissions are not enforced
        probe.unlink()
        for p, mode in modes.items():
            p.chmod(mode)
    except PermissionError:
        real = True
    if real:
        try:
            yield "chmod"
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return

    top = str(root.resolve())

    def under(p) -> bool:
        if not isinstance(p, (str, bytes, os.PathLike)):
            return False
        q = os.path.realpath(os.fsdecode(p))
        return q == top or q.startswith(top + os.sep)

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p))

    real_open, real_mkdir = os.open, os.mkdir
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def fake_open(p, flags, *a, **kw):  # as Linux does: EEXIST before EROFS for O_CREAT|O_EXCL
        if flags & writes and under(p):
            if flags & os.O_CREAT and flags & os.O_EXCL and os.path.lexists(p):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(p))
            refuse(p)
        return real_open(p, flags, *a, **kw)

    def fake_mkdir(p, *a, **kw):
        if under(p):
            if os.path.lexists(p):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(p))
            refuse(p)
        return real_mkdir(p, *a, **kw)

    def guard(real_fn):
        def fn(*args, **kw):
            if any(under(a) for a in args[:2]):
                refuse(args[0])
            return real_fn(*args, **kw)
        return fn

    with monkeypatch.context() as m:
        m.setattr(os, "open", fake_open)
        m.setattr(os, "mkdir", fake_mkdir)
        for name in ("unlink", "remove", "rmdir", "replace", "rename"):
            m.setattr(os, name, guard(getattr(os, name)))
        yield "simulated EROFS (running as root: chmod is not enforced)"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_disk_full_then_read_only_then_resume(tmp_path, monkeypatch, capsys):
    """A run stops on a full disk, is restarted on a read-only folder, then resumed: one clear line each
    time, the epoch-1 checkpoint untouched throughout, and the end result equals an uninterrupted run."""
    code, _, err = _cli([*TRAIN, "--out", str(tmp_path / "ref")], capsys)
    assert code == 0, err
    out = tmp_path / "runs"

    with monkeypatch.context() as m:
        DiskFault(m, "write", errno.ENOSPC, nth=2)
        code, _, err = _cli([*TRAIN, "--out", str(out)], capsys)
    assert code == 2
    line = _error_line(err)
    assert "cannot write" in line and "checkpoint.safetensors" in line and "No space left on device" in line
    assert "free some disk space" in line
    folder = fk.one_folder(out, "train_")
    assert load_checkpoint(folder / "checkpoint.safetensors").info["iteration"] == 8  # 250 samples / 32
    fk.check_files_whole(out)
    before = _snapshot(out)

    with read_only(out, monkeypatch) as how:
        code, _, err = _cli([*TRAIN, "--out", str(out)], capsys)
    assert code == 2, how
    line = _error_line(err)
    assert ("Read-only file system" in line or "Permission denied" in line), line
    assert "make the folder writable" in line, line
    assert _snapshot(out) == before  # nothing was changed, the checkpoint included

    code, stdout, err = _cli([*TRAIN, "--out", str(out)], capsys)
    assert code == 0, err
    assert "resumed from" in stdout + err
    ref = fk.one_folder(tmp_path / "ref", "train_")
    assert fk.tensors_equal(ref / "model.safetensors", folder / "model.safetensors") == []


def test_cli_out_on_a_read_only_or_invalid_place(tmp_path, monkeypatch, capsys):
    """``--out`` that cannot be created: below a read-only folder, or where a file is."""
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent, monkeypatch):
        code, _, err = _cli([*TRAIN, "--out", str(parent / "runs")], capsys)
    assert code == 2
    line = _error_line(err)
    assert "cannot write" in line and str(parent / "runs") in line
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    code, _, err = _cli([*TRAIN, "--out", str(a_file)], capsys)
    assert code == 2
    line = _error_line(err)
    assert "cannot write" in line and str(a_file) in line
