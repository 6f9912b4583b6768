"""Shared helpers of the reliability tests: run the CLI in killable processes, check run folders.

Imported by the test modules of this folder as a plain module (pytest puts this folder on ``sys.path``
for its rootdir-less test files; a ``conftest.py`` here would shadow ``tests/conftest.py``).

Killing a run at many moments needs many process starts; importing torch (and the torch._dynamo that
the optimizers pull in) and matplotlib costs ~6 s per start on a busy machine. :class:`CLIProcesses`
therefore forks every run from a *forkserver* that imported them once: each run is still a separate
process, started by ``fork`` (milliseconds), running ``lottery.cli.main`` exactly as ``python -m lottery``
does, and SIGKILL ends it like any other process.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

SYNTH = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-train-size", "300",
         "--synthetic-test-size", "100", "--val-size", "50", "--batch-size", "32", "--threads", "1",
         "--no-progress"]

PRELOAD = ["torch", "torch._dynamo", "numpy", "safetensors.torch", "matplotlib", "matplotlib.pyplot",
           "lottery.cli", "lottery.pipelines.cs", "lottery.pipelines.imp", "lottery.report", "faultkit"]


# -- processes --------------------------------------------------------------------------------------------
def _child(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """The body of a forked run: output to ``log_path``, ``env`` added, then the CLI's ``main``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
    os.environ.update(env)
    import threading

    from tqdm import tqdm

    # tqdm.write would otherwise create a multiprocessing lock (a named semaphore) that a killed process
    # never releases; a thread lock does the same job within one process.
    tqdm.set_lock(threading.RLock())
    from lottery import cli, io as lio

    lio.fault_writes.clear()
    lio.fault_steps.update(train=0, eval=0)
    code = 1
    try:
        code = int(cli.main(argv) or 0)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - reported through the log and the exit code
        import traceback

        traceback.print_exc()
        code = 99
    finally:
        if "LOTTERY_FAULT_REPORT" in env:  # the writes and steps this run counted (N=0: count only)
            Path(env["LOTTERY_FAULT_REPORT"]).write_text(json.dumps({"writes": lio.fault_writes,
                                                                      "steps": lio.fault_steps}))
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


@dataclass
class Outcome:
    argv: list[str]
    exitcode: int | None  # -9: killed by SIGKILL (by us, or by itself: the write or step fault hook)
    seconds: float
    log: str
    killed_by: str  # "timer", "condition", "fault" (it killed itself: a write or step hook), "" (ran to its end)
    first_output: float | None = None  # seconds from the start to its first output
    children: list[int] = field(default_factory=list)  # pids of the processes it started (watch_children)

    @property
    def killed(self) -> bool:
        return self.exitcode == -signal.SIGKILL


class CLIProcesses:
    """Start ``lottery`` runs as forked processes of a preloaded forkserver; kill them at will."""

    def __init__(self, logs: Path):
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.count = 0
        # The forkserver inherits this process's environment when it starts: no GUI backend, one thread.
        os.environ.setdefault("MPLBACKEND", "Agg")
        os.environ.setdefault("OMP_NUM_THREADS", "1")

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, kill_after: float | None = None,
            kill_after_output: float | None = None, kill_when: Callable[[str], bool] | None = None,
            timeout: float = 240.0, watch_children: bool = False) -> Outcome:
        """Run to the end, or SIGKILL it ``kill_after`` seconds after the start, or ``kill_after_output``
        seconds after it first printed something (its work has begun: start-up is over), or as soon as
        ``kill_when(its output so far)`` is true (asked whenever the output grew), if still running. Only this
        process is killed: processes it started (a sweep's workers) live on. ``watch_children``: note the
        processes it starts (every 250 ms, and when it is killed) in ``Outcome.children``, for
        :func:`still_running`."""
        self.count += 1
        log_path = self.logs / f"run_{self.count:03d}.log"
        p = self.ctx.Process(target=_child, args=(list(argv), dict(env or {}), str(log_path)))
        t0 = time.perf_counter()
        p.start()
        kill_at = t0 + kill_after if kill_after is not None else None
        first_output = None
        killed_by = ""
        seen = 0
        children: dict[int, None] = {}
        next_look = 0.0
        while True:
            p.join(0.005)
            now = time.perf_counter()
            if p.exitcode is not None:
                break
            if watch_children and now >= next_look:
                children.update(dict.fromkeys(children_of(p.pid)))
                next_look = now + 0.25
            if first_output is None and log_path.exists() and log_path.stat().st_size > 0:
                first_output = now - t0
                if kill_after_output is not None:
                    kill_at = now + kill_after_output
            fire = kill_at is not None and now >= kill_at
            if not fire and kill_when is not None and log_path.exists() and log_path.stat().st_size > seen:
                text = log_path.read_text(errors="replace")
                seen = len(text.encode(errors="replace"))
                fire = kill_when(text)
            if fire:
                if watch_children:
                    children.update(dict.fromkeys(children_of(p.pid)))
                os.kill(p.pid, signal.SIGKILL)
                killed_by = "condition" if kill_when is not None else "timer"
                p.join()
                break
            if now - t0 > timeout:
                p.kill()
                p.join()
                raise AssertionError(f"lottery {' '.join(argv)} did not finish in {timeout} s; log {log_path}")
        seconds = time.perf_counter() - t0
        log = log_path.read_text() if log_path.exists() else ""
        if p.exitcode == -signal.SIGKILL and not killed_by:
            killed_by = "fault"
        return Outcome(list(argv), p.exitcode, seconds, log, killed_by, first_output, list(children))


