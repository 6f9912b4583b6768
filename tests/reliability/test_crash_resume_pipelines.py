"""SIGKILL at every write point of L0, GMP, a structured ticket (refill; refill+ and regroup at three), export
(its TorchScript copy included) and ``lottery sweep`` (its parent and its workers), then resume; compare with
an uninterrupted run bit for bit.

test_crash_resume.py does this for CS and IMP with a hand-written schedule. Here the schedule is derived:
an uninterrupted run (forked, like the killed ones: faultkit) counts its atomic writes
(``LOTTERY_FAULT_KILL_AT_WRITE=0``); that run is the reference. Then, in one folder, restart i is SIGKILLed
at the first write of the i-th distinct file the reference wrote (checkpoints, metrics.csv, masks, weights,
history.json, artefacts.json, results.json, plots, the sweep's record ...), the phase cycling through
half-written, complete-but-not-renamed and renamed-nothing-after. Every kill must land (a restart that
finishes instead fails the test): the chain is deterministic, no timing involved. After every kill every
file on disk must be whole; after a last, uninterrupted restart every result file must equal the
reference's (safetensors tensor for tensor, JSON without paths and wall times, metrics.csv without times,
an export's TorchScript file by its code and tensors) and nothing may be left that the reference does not
have. L0, GMP and the three structured methods then get a second folder killed at moments that are not
writes (:func:`step_kills`: after a counted training step or in a counted evaluation batch,
``LOTTERY_FAULT_KILL_AT_STEP``), from the reference's counts; deterministic too.

In a sweep the variable reaches the pool's workers, so a write of a run folder kills the worker that
writes it (the sweep reports that job failed, and the next run resumes it) and a write of the sweep's
record kills the parent. The parent is also killed by the test while its workers are in their jobs; every
process a sweep started must end with it, killed or not (orphaned workers used to live on forever).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import faultkit as fk  # noqa: E402
from faultkit import procs  # noqa: E402,F401  (the shared fixture)

from lottery.io import FAULT_ENV, FAULT_PHASES, FAULT_STEP_ENV  # noqa: E402

TRAIN = [*fk.SYNTH, "--epochs", "2"]
ARGS = {
    "l0": ["search", "l0", *TRAIN, "--rewind", "2it", "--no-dense"],
    "gmp": ["prune", "gmp", *TRAIN, "--density", "0.3", "--prune-start", "2it", "--prune-end", "1ep", "--prune-every", "4it",
            "--no-dense"],
    "sweep": ["sweep", "train", *TRAIN, "--seeds", "0,1", "--workers", "2", "--threads-per-worker", "1", "--no-report",
              "--no-progress"],
}
# --stack 2: both dense jobs train as one stacked network, a job of the sweep's backend; --backend serial runs
# it in the sweep's own process (no worker), so the kills below land in the parent.
ARGS["sweep-stack"] = [*ARGS["sweep"], "--stack", "2", "--data-order-seed", "0", "--backend", "serial"]
STRUCTURED = {"refill": ["structure", "refill"], "refill+": ["structure", "refill+", "--fillback-rate", "0.5"],
              # --coverage 1.0: blocks no larger than the kept weights, so the ticket stays sparse (at the default
              # 1.5 the blocks of a 0.8-dense source cover every weight and the ticket would be dense)
              "regroup": ["structure", "regroup", "--partitioner", "metis", "--parts", "4", "--coverage", "1.0"]}


@pytest.fixture(scope="module")
def imp_source(procs, tmp_path_factory):
    out = tmp_path_factory.mktemp("imp_source")
    o = procs.run(["search", "imp", *fk.SYNTH, "--model", "conv2", "--epochs", "2", "--levels", "1", "--rewind", "1it",
                   "--out", str(out)])
    assert o.exitcode == 0, o.log[-3000:]
    return fk.one_folder(out, "search-imp_")


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()
                if not (k.endswith("_dir") or "wall" in k or "second" in k or k in ("source_run", "record", "started",
                                                                                     "finished", "updated", "git_dirty",
                                                                                     "git_commit"))}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _result_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and not fk.is_temp(p) and p.name not in (".lock",) and p.suffix not in (".png", ".svg")
                  and not p.name.startswith("sweep_"))


def compare(ref: Path, got: Path) -> int:
    """Every result file of ``ref`` equals ``got``'s, and ``got`` has none more; the number compared."""
    want, have = _result_files(ref), _result_files(got)
    assert have == want, f"files differ: missing {sorted(set(want) - set(have))}, extra {sorted(set(have) - set(want))}"
    for rel in want:
        a, b = ref / rel, got / rel
        if rel.suffix == ".safetensors":
            assert fk.tensors_equal(a, b) == [], f"{rel} differs from the uninterrupted run"
        elif rel.suffix == ".json":
            assert _strip(json.loads(b.read_text())) == _strip(json.loads(a.read_text())), rel
        elif rel.suffix == ".csv":
            assert fk.metrics_without_time(b) == fk.metrics_without_time(a), rel
        elif rel.suffix == ".pt":  # TorchScript: its zip holds a random serialization id: not bit for bit
            assert _torchscript_content(b) == _torchscript_content(a), f"{rel} differs from the uninterrupted run"
    return len(want)


