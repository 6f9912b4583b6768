"""Crashes: SIGKILL a CS search and an IMP search at many moments, restart, compare with an uninterrupted run.

The reference run is a real ``python -m lottery`` process. The killed runs are forked from a preloaded
forkserver (see faultkit) so that ~60 process starts cost seconds, not minutes. Two kinds of kills:

* at a write (``LOTTERY_FAULT_KILL_AT_WRITE``, a hook in ``lottery.io.atomic_write_bytes``): half-way
  through writing the temporary file, with the temporary file complete but not renamed, or right after
  the rename (the file is there, nothing after it ran: between ``history.json`` and ``state.safetensors``,
  between a model and its ``results.json``, before a stale checkpoint is removed ...). Each restart
  continues from what the previous one left, so one run folder sees a whole chain of kills; the chain is
  deterministic, so every kill in it must fire (a run that finishes instead fails the test).
* at moments that are not writes (a second folder): after the Nth training step of the restarted process
  (mid-epoch: nothing saved since the last checkpoint) or in its Nth evaluation batch (mid-evaluation:
  ``LOTTERY_FAULT_KILL_AT_STEP``, a hook in the trainer and ``evaluate``), in every stage of the search.
  These were kills on a timer, retried when the machine's speed let a run end first; counted steps land
  at the same moment on any machine.

After every kill every file a reader could take for a result must be whole (JSON parses, safetensors
load, CSV rows complete); at the end masks, weights, accuracies and metrics must equal the reference's
exactly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import faultkit as fk  # noqa: E402
from faultkit import procs  # noqa: E402,F401  (the shared fixture)

from lottery.io import FAULT_ENV, FAULT_STEP_ENV  # noqa: E402

ARGS = {
    "cs": ["search", "cs", *fk.SYNTH, "--epochs", "3", "--rounds", "2", "--rewind", "2it"],
    "imp": ["search", "imp", *fk.SYNTH, "--epochs", "3", "--levels", "2", "--rewind", "2it"],
}

# One entry per restart of the chain: N:PHASE[:SUBSTRING] = SIGKILL during the Nth write (of a path
# containing SUBSTRING) of that process. Annotated with what the write is in this place of the chain.
SCHEDULE = {
    "cs": [
        "2:mid",                                  # the dense run's hparams.json, half written
        "1:before-rename:checkpoint",             # dense epoch-1 checkpoint complete in its temp file
        "1:mid:checkpoint",                       # ... and half written
        "1:after-rename:checkpoint",              # dense epoch 1 durable
        "2:mid:checkpoint",                       # epoch 2 durable, epoch 3 half written
        "1:after-rename:model.safetensors",       # dense weights saved, results.json not yet
        "1:mid:results.json",                     # dense results.json half written
        "1:after-rename:results.json",            # dense done; its last checkpoint not yet removed
        "1:mid:rewind",                           # CS rewind point k half written
        "1:after-rename:rewind",                  # rewind point saved, nothing after it
        "2:before-rename:checkpoint",             # round 0: epoch 1 durable, epoch 2 in its temp file
        "1:after-rename:history.json",            # round 0 done: history.json there, state.safetensors not
        "1:mid:state.safetensors",                # round 0 state half written
        "1:after-rename:state.safetensors",       # round 0 state there, round checkpoint not yet removed
        "3:mid:checkpoint",                       # round 1: epochs 1-2 durable, 3 half written
        "1:after-rename:mask.json",               # the mask's report there, the mask not (found a bug:
        "1:mid:mask.safetensors",                 #   the other order lost mask.json); the mask half written
        "2:after-rename:checkpoint",              # ticket: 2 of its checkpoints durable
        "1:after-rename:ticket/model.safetensors",  # ticket weights saved, results.json not
        "1:mid:results.json",                     # the search's results.json half written
    ],
    "imp": [
        "1:mid",                                  # hparams.json half written
        "1:mid:rewind",                           # rewind point k half written
        "1:after-rename:rewind",                  # rewind point there, nothing after it
        "1:before-rename:checkpoint",             # level 0 epoch-1 checkpoint in its temp file
        "2:mid:checkpoint",                       # epoch 1 durable, epoch 2 half written
        "1:after-rename:history.json",            # level 0 history there, model.safetensors not
        "1:after-rename:level_0/model",           # level 0 weights there, mask and results.json not
        "1:after-rename:mask.json",               # level 0 mask report there, the mask not
        "1:mid:level_0/results.json",             # level 0 results half written
        "1:after-rename:level_1/mask.safetensors",  # level 1 mask there, training not started
        "2:before-rename:checkpoint",             # level 1: one checkpoint durable, the next in its temp file
        "1:mid:history.json",                     # level 1 history half written
        "1:after-rename:level_1/results.json",    # level 1 done
        "3:after-rename:checkpoint",              # level 2: three checkpoints durable
        "1:after-rename:level_2/model",           # level 2 weights there, results.json not
        "1:mid:results.json",                     # level 2 results half written
        "2:before-rename:results.json",           # level 2 done, the summary in its temp file
    ],
}

# Kills that are not at writes, one per restart: N:train = SIGKILL after the Nth training step of that
# process, N:eval = in its Nth evaluation batch (an evaluation is one batch of val, then one of test; the
# even ones are mid-evaluation). A restart counts from where it resumed (1 epoch = 8 steps; a ticket's
# first epoch is 6, from its rewind point at 2it). Annotated with where each lands.
STEP_SCHEDULE = {
    "cs": [
        "13:train",   # dense, epoch 2 step 5 (epoch 1 checkpointed)
        "6:eval",     # resumed at dense epoch 1, finished it; round 0, epoch 1's evaluation, after val
        "7:eval",     # round 0 again from its start: its three epochs, then the evaluation that ends the round
        "10:train",   # round 0 resumed after its last epoch, finished; round 1, epoch 2 step 2
        "20:train",   # round 1 resumed at epoch 1, finished; the ticket, epoch 1 step 4
        "4:eval",     # the ticket again from its start: epoch 2's evaluation, after val
    ],
    "imp": [
        "11:train",   # level 0, epoch 2 step 3
        "6:eval",     # level 0 resumed at epoch 1, finished; level 1, epoch 1's evaluation, after val
        "17:train",   # level 1 again from its start: epoch 3 step 3
        "12:train",   # level 1 resumed at epoch 2, finished; level 2, epoch 1 step 4
        "4:eval",     # level 2 again from its start: epoch 2's evaluation, after val
        "9:train",    # level 2 resumed at epoch 2: epoch 3 step 1
    ],
}


def _strip(obj):
    """Results without what legitimately differs between two run folders: paths and wall times."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not (k.endswith("_dir") or "wall" in k or k == "source_run")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _compare_folders(ref_root: Path, got_root: Path, method: str) -> int:
    """Assert that every result of ``got_root`` equals ``ref_root``'s; returns the number of files compared."""
    prefix = f"search-{method}_"
    ref, got = fk.one_folder(ref_root, prefix), fk.one_folder(got_root, prefix)
    assert ref.name == got.name
    compared = 0
    folders = [(ref, got)]
    if method == "cs":
        folders.append((fk.one_folder(ref_root, "train_"), fk.one_folder(got_root, "train_")))
    for a_dir, b_dir in folders:
        for a in sorted(a_dir.rglob("*")):
            if not a.is_file() or fk.is_temp(a) or a.name == ".lock" or a.suffix in (".png", ".svg"):
                continue
            b = b_dir / a.relative_to(a_dir)
            assert b.exists(), f"{b} is missing after the kills"
            if a.suffix == ".safetensors":
                assert fk.tensors_equal(a, b) == [], f"{b.relative_to(got_root)} differs from the reference"
            elif a.suffix == ".json":
                assert _strip(json.loads(b.read_text())) == _strip(json.loads(a.read_text())), b
            elif a.suffix == ".csv":
                assert fk.metrics_without_time(b) == fk.metrics_without_time(a), b
            compared += 1
        stale = [p for p in b_dir.rglob("*") if p.is_file() and not fk.is_temp(p) and p.name != ".lock"
                 and not (a_dir / p.relative_to(b_dir)).exists()]
        assert stale == [], f"files the uninterrupted run does not leave: {stale}"
    return compared


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cs", "imp"])
def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path, procs, method):
    argv = ARGS[method]
    reference = fk.start_cli_subprocess([*argv, "--out", str(tmp_path / "ref")], cwd=tmp_path)
    try:
        # -- chain 1: kills at writes, one folder -------------------------------------------------------
        out = tmp_path / "killed_at_writes"
        moments = []
        tmp_left = 0
        for i, spec in enumerate(SCHEDULE[method]):
            o = procs.run([*argv, "--out", str(out)], env={FAULT_ENV: spec})
            assert o.exitcode != 0, (f"kill #{i + 1} ({spec}) did not fire: the run finished first; the write "
                                     f"order changed, adjust SCHEDULE\n{o.log[-2000:]}")
            assert o.killed_by == "fault", f"kill #{i + 1} ({spec}): the run failed instead\n{o.log[-3000:]}"
            line = [ln for ln in o.log.splitlines() if ln.startswith("lottery fault injection")][-1]
            moments.append(line.split("SIGKILL at ")[1].replace(str(out) + "/", ""))
            tmp_left = max(tmp_left, fk.check_files_whole(out, context=o.log[-2000:])["tmp"])
        final = procs.run([*argv, "--out", str(out)])
        assert final.exitcode == 0, final.log[-3000:]
        checkpoint_kills = [m for m in moments if "checkpoint" in m and ("mid" in m or "before-rename" in m)]
        assert len(moments) == len(SCHEDULE[method]) and len(checkpoint_kills) >= 3, moments

        # -- chain 2: kills at counted training steps and evaluation batches, another folder ------------------
        out2 = tmp_path / "killed_at_steps"
        step_moments = []
        for i, spec in enumerate(STEP_SCHEDULE[method]):
            o = procs.run([*argv, "--out", str(out2)], env={FAULT_STEP_ENV: spec})
            assert o.exitcode != 0, (f"step kill #{i + 1} ({spec}) did not fire: the run finished first; adjust "
                                     f"STEP_SCHEDULE\n{o.log[-2000:]}")
            assert o.killed_by == "fault", f"step kill #{i + 1} ({spec}): the run failed instead\n{o.log[-3000:]}"
            said = [ln.strip()[:90] for ln in o.log.splitlines() if ln.strip()]
            step_moments.append(f"{said[-1].split(' at ')[-1]}, after: {said[-2] if len(said) > 1 else '-'}")
            fk.check_files_whole(out2, context=o.log[-2000:])
        final2 = procs.run([*argv, "--out", str(out2)])
        assert final2.exitcode == 0, final2.log[-3000:]
        ref_log, _ = reference.communicate(timeout=300)
        assert reference.returncode == 0, ref_log[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    n1 = _compare_folders(tmp_path / "ref", out, method)
    n2 = _compare_folders(tmp_path / "ref", out2, method)
    fk.check_files_whole(out)
    fk.check_files_whole(out2)
    # The temporary files of killed checkpoint writes (each as large as a checkpoint) are gone: the next
    # holder of the folder's lock removes them. Those of other writes (small; some written outside the
    # lock) may stay, and are never read.
    temps = [p for root in (out, out2) for p in root.rglob("*") if fk.is_temp(p)]
    assert [p for p in temps if "checkpoint.safetensors" in p.name] == []
    total = len(moments) + len(step_moments)
    report = {"method": method, "write_kills": len(moments), "checkpoint_write_kills": len(checkpoint_kills),
              "step_kills": len(step_moments), "total_kills": total, "files_compared": n1 + n2,
              "temp_files_seen_after_a_kill": tmp_left, "temp_files_left_at_the_end": len(temps),
              "moments": moments, "step_moments": step_moments}
    print(json.dumps(report, indent=1))
    (Path(os.environ.get("LOTTERY_RELIABILITY_REPORT", tmp_path)) / f"crash_{method}.json").write_text(
        json.dumps(report, indent=1))
    assert total >= 12
