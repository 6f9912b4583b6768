"""Where sweep jobs run: in this process, on a local pool of spawned processes, or on a Ray cluster."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lottery.errors import LotteryError
from lottery.sweep.kinds import JobKind
from lottery.sweep.spec import JobSpec, run_job

BACKENDS = ("local", "ray", "serial")


# -- running one job inside a worker ----------------------------------------------------------------
_LOG_QUEUE: Any = None  # set in each local worker: log lines go back to the parent, which owns the bar


def _init_local_worker(threads: int, log_queue: Any) -> None:
    global _LOG_QUEUE
    # Ctrl-C is the parent's to handle (it stops the pool and prints one line); a worker that took it too
    # would print its own traceback. Workers started by _LocalBackend already ignore it from birth
    # (_no_sigint); this covers a pool started elsewhere.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _LOG_QUEUE = log_queue
    # Never block this process's exit on flushing log lines (a parent that stopped reading, or a queue
    # left locked by a worker that was killed mid-write, would otherwise hang it).
    log_queue.cancel_join_thread()
    import multiprocessing

    # Spawned by the sweep: it is this process's parent (a forkserver's children have the server for theirs).
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid == os.getppid():
        threading.Thread(target=_exit_with_parent, args=(parent.pid,), name="lottery-parent-watch", daemon=True).start()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran: harmless
        pass


def _exit_with_parent(parent: int, poll: float = 0.2) -> None:
    """End this worker as soon as the sweep that started it is gone (its parent changed: killed, crashed).

    Why: a pool worker whose sweep was SIGKILLed finished its job, then waited for the next one forever (its
    pool's queue never closes: the workers hold its other end), an orphan holding its memory and the
    sweep's output pipe; and while it still ran a job, the sweep started again found that run folder locked
    (a job that does not wait for a lock failed). Ending at once, as a killed process, is safe: writes are atomic, the folder's lock
    goes with the process, and the job resumes from its last checkpoint when the sweep runs again."""
    while os.getppid() == parent:
        time.sleep(poll)
    try:
        sys.stderr.write(f"lottery sweep worker {os.getpid()}: its sweep (process {parent}) is gone; stopping "
                         "(run the sweep again to resume its jobs)\n")
        sys.stderr.flush()
    finally:
        os._exit(1)


def _emit(line: str) -> None:
    if _LOG_QUEUE is not None:
        _LOG_QUEUE.put(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _options_state(options) -> dict[str, Any]:
    from lottery.models.plugins import imported_model_modules

    return {"out": str(Path(options.out).resolve()), "data_dir": options.data_dir, "device": options.device,
            "download": options.download, "strict": options.strict, "tensorboard": options.tensorboard,
            # the user's own models (--import) must be registered in every worker too
            "imports": imported_model_modules(), "cwd": os.getcwd()}


@dataclass(frozen=True)
class JobTask:
    """One sweep job as a backend runs it: frozen and picklable, so it goes to a spawned worker or a Ray task
    as it is. A task is called with the worker's ``RunOptions`` and returns what the sweep records as the
    job's results (:class:`lottery.sweep.stacks.StackTask` is the other kind of task: a stack of jobs)."""

    kind: JobKind
    spec: JobSpec

    def __call__(self, options) -> dict[str, Any]:
        results = run_job(self.spec, options, self.kind)
        if not isinstance(results, dict):
            raise LotteryError(f"job kind {self.kind.name!r} returned {type(results).__name__}, not a results dict")
        return results


def _execute(task: Callable[[Any], Any], opts: dict[str, Any], label: str, log: Callable[[str], None],
             threads: int | None = None) -> dict[str, Any]:
    """Run one task (a :class:`JobTask`, a stack); never raises: returns ``{"ok": True, "results": ...}`` or
    the error and traceback."""
    from lottery.experiment import RunOptions

    start = time.perf_counter()
    try:
        if opts.get("imports"):
            from lottery.models.plugins import import_model_modules

            if opts.get("cwd") and opts["cwd"] not in sys.path:
                sys.path.insert(0, opts["cwd"])
            import_model_modules(opts["imports"])
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        options = RunOptions(out=Path(opts["out"]), data_dir=opts["data_dir"], device=opts["device"],
                             progress=False, download=opts["download"], log=lambda line: log(f"[{label}] {line}"),
                             strict=bool(opts.get("strict", False)), tensorboard=bool(opts.get("tensorboard", False)))
        results = task(options)
        return {"ok": True, "results": results, "seconds": time.perf_counter() - start}
    except BaseException as e:  # a crashed experiment (even sys.exit) is reported, never stops the sweep
        if isinstance(e, KeyboardInterrupt):
            raise
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                "seconds": time.perf_counter() - start}


