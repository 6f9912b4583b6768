"""Stacks as sweep jobs (issue 23, lottery.sweep.stacks): the backends run a whole stack as one task; each
member's outcome is recorded when its stack finishes; members a stack does not take, or a stack that fails
as a whole, run unstacked; the planner's grouping; ``--stack auto`` on the CPU leaves no worker idle."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from lottery.experiment import RunOptions, auto_stack_size, train_dense
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.methods.cs import CSHparams
from lottery.sweep import STACK_KINDS, expand_grid, get_kind, make_spec, plan_stacks, run_sweep, split_evenly
from lottery.sweep.record import _Entry

DATA = DataHparams(dataset="synthetic", synthetic_shape=(1, 8, 8), synthetic_train_size=128, synthetic_test_size=64,
                   val_size=32)
SHARED = TrainingHparams(training_steps="4it", batch_size=32, eval_every="4it", data_order_seed=0)
CS = CSHparams(rounds=1, round_steps="4it", rewind="1it", lam=1e-6)
MODEL = ModelHparams(model="lenet_300_100")


# Stack runners of test-only stack kinds. Module-level, so that spawned workers can import them by name.
def stack_takes_first_only(jobs, options):
    """Trains the first member (marked), leaves the others to the sweep."""
    return [train_dense(jobs[0], options) | {"via": "test-stack"}] + [None] * (len(jobs) - 1)


def stack_fails_second(jobs, options):
    return [train_dense(jobs[0], options), RuntimeError("member boom")] + [None] * (len(jobs) - 2)


def stack_raises_after_first(jobs, options):
    train_dense(jobs[0], options)
    raise RuntimeError("stack boom")


def stack_dies_after_first(jobs, options):
    train_dense(jobs[0], options)
    os._exit(3)  # the worker killed outright: the pool breaks


def _dense_specs(seeds=(0, 1)):
    return expand_grid(make_spec("train", data=DATA, model=MODEL, training=SHARED), seeds=list(seeds))


def _cs_specs(seeds=(0, 1, 2, 3)):
    # One s0, seeds sharing a data order: each has its own dense reference, and the references stack too.
    return expand_grid(make_spec("cs", data=DATA, model=MODEL, training=SHARED, cs=CS), seeds=list(seeds))


def _record(out: Path) -> dict:
    (path,) = out.glob("sweep_*.json")
    return json.loads(path.read_text())


def _with_run(monkeypatch, run) -> None:
    monkeypatch.setitem(STACK_KINDS, "train", dataclasses.replace(STACK_KINDS["train"], run=run))


def test_two_stacks_run_side_by_side_on_two_workers_as_the_serial_sweep_does(tmp_path):
    lines: list[str] = []
    specs = _cs_specs()
    local = run_sweep(specs, RunOptions(out=tmp_path / "local", progress=False), workers=2, threads_per_worker=1,
                      stack=2, log=lines.append)
    assert local.ok, [o.error for o in local.failures]
    # 4 dense references as two stacks of 2, then 4 searches as two stacks of 2, each a worker's job: the
    # stacked path's own lines come back from the workers with the stack's label.
    assert sum(ln.startswith("stack: 2 dense runs as one") for ln in lines) == 2, lines
    assert sum(ln.startswith("stack: 2 CS searches as one") for ln in lines) == 2, lines
    assert any(ln.startswith("[stack ") and "stack: 2 CS searches as one network" in ln for ln in lines), lines
    assert all((o.results.get("stack") or {}).get("size") == 2 for o in local.outcomes)

    serial = run_sweep(specs, RunOptions(out=tmp_path / "serial", progress=False), backend="serial",
                       threads_per_worker=1, stack=2, log=lambda line: None)
    assert serial.ok
    for a, b in zip(local.outcomes, serial.outcomes):
        assert a.spec == b.spec and a.role == b.role
        assert Path(a.run_dir).name == Path(b.run_dir).name and Path(a.run_dir).parent == tmp_path / "local"
        assert (Path(a.run_dir) / "results.json").is_file()
        for key in ("test_accuracy", "val_accuracy", "density", "dense_test_accuracy", "epochs"):
            assert a.results.get(key) == b.results.get(key), key
    rec = _record(tmp_path / "local")
    assert rec["jobs_ok"] == 8 and all(j["attempts"] == 1 and j["status"] == "ok" for j in rec["jobs"])

    # Started again: every member is reused, none stacked again.
    again_lines: list[str] = []
    again = run_sweep(specs, RunOptions(out=tmp_path / "local", progress=False), workers=2, threads_per_worker=1,
                      stack=2, log=again_lines.append)
    assert again.ok and all(o.reused for o in again.outcomes)
    assert not any(" as one " in ln for ln in again_lines), again_lines


def test_a_member_the_stack_does_not_take_runs_unstacked(tmp_path, monkeypatch):
    _with_run(monkeypatch, stack_takes_first_only)
    lines: list[str] = []
    result = run_sweep(_dense_specs(), RunOptions(out=tmp_path, progress=False), backend="serial", stack=2,
                       log=lines.append)
    assert result.ok
    first, second = result.outcomes
    assert first.results["via"] == "test-stack" and "via" not in second.results
    assert (Path(second.run_dir) / "results.json").is_file()
    assert any(ln.startswith("stack: 1 of 2 dense runs not stacked run unstacked") and second.label in ln
               for ln in lines), lines
    assert [j["attempts"] for j in _record(tmp_path)["jobs"]] == [1, 1]


def test_a_failing_member_does_not_lose_the_others(tmp_path, monkeypatch):
    _with_run(monkeypatch, stack_fails_second)
    result = run_sweep(_dense_specs(), RunOptions(out=tmp_path, progress=False), backend="serial", stack=2,
                       log=lambda line: None)
    first, second = result.outcomes
    assert first.ok and (Path(first.run_dir) / "results.json").is_file()
    assert second.status == "failed" and second.error == "RuntimeError: member boom" and "member boom" in second.traceback
    rec = _record(tmp_path)
    assert [j["status"] for j in rec["jobs"]] == ["ok", "failed"] and rec["jobs_ok"] == 1


def test_a_stack_that_raises_reruns_its_members_unstacked_keeping_the_finished_one(tmp_path, monkeypatch):
    _with_run(monkeypatch, stack_raises_after_first)
    lines: list[str] = []
    result = run_sweep(_dense_specs(), RunOptions(out=tmp_path, progress=False), backend="serial", stack=2,
                       log=lines.append)
    assert result.ok, [o.error for o in result.failures]
    assert any(ln.startswith("stack: stack ") and "failed (RuntimeError: stack boom); its 2 members run unstacked" in ln
               for ln in lines), lines
    # The member the stack finished before it raised is reused as it was (one training, not two).
    first, second = result.outcomes
    assert any(ln.startswith(f"[{first.label}]") and ln.endswith("already finished, reusing its results")
               for ln in lines), lines
    assert not any(ln.startswith(f"[{second.label}]") and "reusing" in ln for ln in lines)
    assert [j["attempts"] for j in _record(tmp_path)["jobs"]] == [2, 2]


def test_a_stack_whose_worker_dies_reruns_its_members_unstacked(tmp_path, monkeypatch):
    _with_run(monkeypatch, stack_dies_after_first)
    lines: list[str] = []
    result = run_sweep(_dense_specs(), RunOptions(out=tmp_path, progress=False), workers=2, threads_per_worker=1,
                       stack=2, log=lines.append)
    assert result.ok, [o.error for o in result.failures]
    assert any("failed (its worker process died" in ln and "its 2 members run unstacked" in ln for ln in lines), lines
    assert all((Path(o.run_dir) / "results.json").is_file() for o in result.outcomes)


def _entries(specs, reused=()):
    entries = [_Entry(i, s, get_kind(s.kind), label=f"{s.kind}-{s.seed}-{i}") for i, s in enumerate(specs)]
    for i in reused:
        entries[i].reused = True
    return entries


def test_split_evenly():
    assert [len(p) for p in split_evenly(list(range(9)), 8)] == [5, 4]
    assert [len(p) for p in split_evenly(list(range(8)), 4)] == [4, 4]
    assert split_evenly([0, 1, 2], 2) == [[0, 1], [2]]
    assert split_evenly([0, 1, 2], 1) == [[0], [1], [2]]
    assert split_evenly([], 4) == []


def test_the_planner_groups_by_kind_and_key_dense_first(tmp_path):
    own_order = expand_grid(make_spec("train", data=DATA, model=MODEL, training=SHARED.replace(data_order_seed=None)),
                            seeds=[7, 8])  # a data order each: never stacked
    specs = [*_cs_specs(seeds=(0, 1, 2)), *_dense_specs(seeds=(0, 1, 2, 3, 4)), *own_order,
             make_spec("cs", data=DATA, model=MODEL, training=SHARED, cs=CS.replace(density=0.3))]
    entries = _entries(specs, reused=[7])  # dense seed 4: finished already
    entries[2].status = "ok"  # CS seed 2: finished in this sweep
    lines: list[str] = []
    stacks = plan_stacks(entries, 2, RunOptions(out=tmp_path), lines.append)
    assert [(s.kind.name, [e.index for e in s.members]) for s in stacks] == [
        ("train", [3, 4]), ("train", [5, 6]), ("cs", [0, 1])]
    assert all(e.stacked == any(e in s.members for s in stacks) for e in entries)
    assert "stack: 2 dense job(s) share their data order with no other and run unstacked" in " ".join(lines)
    assert any(ln.startswith("stack: 1 CS job(s) run unstacked: searches with a target density") for ln in lines)
    # Stacks of at most 3: the 4 pending dense seeds as 2 + 2, not 3 + 1.
    stacks = plan_stacks(_entries(specs, reused=[7]), 3, RunOptions(out=tmp_path), lambda line: None)
    assert [[e.index for e in s.members] for s in stacks if s.kind.name == "train"] == [[3, 4], [5, 6]]
    assert [[e.index for e in s.members] for s in stacks if s.kind.name == "cs"] == [[0, 1, 2]]


def test_auto_gives_every_cpu_worker_a_stack(tmp_path):
    from lottery.models import build_model

    model = build_model("lenet_300_100", input_shape=(1, 8, 8), num_classes=10)
    assert auto_stack_size(model, "cpu", 8, workers=2)[0] == 4
    k, why = auto_stack_size(model, "cpu", 9, workers=2)
    assert k == 5 and "limited by the 2 workers" in why
    assert auto_stack_size(model, "cpu", 7, workers=3)[0] == 3
    k, why = auto_stack_size(model, "cpu", 2, workers=2)
    assert k == 1 and "no stacks" in why
    assert auto_stack_size(model, "cpu", 20, workers=1)[0] == 8  # the CPU cap
    # Convolutional networks are not stacked on the CPU by auto (measured slower there).
    conv = build_model("conv4", input_shape=(1, 8, 8), num_classes=10, width=0.125)
    k, why = auto_stack_size(conv, "cpu", 8, workers=2)
    assert k == 1 and "no stacks" in why and "convolutions" in why
    # In the planner: 8 dense seeds, 2 workers -> two stacks of 4; 2 seeds on 2 workers -> none.
    lines: list[str] = []
    stacks = plan_stacks(_entries(_dense_specs(seeds=range(8))), "auto", RunOptions(out=tmp_path), lines.append,
                         workers=2)
    assert [len(s.members) for s in stacks] == [4, 4]
    assert any(ln.startswith("stack: --stack auto: stacks of 4") for ln in lines), lines
    assert plan_stacks(_entries(_dense_specs(seeds=range(2))), "auto", RunOptions(out=tmp_path), lines.append,
                       workers=2) == []


@pytest.mark.parametrize("stack", [1, "auto"])
def test_stack_one_or_a_lone_member_runs_unstacked(tmp_path, stack):
    lines: list[str] = []
    result = run_sweep(_dense_specs(seeds=(0,)) if stack == "auto" else _dense_specs(), RunOptions(out=tmp_path,
                       progress=False), backend="serial", stack=stack, log=lines.append)
    assert result.ok and all("stack" not in o.results for o in result.outcomes)
    said = [ln for ln in lines if ln.startswith("stack:")]
    if stack == 1:  # no stacking: not a word about it
        assert said == [], said
    else:  # the lone run is told why it runs alone
        assert said == ["stack: 1 dense job(s) share their data order with no other and run unstacked (runs of "
                        "different seeds share one only with --data-order-seed)"], said


def test_ray_runs_a_stack_as_one_task(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'lottery[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    lines: list[str] = []
    try:
        specs = _dense_specs(seeds=range(4))
        result = run_sweep(specs, RunOptions(out=tmp_path / "ray", progress=False), backend="ray", num_cpus=1,
                           stack="auto", log=lines.append)
    finally:
        ray.shutdown()
    assert result.ok, [o.error for o in result.failures]
    # 2 tasks at once on the cluster: auto gives each a stack of 2.
    assert sum(ln.startswith("stack: 2 dense runs as one") for ln in lines) == 2, lines
    serial = run_sweep(specs, RunOptions(out=tmp_path / "serial", progress=False), backend="serial",
                       threads_per_worker=1, stack=2, log=lambda line: None)
    assert [o.results["stack"]["size"] for o in result.outcomes] == [2, 2, 2, 2]
    assert [o.results["test_accuracy"] for o in result.outcomes] == [o.results["test_accuracy"] for o in serial.outcomes]


# A stack kind registered by strings, as lottery.pipelines.imp_stacked's will be (module-level: importable).
def imp_key(job):
    return job.seed % 2


def imp_refusal(jobs, options):
    return "seed 9 never stacks" if any(j.seed == 9 for j in jobs) else None


def test_a_stack_kind_registers_with_one_call(tmp_path, monkeypatch):
    from lottery.errors import ConfigError
    from lottery.methods.imp import IMPHparams
    from lottery.sweep import register_stack_kind

    # Without the built-in imp kind, so that this test's own takes its place.
    monkeypatch.setattr("lottery.sweep.stacks.STACK_KINDS", {k: v for k, v in STACK_KINDS.items() if k != "imp"})
    from lottery.sweep import stacks

    kind = register_stack_kind("imp", key=f"{__name__}:imp_key", refusal=f"{__name__}:imp_refusal",
                               run=f"{__name__}:stack_takes_first_only", noun="IMP searches")
    assert stacks.STACK_KINDS["imp"] is kind and kind.kinds == ("imp",)
    with pytest.raises(ConfigError, match="already stack as 'imp'"):
        register_stack_kind("imp2", kinds=("imp",), key=imp_key, run=stack_takes_first_only)
    specs = expand_grid(make_spec("imp", data=DATA, model=MODEL, training=SHARED, imp=IMPHparams(levels=1)),
                        seeds=[0, 1, 2, 3, 9])
    lines: list[str] = []
    planned = plan_stacks(_entries(specs), 4, RunOptions(out=tmp_path), lines.append)
    imp_stacks = [[e.spec.seed for e in s.members] for s in planned if s.kind.name == "imp"]
    assert imp_stacks == [[0, 2], [1, 3]]
    assert "stack: 1 IMP job(s) run unstacked: seed 9 never stacks" in lines


def test_imp_replicates_stack_in_a_sweep_as_their_unstacked_runs(tmp_path):
    """The ``imp`` stack kind: 2 IMP replicates sharing a data order run as one stack (one worker's job)
    and end with the masks and accuracies of the same sweep unstacked; IMP-C is refused and runs alone."""
    from lottery.masks import Mask
    from lottery.methods.imp import IMPHparams

    imp = IMPHparams(levels=1, rate=0.2, rewind="1it")
    specs = expand_grid(make_spec("imp", data=DATA, model=MODEL, training=SHARED, imp=imp), seeds=[0, 1])
    lines: list[str] = []
    stacked = run_sweep(specs, RunOptions(out=tmp_path / "stacked", progress=False), backend="serial", stack=2,
                        log=lines.append)
    assert stacked.ok, [o.error for o in stacked.failures]
    assert any(ln.startswith("stack: 2 IMP searches as one") for ln in lines), lines
    assert all((o.results.get("stack") or {}).get("size") == 2 for o in stacked.outcomes)
    plain = run_sweep(specs, RunOptions(out=tmp_path / "plain", progress=False), backend="serial", stack=1,
                      log=lambda line: None)
    assert plain.ok and all("stack" not in o.results for o in plain.outcomes)
    for a, b in zip(stacked.outcomes, plain.outcomes):
        assert Path(a.run_dir).name == Path(b.run_dir).name
        ma, mb = (Mask.load(Path(o.run_dir) / "level_1" / "mask.safetensors") for o in (a, b))
        assert all(bool((ma[k] == mb[k]).all()) for k in ma), a.label
    impc = expand_grid(make_spec("imp-c", data=DATA, model=MODEL, training=SHARED, imp=imp), seeds=[0, 1])
    lines.clear()
    refused = run_sweep(impc, RunOptions(out=tmp_path / "impc", progress=False), backend="serial", stack=2,
                        log=lines.append)
    assert refused.ok and all("stack" not in o.results for o in refused.outcomes)
    assert not any(" as one " in ln for ln in lines), lines