def compare_close(ref: Path, got: Path, rtol: float = 1e-4) -> int:
    """:func:`compare` where a resumed run may not be bit for bit: the same files, tensors and numbers equal
    within ``rtol`` (relative; 1e-6 absolute), strings equal; a results.json's ``stack`` entry (a stacked run's
    size and time) left out. The number of files compared."""
    import math

    import torch
    from safetensors.torch import load_file

    def close(a, b, where: str) -> None:
        if isinstance(a, dict):
            a, b = ({k: v for k, v in d.items() if k != "stack"} for d in (a, b))
            assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
            for k in a:
                close(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list):
            assert isinstance(b, list) and len(a) == len(b), f"{where}: {a} != {b}"
            for i, (x, y) in enumerate(zip(a, b)):
                close(x, y, f"{where}[{i}]")
        elif isinstance(a, (int, float)) and not isinstance(a, bool) and isinstance(b, (int, float)):
            assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-6), f"{where}: {b} != {a} (rtol {rtol})"
        else:
            assert a == b, f"{where}: {b!r} != {a!r}"

    def numbers(rows):
        out = []
        for r in rows:
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except ValueError:
                    row[k] = v
            out.append(row)
        return out

    want, have = _result_files(ref), _result_files(got)
    assert have == want, f"files differ: missing {sorted(set(want) - set(have))}, extra {sorted(set(have) - set(want))}"
    for rel in want:
        a, b = ref / rel, got / rel
        if rel.suffix == ".safetensors":
            ta, tb = load_file(str(a)), load_file(str(b))
            assert sorted(ta) == sorted(tb), rel
            bad = [k for k in ta if ta[k].shape != tb[k].shape or not torch.allclose(ta[k], tb[k], rtol=rtol, atol=1e-6)]
            assert bad == [], f"{rel}: {bad} differ from the uninterrupted run beyond rtol {rtol}"
        elif rel.suffix == ".json":
            close(_strip(json.loads(a.read_text())), _strip(json.loads(b.read_text())), str(rel))
        elif rel.suffix == ".csv":
            close(numbers(fk.metrics_without_time(a)), numbers(fk.metrics_without_time(b)), str(rel))
    return len(want)


def _torchscript_content(path: Path) -> tuple:
    """What a TorchScript file computes: its code and its tensors, bit for bit."""
    import re
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's notice
        m = torch.jit.load(str(path))
    code = [re.sub(r"___torch_mangle_\d+", "", sub.code) for sub in m.modules()]
    return code, [(k, v.dtype, tuple(v.shape), v.flatten().tolist()) for k, v in m.state_dict().items()]


def _count_writes(procs, argv: list[str], ref: Path) -> tuple[list[str], dict[str, int]]:
    """Run ``argv`` uninterrupted into ``ref`` (the reference); the paths it wrote, relative to ``ref``, and
    the training steps and evaluation batches it ran (in this process: not a sweep's workers)."""
    counted = ref.parent / f"{ref.name}_writes.json"
    o = procs.run([*argv, "--out", str(ref)],
                  env={FAULT_ENV: "0", FAULT_STEP_ENV: "0", "LOTTERY_FAULT_REPORT": str(counted)})
    assert o.exitcode == 0, o.log[-3000:]
    report = json.loads(counted.read_text())
    written = [str(Path(p).relative_to(ref)) for p in report["writes"] if Path(p).is_relative_to(ref)]
    counted.unlink()
    return written, report["steps"]