def _local_task(task: Callable[[Any], Any], opts: dict[str, Any], label: str) -> dict[str, Any]:
    return _execute(task, opts, label, _emit)


def _ray_task(task: Callable[[Any], Any], opts: dict[str, Any], label: str, threads: int) -> dict[str, Any]:
    # Ray reuses its worker processes for other tasks, so the thread count is set per task.
    return _execute(task, opts, label, _emit, threads=threads)


# -- backends --------------------------------------------------------------------------------------
class _SerialBackend:
    """Runs each job in this process, one at a time (debugging, and the reference in tests)."""

    def __init__(self, threads: int, log: Callable[[str], None]):
        self.threads, self.log, self.done = threads, log, []

    def submit(self, item: Any, task: Callable[[Any], Any], opts: dict[str, Any]) -> Any:
        import torch

        before = torch.get_num_threads()
        try:
            self.done.append((item, _execute(task, opts, item.label, self.log, self.threads)))
        finally:
            torch.set_num_threads(before)
        return item

    def wait(self) -> list[tuple[Any, dict[str, Any]]]:
        done, self.done = self.done, []
        return done

    def close(self, cancel: bool = False) -> None:
        pass


@contextlib.contextmanager
def _no_sigint():
    """Ignore SIGINT while worker processes are started: a spawned child inherits the ignored disposition
    (and Python keeps it), so a Ctrl-C that reaches the whole process group, as a terminal's does, stops
    only the parent, even while a worker is still starting (importing torch). Only the main thread may
    change signal handlers; elsewhere this does nothing, and the worker's initialiser ignores SIGINT."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _LocalBackend:
    """A spawn-context process pool; a pool whose worker died is replaced before the next submit."""

    def __init__(self, workers: int, threads: int, log: Callable[[str], None]):
        import multiprocessing

        self.workers, self.threads = workers, threads
        self.ctx = multiprocessing.get_context("spawn")
        self.log = log
        self.pool = None
        self.queue: Any = None
        self.drain: threading.Thread | None = None
        self.futures: dict[Any, Any] = {}

    def _drain(self, queue) -> None:
        while True:
            try:
                line = queue.get()
            except (EOFError, OSError, ValueError):
                return
            if line is None:
                return
            self.log(line)

    def _pool(self):
        from concurrent.futures import ProcessPoolExecutor

        if self.pool is None:
            # A fresh log queue per pool: a worker killed while writing may leave the old one locked.
            self._stop_drain()
            self.queue = self.ctx.Queue()
            self.drain = threading.Thread(target=self._drain, args=(self.queue,), daemon=True)
            self.drain.start()
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=self.ctx,
                                            initializer=_init_local_worker, initargs=(self.threads, self.queue))
        return self.pool

    def _stop_drain(self) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put(None)
            self.drain.join(timeout=5)  # type: ignore[union-attr]
            self.queue.close()
            self.queue.cancel_join_thread()
        except (OSError, ValueError):
            pass
        self.queue = self.drain = None

    def submit(self, item: Any, task: Callable[[Any], Any], opts: dict[str, Any]) -> Any:
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        with _no_sigint():  # the pool starts its worker processes here, on demand
            try:
                fut = self._pool().submit(_local_task, task, opts, item.label)
            except BrokenProcessPool as e:
                # A worker died after the last wait() and before this submit, so the pool takes no more jobs.
                # The job goes back as one of the broken pool's (wait() reports it at once, as crashed, and
                # replaces the pool), instead of the exception ending the whole sweep.
                fut = Future()
                fut.set_exception(e)
        self.futures[fut] = item
        return fut

    def wait(self) -> list[tuple[Any, dict[str, Any]]]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as futures_wait
        from concurrent.futures.process import BrokenProcessPool

        done, _ = futures_wait(list(self.futures), return_when=FIRST_COMPLETED)
        out = []
        broken = False
        for fut in done:
            item = self.futures.pop(fut)
            try:
                out.append((item, fut.result()))
            except BrokenProcessPool:
                broken = True
                out.append((item, {"ok": False, "crashed": True, "seconds": 0.0,
                                    "error": "its worker process died (killed, out of memory, or a crash in native code)"}))
            except Exception as e:  # e.g. an unpicklable argument
                out.append((item, {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": 0.0,
                                    "traceback": traceback.format_exc()}))
        if broken:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        return out

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            # Cancelled (Ctrl-C): the workers ignore SIGINT and would finish their jobs (and this process would
            # wait for them at exit), so they are terminated; every job resumes from its last checkpoint.
            workers = list((getattr(self.pool, "_processes", None) or {}).values()) if cancel else []
            self.pool.shutdown(wait=not cancel, cancel_futures=True)
            for p in workers:
                p.terminate()
            for p in workers:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=10)
            self.pool = None
        self._stop_drain()


_RAY_CHECK = ("check that `ray start --head` is running there (`ray status` on that node), that HOST:PORT is its "
              "GCS address (port 6379 unless --port said otherwise; ray://HOST:10001 from outside the cluster) and "
              "that no firewall blocks the port")


def probe_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail at once, in one line, when nothing listens at ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``).

    Why: ``ray.init(address=...)`` with no cluster there retries for about 20 s, then raises a long traceback.
    ``auto`` and other forms without a port are left to Ray."""
    import socket

    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    host = host.strip("[]")  # [::1]:6379
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or type(e).__name__)
        raise LotteryError(f"no Ray cluster answers at --ray-address {address} ({reason}); {_RAY_CHECK}") from None


