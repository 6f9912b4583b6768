"""Joining a Ray cluster: ``lottery sweep ... --backend ray --ray-address HOST:PORT``.

* No cluster at the address: one line naming the address and what to check, within seconds (Ray's own
  ``ray.init`` retried for ~20 s and then printed a 20-line traceback).
* A real cluster: a head started by the module's fixture on the loopback address (its own ports and temp
  folder, so it never touches another Ray on the machine), a small sweep joined to it through
  ``--ray-address``, one Ray worker SIGKILLed while it runs a job; Ray retries the task, the run folder
  resumes, and the results equal those of a local run.
* The same sweep with its own process (the Ray driver) SIGKILLed mid-job, run again at once (the killed
  driver's task may still be running) and a third time: the results equal a local run's, nothing lost or
  written twice. The fixture stops the processes of its head itself (never ``ray stop``, which would stop
  every Ray of this machine), also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import faultkit as fk  # noqa: E402

SWEEP = ["sweep", "train", *fk.SYNTH, "--synthetic-train-size", "8000", "--epochs", "4", "--seeds", "0,1",
         "--threads-per-worker", "1", "--no-report"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "RAY_USAGE_STATS_ENABLED": "0"}


def test_no_cluster_at_the_address_is_one_line_and_quick(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'lottery[ray]')")
    port = _free_port()  # bound and closed again: nothing listens there
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lottery", *SWEEP, "--backend", "ray", "--ray-address",
                           f"127.0.0.1:{port}", "--out", str(tmp_path)], capture_output=True, text=True, env=_env(),
                          timeout=120)
    seconds = time.perf_counter() - t0
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert f"127.0.0.1:{port}" in err and "ray start --head" in err and "ray status" in err, err
    # Interpreter and Ray imports included (seconds on a busy machine); Ray's retries alone took ~20 s.
    assert seconds < 15, f"{seconds:.1f} s to say there is no cluster"
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_malformed_address_is_left_to_ray_and_an_unreachable_one_named():
    from lottery.errors import LotteryError
    from lottery.sweep.backends import probe_ray_address

    probe_ray_address("auto")  # no port: Ray's own lookup
    port = _free_port()
    with pytest.raises(LotteryError, match=rf"no Ray cluster answers at --ray-address ray://127.0.0.1:{port} "):
        probe_ray_address(f"ray://127.0.0.1:{port}")
    with socket.socket() as s:  # something listening: the probe passes
        s.bind(("127.0.0.1", 0))
        s.listen()
        probe_ray_address(f"127.0.0.1:{s.getsockname()[1]}")


# -- a real cluster ------------------------------------------------------------------------------------
def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def _head_processes(temp_dir: str, port: int) -> set[int]:
    """The processes of the head started in ``temp_dir`` with its GCS on ``port``: those naming either (the
    client server names only the GCS address), and all their descendants."""
    procs = _procs()
    mine = {pid for pid, (_, cmd) in procs.items()
            if temp_dir in cmd or ("ray" in cmd and f":{port} " in cmd + " ")}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in mine and pid not in mine}
        mine |= more
        grew = bool(more)
    return mine


def _stop_head(temp_dir: str, port: int) -> None:
    for _ in range(3):
        pids = _head_processes(temp_dir, port)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.5)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not (k.endswith("_dir") or "wall" in k or "second" in k)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of this module's own: on the loopback address, its own ports, authentication token and temp
    folder; its processes stopped by the fixture (never ``ray stop``), also when a test fails."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("finds Ray's processes through /proc")
    pytest.importorskip("ray", reason="ray is not installed (pip install 'lottery[ray]')")
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray command is not installed")
    # A short temp folder (Ray's sockets live there; a Unix socket path has at most 107 characters).
    temp_dir = tempfile.mkdtemp(prefix="lt-ray-", dir="/tmp")
    port = _free_port()
    ports = [_free_port() for _ in range(7)]
    # Its own authentication token, in the environment of the head and of the sweep (never ~/.ray's).
    env = {**_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    head = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
            "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir,
            "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
            "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
            "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
            "--ray-client-server-port", str(ports[6])]
    try:
        started = subprocess.run(head, capture_output=True, text=True, env=env, timeout=180)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield {"address": f"127.0.0.1:{port}", "env": env, "temp_dir": temp_dir, "port": port}
    finally:
        _stop_head(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert _head_processes(temp_dir, port) == set()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> Path:
    """The sweep on the local pool: what every Ray run must end with."""
    out = tmp_path_factory.mktemp("local_reference")
    ref = subprocess.run([sys.executable, "-m", "lottery", *SWEEP, "--workers", "1", "--out", str(out)],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return out


def _ray_sweep(ray_head, out: Path) -> list[str]:
    return [sys.executable, "-m", "lottery", *SWEEP, "--backend", "ray", "--num-cpus", "1", "--ray-address",
            ray_head["address"], "--out", str(out)]


def _task_processes(ray_head, label: str = "") -> list[int]:
    """The Ray workers of the head that are running a sweep job now (one whose label contains ``label``)."""
    procs = _procs()
    return [pid for pid in _head_processes(ray_head["temp_dir"], ray_head["port"])
            if procs.get(pid, (0, ""))[1].startswith("ray::train") and label in procs[pid][1]]


def _equals_reference(ref_root: Path, out: Path) -> list[str]:
    """Assert the run folders of ``out`` are the reference's, result for result; their names."""
    ref_folders = sorted(p.name for p in ref_root.glob("train_*"))
    assert ref_folders == sorted(p.name for p in out.glob("train_*")) and len(ref_folders) == 2
    for name in ref_folders:
        a, b = ref_root / name, out / name
        assert _strip(json.loads((b / "results.json").read_text())) == _strip(json.loads((a / "results.json").read_text()))
        assert fk.tensors_equal(a / "model.safetensors", b / "model.safetensors") == []
        assert fk.metrics_without_time(b / "metrics.csv") == fk.metrics_without_time(a / "metrics.csv")
        assert not (b / "checkpoint.safetensors").exists()
    fk.check_files_whole(out)
    return ref_folders


