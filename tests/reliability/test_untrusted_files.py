"""Untrusted files: masks, checkpoints and stage files load without executing code, and files for another
model, shape or configuration are refused naming what does not match."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import faultkit as fk  # noqa: E402

from conftest import TensorBatches, blobs, tiny_mlp  # noqa: E402
from lottery import cli  # noqa: E402
from lottery.engine import Trainer, load_checkpoint, save_checkpoint  # noqa: E402
from lottery.errors import CheckpointError, LotteryError  # noqa: E402
from lottery.hparams import TrainingHparams  # noqa: E402
from lottery.io import load_tensors  # noqa: E402
from lottery.masks import Mask  # noqa: E402
from lottery.models import build_model  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src" / "lottery"


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _write_evil(path: Path, marker: Path, fmt: str) -> None:
    obj = {"fc1.weight": torch.ones(3, 4), "payload": Payload(marker)}
    if fmt == "torch-zip":
        torch.save(obj, path)
    elif fmt == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle
        path.write_bytes(pickle.dumps(obj))


FORMATS = ["torch-zip", "torch-legacy", "pickle"]
LOADERS = {
    "load_checkpoint": load_checkpoint,
    "Mask.load": Mask.load,
    "load_tensors": load_tensors,  # rewind points, round states, trained weights
}


def test_the_payload_is_live(tmp_path):
    """The test files really execute code when unpickled (so the other tests prove something)."""
    path, marker = tmp_path / "evil.pt", tmp_path / "marker"
    _write_evil(path, marker, "torch-zip")
    torch.load(path, weights_only=False)
    assert marker.is_dir()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("loader", list(LOADERS))
def test_pickled_files_are_refused_without_running_them(tmp_path, fmt, loader):
    path, marker = tmp_path / "file.safetensors", tmp_path / "marker"
    _write_evil(path, marker, fmt)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        LOADERS[loader](path)
    assert not marker.exists()
    # torch.load(weights_only=True), the rule for any foreign .pt file, refuses it as well (as .pt: torch
    # hands a .safetensors name to safetensors)
    pt = path.with_suffix(".pt")
    shutil.copy(path, pt)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(pt, weights_only=True)
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_the_library():
    """Every torch.load in src/ passes weights_only=True; pickle is only used by the restricted CIFAR reader."""
    offenders = []
    for py in sorted(SRC.rglob("*.py")):
        text = py.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find("\n", m.start()) + 200]
            if "weights_only=True" not in call.split(")")[0] + ")":
                offenders.append(f"{py.relative_to(SRC)}: torch.load without weights_only=True")
        for m in re.finditer(r"\bpickle\.(loads?|Unpickler)\b", text):
            if py.name != "cifar.py":
                offenders.append(f"{py.relative_to(SRC)}: {m.group(0)}")
        if re.search(r"(?<![.\w])(eval|exec)\(", text):  # builtins, not Module.eval()
            offenders.append(f"{py.relative_to(SRC)}: eval/exec")
    assert offenders == []


def _cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("lottery: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0], out


TRAIN = ["train", *fk.SYNTH, "--epochs", "2"]


def test_cli_resume_from_a_planted_pickle_checkpoint(tmp_path, capsys):
    """A pickle where a run's checkpoint should be: the run stops with one line, nothing executed."""
    assert cli.main([*TRAIN, "--out", str(tmp_path)]) == 0
    folder = fk.one_folder(tmp_path, "train_")
    for name in ("results.json", "model.safetensors"):  # back to "killed during training"
        (folder / name).unlink()
    capsys.readouterr()
    for fmt in FORMATS:
        marker = tmp_path / f"marker-{fmt}"
        _write_evil(folder / "checkpoint.safetensors", marker, fmt)
        code, line, _ = _cli([*TRAIN, "--out", str(tmp_path)], capsys)
        assert code == 2 and "checkpoint.safetensors" in line and "corrupt" in line
        assert not marker.exists()


def _mask(model_name: str, shape) -> Mask:
    return Mask.ones(build_model(model_name, input_shape=shape, num_classes=10))