def import_ray():
    try:
        import ray
    except ImportError:
        raise LotteryError(
            "the Ray backend needs Ray: pip install 'lottery[ray]' (or pip install 'ray>=2.9')"
        ) from None
    return ray


# -- Ray's log, as a person reads it -----------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# Ray's prefix of a relayed worker line: "(task name pid=123)" or "(pid=123, ip=10.0.0.2)".
_RAY_PREFIX = re.compile(r"^\((?P<name>[^()]*?)\s*pid=[^,)\s]+(?:, ip=[^)]*)?\)\s?")
# Ray's deduplication note after a line, with its explanation the first time.
_RAY_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\](?: \(Ray deduplicates logs by default\..*\))?")
#: Ray's notices about itself, not about the sweep's jobs: left out of the log.
RAY_NOISE = (
    "Token authentication is enabled for this Ray cluster",
    "Started a local Ray instance",
    "View the dashboard at",
    "Tip: use `ray status`",
)


def clean_ray_line(line: str) -> str | None:
    """One line of Ray's log as a person reads it, or None for Ray's notices about itself (:data:`RAY_NOISE`).

    No ANSI colour codes, no "[repeated 2x across cluster] (Ray deduplicates ...)", and one prefix: the job's ``[label]`` that
    the task wrote, not Ray's ``(label pid=123)`` before it; a line without a label of its own (a
    warning a library printed in the task) gets Ray's task name as its label.
    """
    text = _RAY_REPEATED.sub("", _ANSI.sub("", line)).rstrip()
    if not text.strip() or any(noise in text for noise in RAY_NOISE):
        return None
    prefix = _RAY_PREFIX.match(text)
    if prefix:
        text = text[prefix.end():]
        name = prefix.group("name").strip()
        if name and not text.startswith("["):
            text = f"[{name}] {text}"
    return text


class _RayNoiseFilter:
    """A logging filter that drops Ray's notices about itself (the token-authentication warning of ray.init)."""

    @staticmethod
    def filter(record) -> bool:
        return clean_ray_line(record.getMessage()) is not None


@contextlib.contextmanager
def _quiet_ray_init():
    import logging

    loggers = [logging.getLogger(name) for name in ("ray", "ray._private.authentication.authentication_token_setup")]
    targets = [*loggers, *(h for lg in loggers for h in lg.handlers)]
    for t in targets:
        t.addFilter(_RayNoiseFilter)
    try:
        yield
    finally:
        for t in targets:
            t.removeFilter(_RayNoiseFilter)