@pytest.mark.slow
def test_sweep_joins_a_real_cluster_and_survives_a_killed_worker(ray_head, local_reference, tmp_path):
    out = tmp_path / "ray"
    log = open(tmp_path / "ray.log", "w")
    sweep = subprocess.Popen(_ray_sweep(ray_head, out), stdout=log, stderr=subprocess.STDOUT, env=ray_head["env"])
    try:
        # Kill the worker that runs a job once that job has written a checkpoint (work to resume from).
        killed = None
        deadline = time.time() + 240
        while killed is None:
            assert sweep.poll() is None, "the sweep ended before a worker was killed:\n" + (tmp_path / "ray.log").read_text()
            assert time.time() < deadline, "no job wrote a checkpoint:\n" + (tmp_path / "ray.log").read_text()
            saved = list(out.glob("train_*/checkpoint.safetensors"))
            if saved:
                # The task of that job (named by its label, ... seed=N): killing the other, still without a
                # checkpoint, would leave nothing to resume from.
                seed = re.search(r"_s(\d+)_[0-9a-f]+$", saved[0].parent.name).group(1)
                workers = _task_processes(ray_head, f"seed={seed}")
                if workers:
                    killed = workers[0]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        assert sweep.wait(300) == 0, (tmp_path / "ray.log").read_text()[-4000:]
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
        log.close()
    text = (tmp_path / "ray.log").read_text()
    # The killed job was retried by Ray, and its second attempt resumed from the checkpoint.
    resumed = text.count(": resumed from ")
    assert resumed >= 1, text[-3000:]

    record = json.loads(next(out.glob("sweep_*.json")).read_text())
    assert record["jobs_failed"] == 0 and record["ray"]["address"] == ray_head["address"], text[-3000:]
    jobs = _equals_reference(local_reference, out)
    print(json.dumps({"killed_worker": killed, "jobs": len(jobs), "restarted_from_checkpoint": resumed}))