def test_mask_for_another_shape_or_model_names_the_mismatches():
    lenet8 = build_model("lenet_300_100", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(CheckpointError) as info:
        _mask("lenet_300_100", (1, 28, 28)).validate(lenet8)
    assert "shape mismatch: fc_layers.0.weight: expected (300, 64), got (300, 784)" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        _mask("conv2", (1, 8, 8)).validate(lenet8)
    msg = str(info.value)
    assert "not parameters of the model (unexpected): features.0.weight, features.2.weight" in msg
    assert "fc_layers.0.weight: expected (300, 64), got (256," in msg  # conv2's first FC layer
    partial = Mask({"fc_layers.0.weight": torch.ones(300, 64, dtype=torch.bool)})
    with pytest.raises(CheckpointError, match=r"missing from the mask: fc_layers.2.weight"):
        partial.validate(lenet8, expected_names=["fc_layers.0.weight", "fc_layers.2.weight"])


def test_corrupt_mask_files(tmp_path):
    good = tmp_path / "mask.safetensors"
    _mask("lenet_300_100", (1, 8, 8)).save(good)
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": os.urandom(256),
        "json": b'{"fc1.weight": [1, 0]}',
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="unreadable or corrupt"):
            Mask.load(path)
    from safetensors.torch import save_file

    twos = tmp_path / "twos.safetensors"
    save_file({"fc1.weight": torch.full((3, 3), 2, dtype=torch.uint8)}, str(twos))
    with pytest.raises(CheckpointError, match="values other than 0 and 1"):
        Mask.load(twos)
    with pytest.raises(CheckpointError, match="not found"):
        Mask.load(tmp_path / "missing.safetensors")


def test_cli_stability_refuses_a_mask_of_another_shape(tmp_path, capsys):
    path = tmp_path / "mask.safetensors"
    _mask("lenet_300_100", (1, 28, 28)).save(path)
    code, line, _ = _cli(["stability", *fk.SYNTH, "--epochs", "2", "--mask", str(path), "--out", str(tmp_path / "r")],
                         capsys)
    assert code == 2 and "fc_layers.0.weight: expected (300, 64), got (300, 784)" in line
    assert not list((tmp_path / "r").rglob("*checkpoint*"))  # refused before any training


def test_checkpoint_of_another_model_is_refused_naming_tensors(tmp_path):
    hp = TrainingHparams(training_steps="2ep", batch_size=32)
    x, y = blobs()
    path = tmp_path / "checkpoint.safetensors"
    other = tiny_mlp(dim=20, classes=5)  # another output layer
    save_checkpoint(path, model_state=other.state_dict(),
                    optimizer_states=[torch.optim.SGD(other.parameters(), lr=0.1).state_dict()],
                    info={"iteration": 8, "iterations_per_epoch": 8, "hparams": hp.to_dict()})
    trainer = Trainer(tiny_mlp(), TensorBatches(x, y, 32), hp, checkpoint_path=path, progress=False, log=lambda m: None)
    with pytest.raises(CheckpointError) as info:
        trainer.fit()
    msg = str(info.value)
    assert "does not fit this model" in msg and "3.weight" in msg and "torch.Size([5, 32])" in msg


def test_cli_corrupt_stage_file_is_one_line(tmp_path, capsys):
    """A stage file damaged outside lottery (here the CS rewind point) stops the run with one line naming it."""
    args = ["search", "cs", *fk.SYNTH, "--epochs", "2", "--rounds", "1", "--rewind", "2it", "--no-dense",
            "--out", str(tmp_path)]
    assert cli.main(args) == 0
    folder = fk.one_folder(tmp_path, "search-cs_")
    (folder / "results.json").unlink()
    shutil.rmtree(folder / "ticket")
    rewind = folder / "rewind.safetensors"
    rewind.write_bytes(rewind.read_bytes()[:100])
    capsys.readouterr()
    code, line, _ = _cli(args, capsys)
    assert code == 2 and "rewind.safetensors is unreadable" in line
    rewind.unlink()
    code, line, _ = _cli(args, capsys)
    assert code == 2 and "rewind.safetensors does not exist" in line


def test_library_errors_are_lottery_errors():
    assert issubclass(CheckpointError, LotteryError)