def kill_chain(procs, argv: list[str], out: Path, kills: list, *, sweep: bool = False) -> dict:
    """Restart ``argv`` in ``out`` once per kill, then once to its end. A kill is a write spec (``FAULT_ENV``) or
    the keyword arguments of ``procs.run`` (``env={FAULT_STEP_ENV: ...}``; ``kill_when``: the test kills it)."""
    moments, worker_kills, parent_kills = [], 0, 0
    t0 = time.perf_counter()
    for i, kill in enumerate(kills):
        run_kw = {"env": {FAULT_ENV: kill}} if isinstance(kill, str) else dict(kill)
        spec = kill if isinstance(kill, str) else next(iter(run_kw.get("env", {}).values()), "when its log said so")
        o = procs.run([*argv, "--out", str(out)], watch_children=sweep, **run_kw)
        if sweep:
            _no_orphans(o, f"kill {i + 1} ({spec})")
        fired = [ln for ln in o.log.splitlines() if ln.startswith("lottery fault injection")]
        assert (fired or o.killed_by == "condition") and o.exitcode != 0, \
            f"kill {i + 1} ({spec}) did not fire: the run finished first\n{o.log[-2000:]}"
        assert "Traceback" not in o.log, o.log[-3000:]
        if o.killed:
            parent_kills += 1
        else:  # a sweep's worker was killed: the parent said which job failed and ended
            assert sweep and "failed" in o.log, o.log[-3000:]
            worker_kills += len(fired)
        if isinstance(kill, str):
            moments.append(spec.replace(str(out) + "/", ""))
        else:  # not at a write: what the run had said last before it
            lines = o.log.splitlines()
            upto = next((j for j, ln in enumerate(lines) if ln.startswith("lottery fault")), len(lines))
            said = [ln.strip()[:100] for ln in lines[:upto] if ln.strip()]
            moments.append(f"{fired[-1].split(' at ')[-1] if fired else 'killed by the test'}, after: "
                           f"{said[-1] if said else '-'}")
        fk.check_files_whole(out, context=o.log[-2000:])
    final = procs.run([*argv, "--out", str(out)], watch_children=sweep)
    assert final.exitcode == 0, final.log[-3000:]
    if sweep:
        _no_orphans(final, "the last run")
    fk.check_files_whole(out)
    temps = [p for p in out.rglob("*") if fk.is_temp(p) and "checkpoint.safetensors" in p.name]
    assert temps == [], f"killed checkpoint writes left {temps}"
    return {"kills": parent_kills + worker_kills, "worker_kills": worker_kills, "parent_kills": parent_kills,
            "moments": moments, "seconds": round(time.perf_counter() - t0, 1)}


def _no_orphans(o: "fk.Outcome", what: str, within: float = 20.0) -> None:
    """The processes a sweep started (its pool's workers, their resource tracker) end with it, even when it was
    killed: a worker orphaned by a killed sweep stops at once (it waited for its next job forever)."""
    left = fk.still_running(o.children, within)
    for pid in left:  # not left to run on after the test
        os.kill(pid, 9)
    assert left == [], (f"{what}: processes {left} the sweep started still run {within} s after it ended "
                        f"(exit {o.exitcode}, killed by {o.killed_by or 'nobody'})\n{o.log[-2000:]}")


def write_point_chain(procs, argv: list[str], ref: Path, out: Path, *, step_chain: bool = True) -> dict:
    """The reference run in ``ref``; then in ``out`` restart i killed at the first write of the i-th distinct
    file the reference wrote, phases cycling; compared with the reference at the end. Then, in ``out``
    + ``_steps``, kills at moments that are not writes (:func:`step_kills`), compared likewise (unless
    ``step_chain`` is false: a command that neither trains nor evaluates)."""
    written, steps = _count_writes(procs, argv, ref)
    targets = list(dict.fromkeys(written))
    specs = [f"1:{FAULT_PHASES[i % len(FAULT_PHASES)]}:{out / t}" for i, t in enumerate(targets)]
    report = kill_chain(procs, argv, out, specs)
    report["files_compared"] = compare(ref, out)
    if step_chain:
        report["steps"] = step_chain_report(procs, argv, ref, out.with_name(out.name + "_steps"), steps)
    return report


