"""Numerical faults: a NaN or Inf loss (or weights) stops the run with the step and a hint, and keeps the
last good checkpoint, from which the run continues unchanged once the cause is gone."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import faultkit as fk  # noqa: E402

from conftest import TensorBatches, blobs, tiny_mlp  # noqa: E402
from lottery import cli  # noqa: E402
from lottery.engine import Callback, Trainer, load_checkpoint  # noqa: E402
from lottery.errors import NumericalError  # noqa: E402
from lottery.hparams import TrainingHparams  # noqa: E402

HP = TrainingHparams(training_steps="3ep", batch_size=32, lr=0.1, momentum=0.9)
IPE = 8


class PoisonLoss(Callback):
    """Adds ``value`` to the loss at one iteration (a penalty that overflowed, say)."""

    def __init__(self, at, value):
        self.at, self.value = at, value

    def extra_loss(self, trainer):
        return torch.tensor(self.value) if trainer.iteration == self.at else None


class LRSpike(Callback):
    """One step with an infinite learning rate (a schedule dividing by zero): its loss is finite, the weights
    it leaves are not."""

    def __init__(self, at):
        self.at = at

    def on_step_start(self, trainer):
        if trainer.iteration == self.at:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = float("inf")


class NaNWeight(Callback):
    """A weight turns NaN after a step (a bit flip, a broken custom op): the loss of that step was fine."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer):
        if trainer.iteration == self.at:
            with torch.no_grad():
                next(trainer.model.parameters())[0, 0] = float("nan")


class NaNBatches(TensorBatches):
    """A loader whose batch number ``at`` (counted over the whole run) holds a NaN pixel (corrupt data)."""

    def __init__(self, *a, at, **kw):
        super().__init__(*a, **kw)
        self.at = at

    def __iter__(self):
        for i, (x, y) in enumerate(super().__iter__()):
            if self.epoch * len(self) + i == self.at:
                x = x.clone()
                x[0, 0] = float("nan")
            yield x, y


def _train(path, callbacks=(), loader=None):
    x, y = blobs()
    model = tiny_mlp()
    trainer = Trainer(model, loader or TensorBatches(x, y, 32), HP, checkpoint_path=path,
                      callbacks=list(callbacks), progress=False, log=lambda m: None)
    trainer.fit()
    return model


def _nan_loader():
    x, y = blobs()
    return NaNBatches(x, y, 32, at=12)


FAULTS = {
    "nan-loss": (lambda: [PoisonLoss(10, float("nan"))], None, r"loss became nan at step 1ep2it \(iteration 10\)"),
    "inf-loss": (lambda: [PoisonLoss(13, float("inf"))], None, r"loss became inf at step 1ep5it \(iteration 13\)"),
    "-inf-loss": (lambda: [PoisonLoss(9, float("-inf"))], None, r"loss became -inf at step 1ep1it \(iteration 9\)"),
    "nan-input": (lambda: [], _nan_loader, r"loss became nan at step 1ep4it \(iteration 12\)"),
    # the last step of epoch 2 breaks the weights while its own loss is finite: caught before the checkpoint
    "lr-spike": (lambda: [LRSpike(2 * IPE - 1)], None, r"weights became infinite or NaN by step 2ep \(iteration 16"),
    "nan-weight": (lambda: [NaNWeight(2 * IPE)], None, r"weights became infinite or NaN by step 2ep \(iteration 16"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_non_finite_stops_with_step_and_hint_and_keeps_last_good_checkpoint(tmp_path, fault):
    callbacks, loader, expected = FAULTS[fault]
    path = tmp_path / "checkpoint.safetensors"
    with pytest.raises(NumericalError) as info:
        _train(path, callbacks(), loader() if loader else None)
    msg = str(info.value)
    assert re.search(expected, msg), msg
    lr = "inf" if fault == "lr-spike" else "0.1"
    assert "last good checkpoint is kept" in msg and f"smaller learning rate (now {lr})" in msg and "(lam)" in msg
    ckpt = load_checkpoint(path)
    assert ckpt.info["iteration"] == IPE  # epoch 1's: nothing after the fault was saved
    assert all(bool(torch.isfinite(v).all()) for v in ckpt.model_state.values())
    # The cause gone (a smaller LR, clean data), the run continues from that checkpoint as if nothing happened.
    assert all(torch.equal(a, b) for a, b in zip(_train(path).state_dict().values(), _train(None).state_dict().values()))


def _cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("lottery: error:")]
    return code, lines, err


def test_cli_exploding_lr_is_one_line_with_step_and_lr(tmp_path, capsys):
    code, lines, err = _cli(["train", *fk.SYNTH, "--epochs", "2", "--lr", "1e38", "--out", str(tmp_path)], capsys)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(r"(loss|weights) became .* step \w+ \(iteration \d+\)", lines[0]) and "learning rate (now 1e+38)" in lines[0]
    assert not list(tmp_path.glob("*/results.json"))  # no result from a diverged run


def test_cli_huge_cs_penalty_names_lam(tmp_path, capsys):
    code, lines, err = _cli(["search", "cs", *fk.SYNTH, "--epochs", "2", "--rewind", "2it", "--no-dense",
                             "--lam", "1e38", "--out", str(tmp_path)], capsys)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "loss became inf at step 0ep (iteration 0)" in lines[0] and "smaller penalty (lam)" in lines[0]