@pytest.mark.slow
def test_a_killed_sweep_parent_is_resumed_by_the_same_command(ray_head, local_reference, tmp_path):
    """SIGKILL ``lottery sweep --backend ray`` itself (the Ray driver) while its jobs run on the cluster, run the
    same command again at once, then a third time. A task of the killed driver that still writes its run
    folder holds the folder's lock: the second run's task for it waits (a run that cannot wait must fail in one
    line); nothing is lost or written twice, and the third run finds every job done."""
    out = tmp_path / "ray"
    argv = _ray_sweep(ray_head, out)
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        first = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=ray_head["env"])
    try:
        deadline = time.time() + 240
        while not list(out.glob("train_*/checkpoint.safetensors")):  # a job is on the cluster, mid-training
            assert first.poll() is None, "the sweep ended before it was killed:\n" + first_log.read_text()
            assert time.time() < deadline, "no job wrote a checkpoint:\n" + first_log.read_text()
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    killed_at = time.perf_counter()
    orphans = _task_processes(ray_head)  # the killed driver's tasks, still running (for a while)
    ended: dict[int, float] = {}  # orphan -> seconds it lived after the kill

    def watch():
        while len(ended) < len(orphans) and time.perf_counter() - killed_at < 300:
            for pid in orphans:
                if pid not in ended and not Path(f"/proc/{pid}").exists():
                    ended[pid] = round(time.perf_counter() - killed_at, 2)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    fk.check_files_whole(out)

    # Here Ray ends a dead driver's tasks within a second, before the second run's tasks start. A task that
    # outlived its driver would still hold its run folder's lock: hold the lock of the job that has a
    # checkpoint, as that task would, while the second run starts. Its task for that job must wait (the other
    # job finishes meanwhile) and write nothing there until the lock is released.
    from filelock import FileLock

    held = next(out.glob("train_*/checkpoint.safetensors")).parent
    other = next(p for p in local_reference.glob("train_*") if p.name != held.name).name
    lock = FileLock(str(held / ".lock"))
    lock.acquire(timeout=60)
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in held.iterdir() if p.name != ".lock"}
    second_log = tmp_path / "second.log"
    second_started = time.perf_counter()
    try:
        with open(second_log, "w") as log:
            second = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=ray_head["env"])
        while not (out / other / "results.json").exists() and second.poll() is None:
            assert time.perf_counter() - second_started < 240, second_log.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(0.5)
        waited = second.poll() is None
        after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in held.iterdir() if p.name != ".lock"}
    finally:
        lock.release()
        if sys.exc_info()[0] is not None and second.poll() is None:
            second.kill()
            second.wait()
    assert after == before, "the second run wrote into a folder another writer held"
    second_rc = second.wait(300)
    second_out = second_log.read_text()
    assert waited or second_rc != 0, "the second run finished a job whose folder another writer held:\n" + second_out
    if second_rc != 0:  # allowed only as one clear line about the other writer
        assert "Traceback" not in second_out and "another process is already running" in second_out, second_out[-3000:]
    fk.check_files_whole(out)
    both = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "env": ray_head["env"], "timeout": 300}
    third = subprocess.run(argv, **both)
    assert third.returncode == 0 and "Traceback" not in third.stdout, third.stdout[-3000:]
    if second_rc == 0:
        assert third.stdout.count("already finished, reusing its results") == 2, third.stdout[-3000:]
    record = json.loads(next(out.glob("sweep_*.json")).read_text())
    assert record["jobs_failed"] == 0 and len(record["jobs"]) == 2, record
    jobs = _equals_reference(local_reference, out)
    assert _task_processes(ray_head) == []  # no task of any of the three runs is left running
    watcher.join(5)
    print(json.dumps({"jobs": len(jobs), "tasks_running_after_the_kill": len(orphans),
                      "they_lived_after_the_kill_s": sorted(ended.values()),
                      "second_run_started_after_s": round(second_started - killed_at, 2),
                      "second_run": second_rc, "second_waited_for_the_held_lock": waited,
                      "second_resumed": second_out.count(": resumed from ")}))
