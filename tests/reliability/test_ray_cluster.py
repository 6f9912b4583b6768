"""Joining a Ray cluster: ``lottery sweep ... --backend ray --ray-address HOST:PORT``.

* No cluster at the address: one line naming the address and what to check, within seconds (Ray's own
  ``ray.init`` retried for ~20 s and then printed a 20-line traceback).
* A real cluster: a head started by the test on the loopback address (its own ports and temp folder,
  so it never touches another Ray on the machine), a small sweep joined to it through ``--ray-address``,
  one Ray worker SIGKILLed while it runs a job; Ray retries the task, the run folder resumes, and the
  results equal those of a local run. The test stops the processes of its head itself (never ``ray stop``,
  which would stop every Ray of this machine), also when it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds Ray's processes through /proc")
def test_sweep_joins_a_real_cluster_and_survives_a_killed_worker(tmp_path):
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
    sweep = None
    try:
        started = subprocess.run(head, capture_output=True, text=True, env=env, timeout=180)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]

        # The reference: the same sweep on the local pool.
        ref = subprocess.run([sys.executable, "-m", "lottery", *SWEEP, "--workers", "1", "--out", str(tmp_path / "ref")],
                             capture_output=True, text=True, env=_env(), timeout=300)
        assert ref.returncode == 0, ref.stderr[-3000:]

        out = tmp_path / "ray"
        log = open(tmp_path / "ray.log", "w")
        sweep = subprocess.Popen([sys.executable, "-m", "lottery", *SWEEP, "--backend", "ray", "--num-cpus", "1",
                                  "--ray-address", f"127.0.0.1:{port}", "--out", str(out)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        # Kill the worker that runs a job once that job has written a checkpoint (work to resume from).
        killed = None
        deadline = time.time() + 240
        while killed is None:
            assert sweep.poll() is None, "the sweep ended before a worker was killed:\n" + (tmp_path / "ray.log").read_text()
            assert time.time() < deadline, "no job wrote a checkpoint:\n" + (tmp_path / "ray.log").read_text()
            if list(out.glob("train_*/checkpoint.safetensors")):
                procs = _procs()
                workers = [pid for pid in _head_processes(temp_dir, port) if procs.get(pid, (0, ""))[1].startswith("ray::train")]
                if workers:
                    killed = workers[0]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        assert sweep.wait(300) == 0, (tmp_path / "ray.log").read_text()[-4000:]
        log.close()
        text = (tmp_path / "ray.log").read_text()
        # The killed job was retried by Ray, and its second attempt resumed from the checkpoint.
        resumed = text.count(": resumed from ")
        assert resumed >= 1, text[-3000:]

        record = json.loads(next(out.glob("sweep_*.json")).read_text())
        assert record["jobs_failed"] == 0 and record["ray"]["address"] == f"127.0.0.1:{port}", text[-3000:]
        ref_folders = sorted(p.name for p in (tmp_path / "ref").glob("train_*"))
        assert ref_folders == sorted(p.name for p in out.glob("train_*")) and len(ref_folders) == 2
        for name in ref_folders:
            a, b = tmp_path / "ref" / name, out / name
            assert _strip(json.loads((b / "results.json").read_text())) == _strip(json.loads((a / "results.json").read_text()))
            assert fk.tensors_equal(a / "model.safetensors", b / "model.safetensors") == []
            assert fk.metrics_without_time(b / "metrics.csv") == fk.metrics_without_time(a / "metrics.csv")
            assert not (b / "checkpoint.safetensors").exists()
    finally:
        if sweep is not None and sweep.poll() is None:
            sweep.kill()
            sweep.wait()
        _stop_head(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert _head_processes(temp_dir, port) == set()
    print(json.dumps({"killed_worker": killed, "jobs": len(ref_folders), "restarted_from_checkpoint": resumed}))