def step_chain_report(procs, argv: list[str], ref: Path, out: Path, steps: dict[str, int]) -> dict:
    """In ``out``, the kills of :func:`step_kills` (moments that are not writes, from the reference's counts),
    then a last restart; compared with the reference in ``ref``."""
    return {**kill_chain(procs, argv, out, step_kills(steps)), "reference_counts": steps,
            "files_compared": compare(ref, out)}


def step_kills(steps: dict[str, int]) -> list[dict]:
    """Three kills at moments that are not writes, deterministic (no timing: ``FAULT_STEP_ENV`` counts this
    process's training steps and evaluation batches), from the reference's counts: after the training step a
    quarter of the way through the run (mid-epoch: nothing saved since the last checkpoint), in the evaluation
    batch half-way through the run's evaluations (mid-evaluation, further on: the restart redid the steps since
    the last checkpoint), and a few steps into the next restart (mid-epoch, resumed from a checkpoint). Every
    kill must land before the run's end (the chain is deterministic)."""
    s, e = steps["train"], steps["eval"]
    assert s >= 12 and e >= 4, steps
    return [{"env": {FAULT_STEP_ENV: f"{s // 4 + 1}:train"}}, {"env": {FAULT_STEP_ENV: f"{e // 2 + 1}:eval"}},
            {"env": {FAULT_STEP_ENV: f"{s // 8 + 2}:train"}}]


