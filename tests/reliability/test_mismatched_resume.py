"""Mismatched resumes: a run folder (or checkpoint) of another configuration is refused, naming the
differences, and left untouched."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import faultkit as fk  # noqa: E402

from conftest import TensorBatches, blobs, tiny_mlp  # noqa: E402
from lottery import cli  # noqa: E402
from lottery.engine import Callback, Trainer  # noqa: E402
from lottery.errors import CheckpointError  # noqa: E402
from lottery.hparams import TrainingHparams  # noqa: E402


class _StopAt(Callback):
    """A crash (KeyboardInterrupt) right after step ``at``."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer):
        if trainer.iteration == self.at:
            raise KeyboardInterrupt


def _cli(args) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args)
    return code, [ln for ln in err.getvalue().splitlines() if ln.startswith("lottery: error:")], out.getvalue() + err.getvalue()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _edit(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


TRAIN = ["train", *fk.SYNTH, "--epochs", "1"]
CS = ["search", "cs", *fk.SYNTH, "--epochs", "2", "--rounds", "1", "--rewind", "2it", "--no-dense"]


@pytest.mark.parametrize("command,edits,expected", [
    (TRAIN, {"training.lr": 0.05, "training.momentum": 0.5},
     ["training.lr: 0.05 there, 0.1 now", "training.momentum: 0.5 there"]),
    (TRAIN, {"data.val_size": 10, "seed": 3}, ["data.val_size: 10 there, 50 now", "seed: 3 there, 0 now"]),
    (TRAIN, {"model.model": "conv2", "training.extra_field": 1},
     ["model.model: 'conv2' there, 'lenet_300_100' now", "training.extra_field: 1 there, '<missing>' now"]),
    (CS, {"cs.lam": 0.001, "cs.rounds": 5}, ["cs.lam: 0.001 there, 1e-08 now", "cs.rounds: 5 there, 1 now"]),
], ids=["training", "data+seed", "model+unknown-field", "cs"])
def test_resuming_a_folder_of_other_hparams_is_refused_naming_differences(tmp_path, command, edits, expected):
    """A finished run folder copied elsewhere with its hparams.json edited (what another configuration's
    folder at this name looks like): the same command with --out there is refused, the folder untouched."""
    code, _, log = _cli([*command, "--out", str(tmp_path / "a")])
    assert code == 0, log
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    kind = command[0] if command[0] == "train" else "search-cs"
    folder = fk.one_folder(tmp_path / "b", f"{kind}_")
    for name in ("results.json",):  # make it a run that would otherwise resume
        (folder / name).unlink()

    def change(d):
        for key, value in edits.items():
            *path, last = key.split(".")
            node = d
            for p in path:
                node = node[p]
            node[last] = value

    _edit(folder / "hparams.json", change)
    before = _snapshot(tmp_path / "b")
    code, lines, log = _cli([*command, "--out", str(tmp_path / "b")])
    assert code == 2 and len(lines) == 1 and "Traceback" not in log, log
    assert "holds a run with other hparams" in lines[0]
    for needle in expected:
        assert needle in lines[0], lines[0]
    assert _snapshot(tmp_path / "b") == before


def test_unreadable_hparams_json_is_refused(tmp_path):
    code, _, log = _cli([*TRAIN, "--out", str(tmp_path)])
    assert code == 0, log
    folder = fk.one_folder(tmp_path, "train_")
    (folder / "results.json").unlink()
    (folder / "hparams.json").write_text('{"kind": "train", "seed": ')  # damaged outside lottery
    code, lines, log = _cli([*TRAIN, "--out", str(tmp_path)])
    assert code == 2 and len(lines) == 1 and "Traceback" not in log, log
    assert "hparams.json is unreadable" in lines[0] and "choose another --out or delete that folder" in lines[0]


def test_checkpoint_of_other_training_hparams_is_refused_naming_them(tmp_path):
    """The trainer's own guard (a checkpoint moved between folders): the differing fields are named."""
    x, y = blobs()
    path = tmp_path / "checkpoint.safetensors"
    hp = TrainingHparams(training_steps="2ep", batch_size=32, lr=0.1)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_mlp(), TensorBatches(x, y, 32), hp, checkpoint_path=path, progress=False, log=lambda m: None,
                callbacks=[_StopAt(9)]).fit()
    other = hp.replace(lr=0.2, weight_decay=1e-4)
    with pytest.raises(CheckpointError) as info:
        Trainer(tiny_mlp(), TensorBatches(x, y, 32), other, checkpoint_path=path, progress=False,
                log=lambda m: None).fit()
    msg = str(info.value)
    assert "lr: 0.1 there, 0.2 now" in msg and "weight_decay: 0.0 there, 0.0001 now" in msg


def test_checkpoint_with_another_epoch_length_is_refused(tmp_path):
    x, y = blobs()
    path = tmp_path / "checkpoint.safetensors"
    hp = TrainingHparams(training_steps="2ep", batch_size=32)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_mlp(), TensorBatches(x, y, 32), hp, checkpoint_path=path, progress=False, log=lambda m: None,
                callbacks=[_StopAt(9)]).fit()
    with pytest.raises(CheckpointError, match="written with 8 iterations per epoch, this run has 4"):
        Trainer(tiny_mlp(), TensorBatches(x[:128], y[:128], 32), hp, checkpoint_path=path, progress=False,
                log=lambda m: None).fit()


def test_more_levels_continue_an_imp_folder_instead_of_being_refused(tmp_path):
    """Not a mismatch: IMP's level count is not part of a run's identity (asking for more continues)."""
    base = ["search", "imp", *fk.SYNTH, "--epochs", "1", "--rewind", "2it", "--out", str(tmp_path)]
    code, _, log = _cli([*base, "--levels", "1"])
    assert code == 0, log
    code, lines, log = _cli([*base, "--levels", "2"])
    assert code == 0 and not lines, log
    folder = fk.one_folder(tmp_path, "search-imp_")
    assert (folder / "level_2" / "results.json").exists()
    assert json.loads((folder / "level_1" / "results.json").read_text())["level"] == 1
