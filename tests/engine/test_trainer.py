import pytest
import torch

from conftest import TensorBatches, blobs, tiny_mlp
from lottery.engine import Callback, Trainer, evaluate, load_checkpoint, make_optimizer
from lottery.errors import CheckpointError, NumericalError
from lottery.hparams import TrainingHparams

HP = TrainingHparams(training_steps="4ep", batch_size=32, lr=0.1, momentum=0.9, weight_decay=1e-4,
                     schedule="multistep", milestones=("2ep",))


def _run(tiny_data, path=None, callbacks=(), hp=HP):
    train, test = tiny_data
    model = tiny_mlp()
    trainer = Trainer(model, train, hp, eval_loaders={"test": test}, checkpoint_path=path,
                      callbacks=list(callbacks), progress=False, log=lambda m: None)
    trainer.fit()
    return model, trainer


def test_training_reduces_loss_and_records_metrics(tiny_data):
    train, test = tiny_data
    before = evaluate(tiny_mlp(), test)
    model, trainer = _run(tiny_data)
    after = evaluate(model, test)
    assert after["loss"] < before["loss"]
    assert after["top1"] > 0.8
    assert [r["step"] for r in trainer.history] == [8, 16, 24, 32]
    assert trainer.history[-1]["test_accuracy"] == pytest.approx(after["top1"])
    assert trainer.history[-1]["lr"] == pytest.approx(0.01)


def test_same_seed_same_weights(tiny_data):
    a, _ = _run(tiny_data)
    b, _ = _run(tiny_data)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


class Crash(Callback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer):
        if trainer.iteration == self.at:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("crash_at", [3, 8, 13, 30])
def test_resume_is_bit_for_bit(tiny_data, tmp_path, crash_at):
    """Killed mid-epoch (or right after a checkpoint) and restarted: the same weights as uninterrupted."""
    reference, ref_trainer = _run(tiny_data)
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_data, path, callbacks=[Crash(crash_at)])
    resumed, trainer = _run(tiny_data, path)
    assert trainer.iteration == ref_trainer.iteration
    for k, v in reference.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert [r["step"] for r in trainer.history] == [r["step"] for r in ref_trainer.history]
    assert trainer.history[-1]["test_accuracy"] == ref_trainer.history[-1]["test_accuracy"]


def test_resume_moves_the_model_to_its_device_before_loading_optimizer_state(tiny_data, tmp_path, monkeypatch):
    """torch puts loaded optimizer state (momentum) on the device its parameter is on at load time; loaded
    before the model moved to the GPU, it stayed on the CPU and the first step of a resumed GPU run failed
    ("Expected all tensors to be on the same device"; seen on an H200). A CPU-only machine cannot show the
    failure itself (tests/test_cuda.py does on a GPU), so this pins the order that prevents it."""
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_data, path, callbacks=[Crash(10)])
    events: list[str] = []
    real_load = torch.optim.SGD.load_state_dict

    def recording_load(self, state):
        events.append("optimizer state loaded")
        return real_load(self, state)

    monkeypatch.setattr(torch.optim.SGD, "load_state_dict", recording_load)
    train, test = tiny_data
    model = tiny_mlp()
    real_to = model.to
    model.to = lambda *a, **k: (events.append("model moved"), real_to(*a, **k))[1]
    Trainer(model, train, HP, eval_loaders={"test": test}, checkpoint_path=path, progress=False,
            log=lambda m: None).fit()
    assert "optimizer state loaded" in events and "model moved" in events
    assert events.index("model moved") < events.index("optimizer state loaded")


def test_start_mid_run_uses_schedule_from_there(tiny_data):
    train, _ = tiny_data
    seen = []

    class Record(Callback):
        def on_step_start(self, trainer):
            seen.append((trainer.iteration, trainer.lr()))

    trainer = Trainer(tiny_mlp(), train, HP, start="2ep3it", callbacks=[Record()], progress=False, log=lambda m: None)
    trainer.fit()
    assert seen[0] == (19, pytest.approx(0.01))
    assert seen[-1][0] == 31 and len(seen) == 13


@pytest.mark.parametrize("defer", [False, True])
def test_nan_loss_stops_with_step_and_hint(tiny_data, tmp_path, defer):
    """At once (the CPU's default) or deferred (a GPU's: no read-back every step), a non-finite loss stops the
    run naming its first bad step, and no checkpoint holds what followed it."""
    train, _ = tiny_data

    class Poison(Callback):
        def extra_loss(self, trainer):
            return torch.tensor(float("nan")) if trainer.iteration in (10, 11) else None

    model = tiny_mlp()
    path = tmp_path / "c.safetensors"
    trainer = Trainer(model, train, HP, callbacks=[Poison()], checkpoint_path=path, progress=False, log=lambda m: None,
                      defer_loss_check=defer)
    with pytest.raises(NumericalError, match=r"step 1ep2it.*learning rate"):
        trainer.fit()
    assert load_checkpoint(path).info["iteration"] == 8  # the last good checkpoint is kept
    assert trainer.iteration == (16 if defer else 10)  # deferred: noticed before the epoch's end is saved


