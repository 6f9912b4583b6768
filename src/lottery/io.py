"""Atomic file writes: a reader never sees a half-written file, even if the process is killed.

Everything is written to a temporary file in the same folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX). Tensors go to safetensors, everything else to JSON, so
loading never runs code.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save as st_save_bytes

from lottery.errors import CheckpointError, StorageError


_UMASK_LOCK = threading.Lock()


def new_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask (``0o666 & ~umask``).

    Why: ``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, so every file renamed
    into place from it would be private to its owner, and colleagues sharing a run folder could not read
    it. The umask can only be read by setting it, hence the lock."""
    with _UMASK_LOCK:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def temp_file_beside(path: Path, suffix: str) -> tuple[int, str]:
    """``mkstemp`` beside ``path``, given the mode a new file would get (:func:`new_file_mode`)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
    except OSError:  # a file system without modes (some network mounts): keep mkstemp's
        pass
    return fd, tmp


def _is_main_rank() -> bool:
    """Rank 0 of the process group, or no process group. Read from torch.distributed directly (not from
    lottery.distributed, a higher layer), so a file written under torchrun is written once."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically. Under data-parallel training only rank 0 writes (every
    rank holds the same state), so callers need no rank checks of their own."""
    if not _is_main_rank():
        return
    path = Path(path)
    # Fault injection for the crash tests (tests/reliability): one dict lookup when the variable is unset.
    kill_at = _fault_phase(path) if FAULT_ENV in os.environ else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_beside(path, ".tmp")
    except OSError as e:
        raise storage_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if kill_at == "mid":
                f.write(data[: len(data) // 2])
                f.flush()
                _fault_kill(path, kill_at)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if kill_at == "before-rename":
            _fault_kill(path, kill_at)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise storage_error(path, e) from None
        raise
    if kill_at == "after-rename":
        _fault_kill(path, kill_at)


def remove_if_exists(path: str | os.PathLike) -> None:
    """Delete a file that may already be gone (a stage's checkpoint once its outputs are written; a run
    killed between the two leaves it behind, and the next run removes it)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """``fig.savefig(path)`` atomically (format from the suffix): a run killed while plotting leaves the
    previous plot or none, never a truncated image."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or None, **savefig_kwargs)
    atomic_write_bytes(path, buf.getvalue())


def storage_error(path: str | os.PathLike, e: OSError) -> StorageError:
    """A one-line ``StorageError`` for a failed write of ``path`` (disk full, read-only, no permission)."""
    if isinstance(e, StorageError):
        return e
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some disk space (or use another --out)"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "make the folder writable (or use another --out)"
    else:
        fix = "fix the folder (or use another --out)"
    err = StorageError(
        f"cannot write {path}: {reason}. Nothing already written was replaced (the last checkpoint is "
        f"intact); {fix}, then run the same command again to resume"
    )
    err.errno = e.errno  # (strerror and filename left unset: OSError.__str__ would replace the message)
    return err


# -- fault injection ---------------------------------------------------------------------------------
#: ``LOTTERY_FAULT_KILL_AT_WRITE=N[:PHASE[:SUBSTRING]]`` makes the process SIGKILL itself during its Nth
#: atomic write (counting only paths that contain SUBSTRING, when given). PHASE: ``mid`` (half the bytes
#: are in the temporary file), ``before-rename`` (the temporary file is complete, the target untouched;
#: the default) or ``after-rename`` (the target is complete, nothing after it ran). N = 0 only counts.
FAULT_ENV = "LOTTERY_FAULT_KILL_AT_WRITE"
FAULT_PHASES = ("mid", "before-rename", "after-rename")
fault_writes: list[str] = []  # the paths counted so far in this process (only while FAULT_ENV is set)


def _fault_phase(path: Path) -> str | None:
    spec = os.environ.get(FAULT_ENV, "")
    parts = spec.split(":", 2)
    try:
        n = int(parts[0])
    except ValueError:
        return None
    phase = parts[1] if len(parts) > 1 and parts[1] else "before-rename"
    if phase not in FAULT_PHASES:
        raise ValueError(f"{FAULT_ENV}: unknown phase {phase!r}; use one of {', '.join(FAULT_PHASES)}")
    if len(parts) > 2 and parts[2] not in str(path):
        return None
    fault_writes.append(str(path))
    return phase if len(fault_writes) == n else None


def fault_phase(path: str | os.PathLike) -> str | None:
    """For a writer that cannot go through :func:`atomic_write_bytes` (a library writes the file: TorchScript,
    ONNX): the phase at which :data:`FAULT_ENV` kills this write of ``path``, or None; the write is counted
    like the others. The writer then calls :func:`fault_kill` at that phase."""
    return _fault_phase(Path(path)) if FAULT_ENV in os.environ else None


def fault_kill(path: str | os.PathLike, phase: str) -> None:
    """SIGKILL this process at ``phase`` of its write of ``path`` (after :func:`fault_phase` named that phase)."""
    _fault_kill(Path(path), phase)


def _fault_kill(path: Path, phase: str) -> None:
    _fault_sigkill(f"write {len(fault_writes)} ({phase}) of {path}")


def _fault_sigkill(where: str) -> None:
    import signal
    import sys

    sys.stderr.write(f"lottery fault injection: SIGKILL at {where}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


#: ``LOTTERY_FAULT_KILL_AT_STEP=N[:KIND]`` makes the process SIGKILL itself at a moment that is not a write:
#: right after its Nth training step (KIND ``train``, the default: mid-epoch, nothing saved since the last
#: checkpoint) or during its Nth evaluation batch (``eval``: mid-evaluation), counted over every trainer
#: and evaluation of the process. N = 0 only counts. Deterministic, unlike a kill on a timer.
FAULT_STEP_ENV = "LOTTERY_FAULT_KILL_AT_STEP"
fault_steps = {"train": 0, "eval": 0}  # counted so far in this process (only while FAULT_STEP_ENV is set)


def fault_step(kind: str) -> None:
    """Count one training step or evaluation batch; SIGKILL this process if it is the one the variable names.
    Callers check ``FAULT_STEP_ENV in os.environ`` first (one dict lookup when it is unset)."""
    fault_steps[kind] += 1
    n, _, want = os.environ.get(FAULT_STEP_ENV, "").partition(":")
    if want not in ("", "train", "eval"):
        raise ValueError(f"{FAULT_STEP_ENV}: unknown kind {want!r}; use train or eval")
    if (want or "train") == kind and n.isdigit() and fault_steps[kind] == int(n):
        _fault_sigkill(f"{kind} step {n}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN/Infinity; write them as null rather than producing invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(_finite_or_none(obj), indent=2, sort_keys=True, default=_json_default)
    atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save a name -> tensor mapping as safetensors, atomically."""
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save_bytes(plain, metadata=dict(metadata) if metadata else None))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (never unpickles); a missing, truncated or foreign file is a
    ``CheckpointError`` naming it, not a deserialisation traceback."""
    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; run the command that made its run folder again to "
                              "rebuild it") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is unreadable or not a safetensors file ({e}); delete it and run the "
                              "command that made it again to rebuild it") from None


def safetensors_problem(path: str | os.PathLike, size: int | None = None) -> str | None:
    """Why a safetensors file cannot be used (missing, another size than when it was written, a header
    that does not parse), or None when it looks whole. Reads only the header."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        return "missing"
    actual = p.stat().st_size
    if size is not None and actual != size:
        return f"{actual} bytes, {size} when it was written"
    try:
        with safe_open(str(p), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        return f"unreadable: {e}"
    return None


def relocated_path(stored: str, stored_self: str | None, here: Path) -> str:
    """Where a folder that a results.json names (``dense_run_dir``, ``source_run``) is now.

    Runs store paths as they were given when the run started (often relative to that working folder), so
    they are read from where the results.json was found: the stored path's position relative to the
    results' own stored folder, applied to ``here``. The stored path itself is the fallback, when it exists.
    """
    candidates = []
    if stored_self and Path(stored).is_absolute() == Path(stored_self).is_absolute():
        candidates.append(Path(os.path.normpath(here / os.path.relpath(stored, stored_self))))
    candidates.append(Path(stored))
    for c in candidates:
        if c.exists():
            return str(c)
    return stored
