"""Stacked training (issue 23): K networks of one architecture as one, and each member equal to its
unstacked run (same hparams, same data order)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from lottery.engine.stacking import (
    StackingError, _stack_tensors, load_member_states, stack, stack_optimizer_states, stacked_cross_entropy, unstack_optimizer_state,
    unstack_state,
)
from lottery.experiment import DenseJob, RunOptions, train_dense, train_dense_stacked
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors
from lottery.models import build_model

DATA = DataHparams(dataset="synthetic", synthetic_shape=(1, 8, 8), synthetic_train_size=300, synthetic_test_size=100,
                   val_size=50)
DATA3 = DATA.replace(synthetic_shape=(3, 16, 16))


def _members(name: str, shape, seeds=(0, 1, 2), **kw) -> list[nn.Module]:
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(build_model(name, input_shape=shape, num_classes=10, **kw))
    return out


def _options(out: Path) -> RunOptions:
    return RunOptions(out=out, progress=False, log=lambda line: None)


def _metrics(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name,shape,kw", [
    ("lenet_300_100", (1, 8, 8), {}),
    ("conv4", (1, 8, 8), {"width": 0.125}),
    ("resnet20", (3, 8, 8), {}),  # BatchNorm, residual blocks, projection shortcuts
])
def test_stacked_network_computes_every_member_and_unstacks_exactly(name, shape, kw):
    members = _members(name, shape, **kw)
    stacked = stack(members)
    x = torch.randn(5, *shape)
    for mode in (False, True):  # eval, then train (BatchNorm on batch statistics)
        stacked.train(mode)
        out = stacked(x)
        assert out.shape == (5, 3, 10)
        for i, m in enumerate(members):
            m.train(mode)
            torch.testing.assert_close(out[:, i], m(x), rtol=1e-5, atol=1e-5)
    # Running statistics were updated per member, as each member's own were.
    for i, m in enumerate(members):
        state = unstack_state(stacked, i)
        assert state.keys() == m.state_dict().keys()
        for key, value in m.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
    # And back: members' states loaded into a stack.
    fresh = stack(_members(name, shape, seeds=(5, 6, 7), **kw))
    load_member_states(fresh, [m.state_dict() for m in members])
    for i, m in enumerate(members):
        for key, value in unstack_state(fresh, i).items():
            assert torch.equal(value, m.state_dict()[key])


def test_stacking_leaves_the_global_rng_alone():
    members = _members("lenet_300_100", (1, 8, 8))
    before = torch.get_rng_state()
    stack(members)
    assert torch.equal(before, torch.get_rng_state())


class _Mixing(nn.Module):
    """A forward that reverses the channels: correct alone, wrong on stacked channels."""

    def __init__(self):
        super().__init__()
        self.input_shape = (2, 4, 4)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(3 * 16, 4)

    def forward(self, x):
        return self.fc(self.flatten(self.conv(x).flip(1)))


class _WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_shape = (1, 4, 4)
        self.flatten = nn.Flatten()
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.norm(self.flatten(x)))


@pytest.mark.parametrize("build,words", [
    (_Mixing, "mixes channels"),
    (_WithLayerNorm, "LayerNorm"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2)), "Dropout"),
])
def test_unsupported_networks_are_refused_in_one_line(build, words):
    with pytest.raises(StackingError) as info:
        stack([build(), build()])
    msg = str(info.value)
    assert words in msg and "\n" not in msg and msg.startswith("cannot stack")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_optimizer_over_the_stack_is_k_optimizers(optimizer):
    from lottery.engine import make_optimizer

    hp = TrainingHparams(optimizer=optimizer, lr=0.01, momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-3)
    members = _members("resnet20", (3, 8, 8), seeds=(0, 1))
    stacked = stack(members)
    opt = make_optimizer(stacked.parameters(), hp)
    opts = [make_optimizer(m.parameters(), hp) for m in members]
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    for _ in range(3):
        # The members' own gradients, given to the stack as they are: the optimizers alone are compared
        # (the forward pass's rounding is the equality test's business; Adam turns a gradient of 1e-9
        # into a whole step, so rounding there would say nothing about the optimizer).
        for m, o in zip(members, opts):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        grads = {n: [dict(m.named_parameters())[n].grad for m in members] for n, _ in members[0].named_parameters()}
        opt.zero_grad()
        for name, p in stacked.body.named_parameters():
            p.grad = _stack_tensors(grads[name], stacked.layout[name]).clone()
        opt.step()
        for o in opts:
            o.step()
    for i, (m, o) in enumerate(zip(members, opts)):
        state = unstack_state(stacked, i)
        for key, value in m.named_parameters():  # (only the members ran forward: their running stats moved)
            torch.testing.assert_close(state[key], value.detach(), rtol=1e-6, atol=1e-7)
        mine = unstack_optimizer_state(stacked, opt.state_dict(), i)
        theirs = o.state_dict()
        assert mine["param_groups"] == theirs["param_groups"]
        for pid, entry in theirs["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(mine["state"][pid][key], value, rtol=1e-4, atol=1e-5)
    back = stack_optimizer_states(stacked, [unstack_optimizer_state(stacked, opt.state_dict(), i) for i in range(2)])
    for pid, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["state"][pid][key], value)


@pytest.mark.parametrize("model,data,training,seeds", [
    (ModelHparams(model="lenet_300_100"), DATA,
     TrainingHparams(training_steps="2ep", batch_size=32, momentum=0.9, lr=0.05, weight_decay=1e-4,
                     data_order_seed=7, eval_every="3it"), (0, 1, 2)),
    # BatchNorm, residual blocks. A short run: a deep BatchNorm network amplifies rounding, and the stack's
    # (grouped convolutions, batched products) differs from the single network's by ~1e-7 per step; on this
    # tiny set the training losses part by 1e-5 after about 6 steps (measured: 1.7e-5 to 5.8e-5 at step 8).
    (ModelHparams(model="resnet20"), DATA3,
     TrainingHparams(training_steps="4it", batch_size=32, momentum=0.9, lr=0.01, weight_decay=1e-4,
                     data_order_seed=7, eval_every="1it"), (0, 1, 2)),
])
def test_a_stacked_member_equals_its_unstacked_run(tmp_path, model, data, training, seeds):
    jobs = [DenseJob(data=data, model=model, training=training, seed=s) for s in seeds]
    stacked = train_dense_stacked(jobs, _options(tmp_path / "stacked"))
    alone = [train_dense(j, _options(tmp_path / "alone")) for j in jobs]
    for s, a in zip(stacked, alone):
        sf, af = Path(s["run_dir"]), Path(a["run_dir"])
        assert sf.name == af.name  # the same run folder name: the same hparams
        assert (sf / "hparams.json").read_text() == (af / "hparams.json").read_text()
        assert not (sf / "checkpoint.safetensors").exists()
        assert s["stack"]["size"] == 3
        ms, ma = _metrics(sf), _metrics(af)
        assert [r.keys() for r in ms] == [r.keys() for r in ma] and len(ms) >= 3
        for rs, ra in zip(ms, ma):
            assert rs["step"] == ra["step"]
            # The criterion: the training loss trajectory to 1e-5. Evaluation losses of the BatchNorm
            # net go through running statistics of a few steps, which amplify the same rounding: 1e-3.
            assert float(rs["train_loss"]) == pytest.approx(float(ra["train_loss"]), rel=1e-5), rs["step"]
            for key in ("test_loss", "val_loss"):
                assert float(rs[key]) == pytest.approx(float(ra[key]), rel=1e-3), (key, rs["step"])
        assert s["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=1.5 / 100)  # at most one example
        ws, wa = load_tensors(sf / "model.safetensors"), load_tensors(af / "model.safetensors")
        assert ws.keys() == wa.keys()
        tol = 1e-5 if model.model == "lenet_300_100" else 1e-3  # (BatchNorm: as the evaluation losses)
        for key in wa:
            torch.testing.assert_close(ws[key], wa[key], rtol=tol, atol=tol)
        for key in ("kind", "method", "model", "dataset", "seed", "density", "epochs", "flops_per_example"):
            assert s.get(key) == a.get(key)
    # A second call reuses every finished member.
    again = train_dense_stacked(jobs, _options(tmp_path / "stacked"))
    assert [r["run_dir"] for r in again] == [r["run_dir"] for r in stacked]


def test_members_without_one_data_order_are_trained_one_by_one(tmp_path):
    lines: list[str] = []
    training = TrainingHparams(training_steps="3it", batch_size=32, eval_every="3it")  # data order = seed
    jobs = [DenseJob(data=DATA, training=training, seed=s) for s in (0, 1)]
    results = train_dense_stacked(jobs, RunOptions(out=tmp_path, progress=False, log=lines.append))
    assert [r["seed"] for r in results] == [0, 1] and all("stack" not in r for r in results)
    assert any(line.startswith("stacking refused:") and "data_order_seed" in line for line in lines)


def test_a_stack_resumes_from_its_members_checkpoints(tmp_path):
    training = TrainingHparams(training_steps="2ep", batch_size=32, momentum=0.9, data_order_seed=3, eval_every="1ep")
    jobs = [DenseJob(data=DATA, training=training, seed=s) for s in (0, 1, 2)]
    full = train_dense_stacked(jobs, _options(tmp_path / "full"))

    from lottery.engine.callbacks import Callback
    from lottery.engine import stacking

    class Stop(Exception):
        pass

    class StopAfterEpoch(Callback):
        def on_epoch_start(self, trainer, epoch):
            if epoch == 1:
                raise Stop

    original = stacking.StackedTrainer.__init__

    def interrupted(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), StopAfterEpoch()]
        original(self, *args, **kwargs)

    stacking.StackedTrainer.__init__ = interrupted
    try:
        with pytest.raises(Stop):
            train_dense_stacked(jobs, _options(tmp_path / "resumed"))
    finally:
        stacking.StackedTrainer.__init__ = original
    folders = [tmp_path / "resumed" / Path(r["run_dir"]).name for r in full]
    assert all((f / "checkpoint.safetensors").exists() for f in folders)
    # Member 2 alone resumes from the stacked checkpoint (the unstacked format); members 0 and 1 as a stack.
    lines: list[str] = []
    alone = train_dense(jobs[2], RunOptions(out=tmp_path / "resumed", progress=False, log=lines.append))
    rest = train_dense_stacked(jobs, RunOptions(out=tmp_path / "resumed", progress=False, log=lines.append))
    assert any("dense x2: resumed from 2 member checkpoints" in line for line in lines), lines
    assert "stack" in rest[0] and rest[2] == alone | {"run_dir": rest[2]["run_dir"]}
    for a, b in zip(full, [rest[0], rest[1], alone]):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
        assert _metrics(Path(a["run_dir"]))[-1]["train_loss"][:7] == _metrics(Path(b["run_dir"]))[-1]["train_loss"][:7]


def test_sweep_stacks_dense_runs_that_share_a_data_order(tmp_path):
    from lottery.sweep import expand_grid, make_spec, run_sweep

    lines: list[str] = []
    shared = TrainingHparams(training_steps="3it", batch_size=32, eval_every="3it", data_order_seed=0)
    specs = expand_grid(make_spec("train", data=DATA, training=shared), seeds=[0, 1, 2])
    # Seeds of their own data order: one line, and they run as usual.
    specs += expand_grid(make_spec("train", data=DATA, training=shared.replace(data_order_seed=None)), seeds=[0, 1])
    result = run_sweep(specs, RunOptions(out=tmp_path, progress=False, log=lines.append), backend="serial",
                       stack=2, log=lines.append)
    assert not result.failures
    stacked = [o.results.get("stack", {}).get("size") for o in result.outcomes]
    assert stacked == [2, 2, None, None, None]  # seed 2 alone in the second stack of two: unstacked
    assert any(line.startswith("stack: 2 dense runs as one") for line in lines)
    assert any(line.startswith("stack: 2 dense job(s) share their data order with no other") for line in lines)
    # Again: every run is reused, stacked or not.
    again = run_sweep(specs, RunOptions(out=tmp_path, progress=False, log=lines.append), backend="serial", stack=2,
                      log=lines.append)
    assert [o.results["run_dir"] for o in again.outcomes] == [o.results["run_dir"] for o in result.outcomes]


class _LinearBatchNorm(nn.Module):
    """Linear -> BatchNorm1d: the BatchNorm needs (B, K*O), so the (B, K, O) hand-over must be undone."""

    def __init__(self):
        super().__init__()
        self.input_shape = (1, 4, 4)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(self.flatten(x)))))


@pytest.mark.parametrize("build,shared,keep", [
    (lambda: build_model("lenet_300_100", input_shape=(1, 8, 8), num_classes=10), True, True),
    (lambda: build_model("conv4", input_shape=(1, 8, 8), num_classes=10, width=0.125), True, True),
    (_LinearBatchNorm, True, False),
])
def test_fast_layouts_where_the_check_passes(build, shared, keep):
    torch.manual_seed(0)
    members = [build(), build(), build()]
    stacked = stack(members)
    linears = [m for m in stacked.body.modules() if hasattr(m, "keep_members")]
    assert stacked.shared_input is shared and {m.keep_members for m in linears} == {keep}
    stacked.train()
    x = torch.randn(6, *members[0].input_shape)
    out = stacked(x)
    for i, m in enumerate(members):
        m.train()
        torch.testing.assert_close(out[:, i], m(x), rtol=1e-5, atol=1e-5)