def children_of(pid: int) -> list[int]:
    """The pids of the running processes whose parent is ``pid`` (Linux: /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its last ')'
        if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def still_running(pids: Sequence[int], within: float) -> list[int]:
    """Those of ``pids`` still running (not zombies) ``within`` seconds from now; waits until none is."""
    deadline = time.perf_counter() + within
    while True:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat[stat.rindex(b")") + 2:].split()[0] != b"Z":
                alive.append(pid)
        if not alive or time.perf_counter() >= deadline:
            return alive
        time.sleep(0.05)


def start_cli_subprocess(argv: Sequence[str], cwd: Path) -> subprocess.Popen:
    """``python -m lottery ...`` as a real, separately started interpreter (for the reference runs)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    env.pop("LOTTERY_FAULT_KILL_AT_WRITE", None)
    env.pop("LOTTERY_FAULT_KILL_AT_STEP", None)
    return subprocess.Popen([sys.executable, "-m", "lottery", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


# -- run folders --------------------------------------------------------------------------------------------
def is_temp(path: Path) -> bool:
    """A temporary file of ``lottery.io.atomic_write_bytes`` (``.<name>.<random>.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def check_files_whole(root: Path, context: str = "") -> dict[str, int]:
    """Every file a run left under ``root`` that a reader could take for a result must be whole.

    JSON parses, safetensors files load completely, CSV rows all have the header's width, PNGs are
    complete images. Temporary files of interrupted atomic writes are allowed (they are never read)
    and counted. Returns counts per kind; raises AssertionError naming the first broken file.
    """
    from PIL import Image
    from safetensors.torch import load_file

    counts = {"json": 0, "safetensors": 0, "csv": 0, "png": 0, "tmp": 0, "other": 0}
    # os.walk, not rglob: processes of the killed run may still be ending (a Ray task outlives its driver
    # for a moment) and remove a folder they had just made; a folder or file that is gone is not broken.
    paths = sorted(Path(d) / f for d, _, files in os.walk(root) for f in files)
    for path in paths:
        if not path.is_file():
            continue
        if is_temp(path):
            counts["tmp"] += 1
            continue
        kind = path.suffix.lstrip(".")
        try:
            if kind == "json":
                json.loads(path.read_bytes())
            elif kind == "safetensors":
                load_file(str(path))
            elif kind == "csv":
                rows = list(csv.reader(io.StringIO(path.read_text())))
                assert rows, "empty"
                widths = {len(r) for r in rows}
                assert widths == {len(rows[0])}, f"ragged rows {sorted(widths)}"
            elif kind == "png":
                with Image.open(path) as im:
                    im.load()
            else:
                kind = "other"
        except Exception as e:  # noqa: BLE001
            if not path.exists():
                continue  # removed while being read (see above)
            raise AssertionError(f"{path} is not whole after a kill: {type(e).__name__}: {e}\n{context}") from None
        counts[kind] += 1
    return counts


def one_folder(root: Path, prefix: str) -> Path:
    found = [p for p in Path(root).iterdir() if p.name.startswith(prefix)]
    assert len(found) == 1, f"expected one {prefix}* folder in {root}, found {found}"
    return found[0]


def tensors_equal(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ (or exist in only one) between two safetensors files."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    diff = sorted(set(ta) ^ set(tb))
    diff += [k for k in sorted(set(ta) & set(tb)) if ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])]
    return diff


def metrics_without_time(path: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    return [{k: v for k, v in r.items() if "second" not in k and "time" not in k} for r in rows]


def _procs_fixture():
    import pytest

    @pytest.fixture(scope="module")
    def procs(tmp_path_factory):
        """One CLIProcesses per test module (a forkserver with lottery and torch imported once), shared by
        the SIGKILL test modules: ``from faultkit import procs``."""
        p = CLIProcesses(tmp_path_factory.mktemp("logs"))
        yield p
        import multiprocessing.forkserver as mf

        mf._forkserver._stop()

    return procs


procs = _procs_fixture()