def _report(name: str, report: dict, tmp_path: Path) -> None:
    report = {"pipeline": name, **report}
    print(json.dumps(report, indent=1))
    (Path(os.environ.get("LOTTERY_RELIABILITY_REPORT", tmp_path)) / f"crash_{name}.json").write_text(
        json.dumps(report, indent=1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["l0", "gmp"])
def test_kill_at_every_write_point_then_resume(procs, tmp_path, name):
    report = write_point_chain(procs, ARGS[name], tmp_path / "ref", tmp_path / "killed")
    assert report["kills"] >= 8, report
    # Killed right after the stage's last output, before its checkpoint is removed: the finished run must
    # not keep that checkpoint (it did, for GMP and the structured tickets).
    last = "1:after-rename:/history.json" if name == "gmp" else "1:after-rename:ticket/model.safetensors"
    extra = kill_chain(procs, ARGS[name], tmp_path / "killed_late", [last])
    compare(tmp_path / "ref", tmp_path / "killed_late")
    report["kills"] += extra["kills"]
    _report(name, report, tmp_path)


@pytest.mark.slow
def test_sweep_parent_and_workers_killed_at_every_write_point(procs, tmp_path):
    """The sweep's two jobs run in two workers, each counting its own writes and evaluation batches: a spec
    naming a run folder's file (``/results.json``) kills both workers at their first such write, a step spec
    in their second evaluation batch; one naming the record kills the parent (at the start, and once more
    after jobs have finished, with the workers running). A job whose worker died is retried once alone, in a
    fresh worker, which the same spec kills again. Then, in another folder, the parent is killed by the test
    while its workers are in their jobs."""
    argv = ARGS["sweep"]
    ref = tmp_path / "ref"
    _count_writes(procs, argv, ref)
    in_runs = sorted((p for p in ref.glob("train_*/**/*") if p.is_file() and not fk.is_temp(p) and p.name != ".lock"),
                     key=lambda p: p.stat().st_mtime_ns)
    names = list(dict.fromkeys(str(p.relative_to(p.parents[len(p.relative_to(ref).parts) - 2])) for p in in_runs))
    # Each worker process start imports torch (seconds on a busy machine): a few kills, not one per file.
    assert {"hparams.json", "metrics.csv", "model.safetensors", "results.json"} <= set(names), names
    specs = ["1:mid:sweep_",                           # the parent, writing its first record: no job started
             # Not at a write: both workers in their second evaluation batch (epoch 1's test split, before its
             # checkpoint); the pool breaks, each job is retried alone in a fresh worker and killed there again.
             # (A worker killed right after a write of metrics.csv, as here before, costs as many worker starts:
             # that write point is killed in the L0, GMP and refill chains, whose trainer a worker runs.)
             {"env": {FAULT_STEP_ENV: "2:eval"}},
             "3:after-rename:sweep_",                  # the parent, its workers running
             "1:mid:/results.json"]                    # both workers, their results half written
    report = kill_chain(procs, argv, tmp_path / "killed", specs, sweep=True)
    report["files_compared"] = compare(ref, tmp_path / "killed")
    assert report["worker_kills"] >= 6 and report["parent_kills"] == 2, report
    # The parent killed while both workers are in their jobs (the first "epoch 1/2" line of one of them):
    # the orphaned workers stop at once (before, each finished its job, then waited for another forever;
    # kill_chain checks that every process the sweep started ends), and the next run resumes their jobs.
    orphaned = kill_chain(procs, argv, tmp_path / "orphaned", [{"kill_when": lambda log: "dense epoch 1/" in log}],
                          sweep=True)
    assert orphaned["parent_kills"] == 1, orphaned
    orphaned["files_compared"] = compare(ref, tmp_path / "orphaned")
    report["orphaned"] = orphaned
    _report("sweep", report, tmp_path)


@pytest.mark.slow
def test_sweep_parent_killed_mid_job_in_its_own_process(procs, tmp_path):
    """``--stack 2 --backend serial``: the sweep's parent trains both jobs itself, as one stacked network (the
    serial backend runs the stack's job in its own process), so kills at counted
    steps (:func:`step_kills`) kill the parent in the middle of its jobs, deterministically; each restart
    resumes the stack, and the last one's folders must equal the uninterrupted stacked sweep's bit for bit.

    Then the parent killed with the stack's first member checkpointed and the second's checkpoint half
    written: the members are at different steps, so the restart trains them one by one (documented:
    docs/tutorial.md, "Stacked runs"), whose rounding differs from the stack's (about 1e-5 relative, also
    documented): compared within 1e-4, not bit for bit."""
    argv, ref = ARGS["sweep-stack"], tmp_path / "ref"
    _, steps = _count_writes(procs, argv, ref)  # the parent's own steps: none unless it trained the stack
    assert steps["train"] >= 12, steps
    report = step_chain_report(procs, argv, ref, tmp_path / "killed", steps)
    mixed = kill_chain(procs, argv, tmp_path / "killed_members", ["2:mid:checkpoint.safetensors"])
    mixed["files_compared_within_1e-4"] = compare_close(ref, tmp_path / "killed_members")
    report["members_apart"] = mixed
    assert report["parent_kills"] == 3 and mixed["parent_kills"] == 1, report
    _report("sweep-stack", report, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(STRUCTURED))
def test_structured_kill_at_every_write_point_then_resume(procs, imp_source, tmp_path, method):
    """refill at every write point, then its export at every write point; refill+ and regroup run the same
    job code (only the mask function differs), so they get a short chain: the mask half written, the
    ticket's weights renamed with nothing after them, results.json complete but not renamed. All three then
    get the three kills mid-retraining of :func:`step_kills`, in a folder of their own."""
    argv = [*STRUCTURED[method], str(imp_source), "--no-progress"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    if method == "refill":
        report = write_point_chain(procs, argv, ref, out)
        assert report["kills"] >= 8, report
    else:
        _, steps = _count_writes(procs, argv, ref)
        report = kill_chain(procs, argv, out, ["1:mid:/mask.safetensors", "1:after-rename:/model.safetensors",
                                               "1:before-rename:/results.json"])
        report["files_compared"] = compare(ref, out)
        # Mid-retraining (after a counted step, in a counted evaluation batch), as refill's step chain.
        report["steps"] = step_chain_report(procs, argv, ref, tmp_path / "killed_steps", steps)
        assert report["steps"]["kills"] == 3, report
    _report(f"structure-{method}", report, tmp_path)
    ticket = json.loads((fk.one_folder(ref, "structure-") / "results.json").read_text())
    assert 0 < ticket["density"] < 1, ticket["density"]  # a ticket that really prunes, not the dense network
    if method == "refill":  # the export of that ticket, killed at each of its writes
        ref_run, run = fk.one_folder(ref, "structure-"), fk.one_folder(out, "structure-")
        exp = write_point_chain(procs, ["export", str(run), "--to", "dense"], ref_run / "export-dense-ref",
                                run / "export-dense", step_chain=False)
        _report("export", exp, tmp_path)