class _RayBackend:
    """One ``ray.remote`` task per job, with its CPU/GPU request; results gathered with ``ray.wait``.

    A Ray this backend starts (or joins) relays the tasks' log lines to ``log`` cleaned (:func:`clean_ray_line`),
    all of them (Ray's deduplication would drop the second job's "epoch 1/1" line); a Ray the caller
    initialised is used as it is, its log included.
    """

    _HANDLER = "lottery_sweep_log"

    def __init__(self, address: str | None, num_cpus: float, num_gpus: float, threads: int, log):
        ray = import_ray()
        self.ray = ray
        self.started = False
        self.relaying = False
        self.log = log
        if not ray.is_initialized():
            import logging

            if address:
                probe_ray_address(address)
            with _quiet_ray_init():
                try:
                    if address:
                        ray.init(address=address, logging_level=logging.WARNING)
                    else:
                        ray.init(include_dashboard=False, logging_level=logging.WARNING)
                except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
                    where = f"the Ray cluster at {address}" if address else "a local Ray"
                    raise LotteryError(f"could not start or join {where}: {type(e).__name__}: {one_line(e)[:300]}"
                                       + (f"; {_RAY_CHECK}" if address else "")) from None
            self.started = True
            self._relay_worker_logs()
        self.remote = ray.remote(_ray_task)
        resources = ray.cluster_resources()
        self.info = {"cluster_cpus": resources.get("CPU", 0.0), "cluster_gpus": resources.get("GPU", 0.0),
                     "nodes": len(ray.nodes())}
        self.num_cpus, self.num_gpus, self.threads = num_cpus, num_gpus, threads
        self.refs: dict[Any, Any] = {}

    def _relay_worker_logs(self) -> None:
        """Take the tasks' lines from Ray's dispatcher instead of Ray's printer (which colours, prefixes and
        deduplicates them); with a Ray without that dispatcher, Ray prints them itself."""
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        if "ray_print_logs" not in [name for name, _ in getattr(dispatcher, "handlers", [])]:
            return  # log_to_driver is off: nothing to relay
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler(self._HANDLER, self._on_worker_lines)
        self.dispatcher, self.relaying = dispatcher, True
        self.last_line = time.monotonic()

    def _on_worker_lines(self, data: dict[str, Any]) -> None:
        try:
            if data.get("pid") == "autoscaler":
                return
            source = data.get("task_name") or data.get("actor_name")
            for line in data.get("lines", []):
                text = clean_ray_line(line)
                if text is None:
                    continue
                if data.get("pid") == "raylet":
                    text = f"ray: {text}"
                elif source and not text.startswith("["):
                    text = f"[{source}] {text}"
                self.log(text)
            self.last_line = time.monotonic()
        except Exception:  # never break Ray's log thread over one line
            pass

    def submit(self, item: Any, task: Callable[[Any], Any], opts: dict[str, Any]) -> Any:
        ref = self.remote.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=1,
                                  name=item.label[:100]).remote(task, opts, item.label, self.threads)
        self.refs[ref] = item
        return ref

    def wait(self) -> list[tuple[Any, dict[str, Any]]]:
        ready, _ = self.ray.wait(list(self.refs), num_returns=1)
        out = []
        for ref in ready:
            item = self.refs.pop(ref)
            try:
                out.append((item, self.ray.get(ref)))
            except Exception as e:  # the task's worker died, or its result could not be fetched
                out.append((item, {"ok": False, "seconds": 0.0, "error": f"{type(e).__name__}: {one_line(e)}",
                                    "traceback": traceback.format_exc()}))
        return out

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self.refs:
                try:
                    self.ray.cancel(ref)
                except Exception:
                    pass
        if self.relaying:
            # A task's last lines reach this process after its result: wait until no line came for half a
            # second (2 s at most).
            start = time.monotonic()
            while (not cancel and time.monotonic() < start + 2.0
                   and time.monotonic() - max(self.last_line, start) < 0.5):
                time.sleep(0.05)
            self.dispatcher.remove_handler(self._HANDLER)
            self.relaying = False
        if self.started:
            self.ray.shutdown()


def one_line(e: Any) -> str:
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())[:2000]