def test_loss_check_is_at_once_on_the_cpu_and_deferred_elsewhere(tiny_data):
    train, _ = tiny_data
    assert Trainer(tiny_mlp(), train, HP, progress=False).defer_loss_check is False
    assert Trainer(tiny_mlp(), train, HP, progress=False, defer_loss_check=True).defer_loss_check is True


def test_corrupt_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        _run(tiny_data, path)


def test_checkpoint_of_other_hparams_is_refused(tiny_data, tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_data, path, callbacks=[Crash(10)])
    with pytest.raises(CheckpointError, match="other training hparams"):
        _run(tiny_data, path, hp=HP.replace(lr=0.05))


def test_two_optimizers_follow_the_schedule(tiny_data):
    train, _ = tiny_data
    model = tiny_mlp()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    opts = [make_optimizer(first, HP), make_optimizer(second, HP, weight_decay=0.0)]
    Trainer(model, train, HP, optimizers=opts, progress=False, log=lambda m: None).fit()
    assert opts[1].param_groups[0]["weight_decay"] == 0.0
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.01) == opts[1].param_groups[0]["lr"]


@pytest.mark.parametrize("steps,expected", [
    ("13it", ["train iteration 8/13", "train iteration 13/13"]),  # 8 iterations per epoch: 1.625 epochs
    ("2ep", ["train epoch 1/2", "train epoch 2/2"]),
])
def test_log_lines_count_whole_iterations_or_whole_epochs(tiny_data, steps, expected):
    """A run that ends inside an epoch prints iterations (never ``epoch 1/1.625``); one that ends at an
    epoch boundary prints epochs; both as whole numbers."""
    train, test = tiny_data
    lines: list[str] = []
    Trainer(tiny_mlp(), train, HP.replace(training_steps=steps, milestones=("1ep",)), eval_loaders={"test": test},
            progress=False, log=lines.append).fit()
    assert [line.split("  ")[0] for line in lines] == expected


def test_no_progress_bar_into_a_stream_that_is_not_a_terminal(tiny_data, capsys):
    """progress=True draws a bar on a terminal only; into a pipe or a file (pytest's capture here) the
    log has its lines and no bar."""
    train, test = tiny_data
    lines: list[str] = []
    Trainer(tiny_mlp(), train, HP.replace(training_steps="2ep", milestones=("1ep",)), eval_loaders={"test": test},
            progress=True, log=lines.append).fit()
    captured = capsys.readouterr()
    assert len(lines) == 2
    assert captured.err == "" and captured.out == ""


def _conv_data(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 2, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorBatches(x, y, 16, seed=0)


def _conv_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 3))


def _fit_conv(model, monkeypatch, setting, path=None, callbacks=(), lines=None):
    monkeypatch.setenv("LOTTERY_CHANNELS_LAST", setting)
    hp = TrainingHparams(training_steps="3ep", batch_size=16, lr=0.05, momentum=0.9)
    trainer = Trainer(model, _conv_data(), hp, checkpoint_path=path, callbacks=list(callbacks), progress=False,
                      log=(lines.append if lines is not None else lambda m: None))
    trainer.fit()
    return trainer


def test_conv_nets_train_in_channels_last_on_the_cpu_with_the_same_losses(monkeypatch):
    nhwc, nchw = _conv_net(), _conv_net()
    a = _fit_conv(nhwc, monkeypatch, "auto")
    b = _fit_conv(nchw, monkeypatch, "0")
    assert nhwc[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert nchw[0].weight.is_contiguous() and not nchw[0].weight.is_contiguous(memory_format=torch.channels_last)
    # The same arithmetic in another order of additions: equal to rounding over 12 steps.
    for (ka, va), (kb, vb) in zip(nhwc.state_dict().items(), nchw.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=ka)
    assert float(a.last_loss) == pytest.approx(float(b.last_loss), rel=1e-4)


def test_channels_last_resume_is_bit_for_bit(monkeypatch, tmp_path):
    reference = _conv_net()
    _fit_conv(reference, monkeypatch, "auto")
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _fit_conv(_conv_net(), monkeypatch, "auto", path, callbacks=[Crash(6)])
    resumed = _conv_net()
    _fit_conv(resumed, monkeypatch, "auto", path)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


class _ViewAfterConv(torch.nn.Module):
    """A user's model that assumes contiguous NCHW activations: ``.view`` fails in channels_last."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.shape[0], -1))


def test_a_model_that_fails_in_channels_last_trains_in_the_default_layout_after_one_line(monkeypatch):
    lines: list[str] = []
    model = _ViewAfterConv()
    _fit_conv(model, monkeypatch, "auto", lines=lines)
    said = [line for line in lines if "channels_last" in line]
    assert len(said) == 1 and "default memory layout" in said[0], lines
    assert model.conv.weight.is_contiguous()


def test_a_bad_channels_last_setting_is_one_line(monkeypatch):
    with pytest.raises(Exception, match="LOTTERY_CHANNELS_LAST='sometimes': use auto, 0 or 1"):
        _fit_conv(_conv_net(), monkeypatch, "sometimes")
