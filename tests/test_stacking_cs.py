"""Stacked CS ticket searches (issue 23): each member of a stack writes the run folder of the unstacked
search of its hparams, with the same loss trajectory and the same mask."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lottery.experiment import RunOptions
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors
from lottery.methods.cs import CSHparams
from lottery.pipelines.cs import CSJob, run_cs
from lottery.pipelines.cs_stacked import run_cs_stacked

DATA = DataHparams(dataset="synthetic", synthetic_shape=(1, 8, 8), synthetic_train_size=256, synthetic_test_size=64,
                   val_size=64)
TRAINING = TrainingHparams(training_steps="2ep", batch_size=32, momentum=0.9, lr=0.05, weight_decay=1e-4,
                           eval_every="4it", data_order_seed=5)
# Two rounds of 1 epoch (the reset between rounds runs), rewind at 2 iterations; members differ in s0
# (a scale and a reset cap of their own), lam and the initialisation seed.
CS = CSHparams(rounds=2, round_steps="1ep", rewind="2it", beta_final=200.0)
MEMBERS = [(0.05, 1e-6, 0), (-0.02, 1e-5, 0), (0.0, 3e-6, 1)]


def _jobs(model: ModelHparams = ModelHparams(model="lenet_300_100")) -> list[CSJob]:
    return [CSJob(DATA, model, TRAINING, CS.replace(s0=s0, lam=lam), seed=seed, dense_reference=False)
            for s0, lam, seed in MEMBERS]


def _options(out: Path, lines: list[str] | None = None) -> RunOptions:
    return RunOptions(out=out, progress=False, log=(lines.append if lines is not None else lambda line: None))


def _metrics(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_stacked_cs_member_equals_its_unstacked_search(tmp_path):
    lines: list[str] = []
    jobs = _jobs()
    stacked = run_cs_stacked(jobs, _options(tmp_path / "stacked", lines))
    assert any(line.startswith("stack: 3 CS searches as one network") for line in lines), lines
    alone = [run_cs(j, _options(tmp_path / "alone")) for j in jobs]
    densities = set()
    for s, a in zip(stacked, alone):
        sf, af = Path(s["run_dir"]), Path(a["run_dir"])
        assert sf.name == af.name and (sf / "hparams.json").read_text() == (af / "hparams.json").read_text()
        assert s["stack"]["size"] == 3 and s["stack"]["ticket_stack_size"] == 3 and s["stack"]["data_order"] == 5
        # The loss trajectory (search rounds and ticket) to 1e-5, row by row, with the same columns.
        ms, ma = _metrics(sf), _metrics(af)
        assert list(ms[0].keys()) == list(ma[0].keys()) and len(ms) == len(ma) >= 6
        assert {r["stage"] for r in ms} == {"round_0", "round_1", "ticket"}
        for rs, ra in zip(ms, ma):
            assert (rs["stage"], rs["step"]) == (ra["stage"], ra["step"])
            assert float(rs["train_loss"]) == pytest.approx(float(ra["train_loss"]), rel=1e-5), (rs["stage"], rs["step"])
            if rs["stage"] != "ticket":
                assert float(rs["density"]) == pytest.approx(float(ra["density"]), abs=2e-4)
                assert float(rs["penalty"]) == pytest.approx(float(ra["penalty"]), rel=1e-4)
        # The same mask, but for logits within rounding of 0.
        mask_s, mask_a = load_tensors(sf / "mask.safetensors"), load_tensors(af / "mask.safetensors")
        logits = load_tensors(af / "round_1" / "state.safetensors")
        assert mask_s.keys() == mask_a.keys()
        for name in mask_a:
            differ = mask_s[name] != mask_a[name]
            near_zero = logits[name + "_mask_logits"].abs() < 1e-4
            assert not (differ & ~near_zero).any(), name
        # Each file an unstacked search writes, with the same keys (rewind point, round states, ticket).
        for rel in ("rewind.safetensors", "round_0/state.safetensors", "round_1/state.safetensors",
                    "ticket/model.safetensors"):
            ws, wa = load_tensors(sf / rel), load_tensors(af / rel)
            assert list(ws.keys()) == list(wa.keys()), rel
            for key in wa:
                torch.testing.assert_close(ws[key], wa[key], rtol=1e-4, atol=1e-4)
        assert not any(sf.rglob("checkpoint.safetensors"))
        hs = json.loads((sf / "round_0" / "history.json").read_text())
        ha = json.loads((af / "round_0" / "history.json").read_text())
        assert hs["convergence"].keys() == ha["convergence"].keys()
        for key in ("soft_val_accuracy", "hard_val_accuracy", "undecided"):  # (accuracies measured as one stack)
            assert hs["convergence"][key] == pytest.approx(ha["convergence"][key], abs=1.5 / 64), key
        assert set(s) - {"stack"} == set(a)
        for key in ("s0", "lam", "seed", "rounds", "search_epochs", "epochs", "prunable_weights", "flops_dense"):
            assert s[key] == a[key], key
        assert s["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=1.5 / 64)  # at most one example
        densities.add(s["density"])
    assert len(densities) == 3  # the members really are different searches
    # Again: every member is reused.
    again = run_cs_stacked(jobs, _options(tmp_path / "stacked"))
    assert [r["run_dir"] for r in again] == [r["run_dir"] for r in stacked]


def test_sweep_stacks_cs_searches_and_runs_the_others_unstacked(tmp_path):
    from lottery.sweep import expand_grid, make_spec, run_sweep

    lines: list[str] = []
    base = make_spec("cs", data=DATA, model=ModelHparams(model="lenet_300_100"),
                     training=TRAINING.replace(training_steps="1ep", eval_every="1ep"),
                     cs=CS.replace(rounds=1, lam=1e-6), dense_reference=False)
    specs = expand_grid(base, {"s0": [0.05, 0.0]}, seeds=[0])
    specs += expand_grid(base, {"density": [0.3]}, seeds=[0])  # not stacked: one line, then a worker runs it
    result = run_sweep(specs, _options(tmp_path, lines), backend="serial", stack="auto", log=lines.append)
    assert not result.failures, [o.error for o in result.failures]
    assert [(o.results.get("stack") or {}).get("size") for o in result.outcomes] == [2, 2, None]
    assert any(line.startswith("stack: 2 CS searches as one") for line in lines), lines
    assert any(line.startswith("stack: --stack auto: stacks of 2 for LeNet (50,610 parameters") and
               line.endswith("limited by the number of runs that can share a stack") for line in lines), lines
    assert any(line == "stack: 1 CS job(s) run unstacked: searches with a target density (--density) are not stacked"
               for line in lines), lines
    from lottery.report.summary import find_results

    records = find_results([tmp_path])  # what `lottery report` reads: stacked and unstacked folders alike
    assert sorted(r["s0"] for r in records) == sorted(o.results["s0"] for o in result.outcomes)


def test_auto_stack_size_is_bounded_by_the_cpu_cap_and_by_memory(monkeypatch):
    import os

    from lottery.experiment import AUTO_STACK_CPU, auto_stack_size
    from lottery.models import build_model

    model = build_model("lenet_300_100", input_shape=(1, 28, 28), num_classes=10)
    k, why = auto_stack_size(model, "cpu", 50)
    assert k == AUTO_STACK_CPU and why.endswith("the largest CPU stack measured")
    pages = {"SC_AVPHYS_PAGES": 3 * 266_610 * 56 * 4 // 4096 + 1, "SC_PAGE_SIZE": 4096}  # 3 members' state x 4
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    k, why = auto_stack_size(model, "cpu", 50)
    assert k == 3 and "limited by a quarter of the free CPU memory" in why and "\n" not in why


@pytest.mark.parametrize("name,shape,kw", [("conv4", (1, 8, 8), {"width": 0.125}),
                                           ("resnet20", (3, 8, 8), {})])  # grouped convs, BatchNorm
def test_stacked_soft_masks_compute_each_members_own_s0(name, shape, kw):
    from lottery import masking
    from lottery.engine.stacking import _member_slice, _stack_tensors, stack
    from lottery.models import build_model

    s0s, seeds = [0.05, -0.02, 0.0], [0, 0, 1]

    def member(seed):
        torch.manual_seed(seed)
        return build_model(name, input_shape=shape, num_classes=10, **kw)

    members, stacked = [member(s) for s in seeds], stack([member(s) for s in seeds])
    names = list(masking.prunable_weights(members[0]))
    shapes = {n: _member_slice(p, stacked.layout[n], 0, 3).shape for n, p in stacked.body.named_parameters()}
    masking.attach_soft_mask(stacked.body, {n: _stack_tensors([torch.full(shapes[n], s) for s in s0s], stacked.layout[n])
                                            for n in names})
    masking.set_member_s0(stacked.body, s0s)
    for m, s in zip(members, s0s):
        masking.attach_soft_mask(m, names, s0=s)
    x = torch.randn(8, *shape)
    for beta in (1.0, 50.0):
        for net in (stacked, *members):
            masking.set_temperature(net, beta)
            net.train()
        out = stacked(x)
        for i, m in enumerate(members):
            torch.testing.assert_close(out[:, i], m(x), rtol=1e-5, atol=1e-5)
    # The reset between rounds caps each member's logits at its own s0.
    with torch.no_grad():
        for logits in masking.mask_logits(stacked.body).values():
            logits.uniform_(-1, 1)
    masking.cs_reset_logits_(stacked.body, 200.0)
    for name_, logits in masking.mask_logits(stacked.body).items():
        for i, s0 in enumerate(s0s):
            part = _member_slice(logits.detach(), stacked.layout[name_], i, 3)
            assert part.max() == pytest.approx(s0) and part.min() < -1


def test_a_stack_killed_after_a_round_resumes_as_a_stack_from_that_round(tmp_path):
    from lottery.engine import stacking
    from lottery.engine.callbacks import Callback

    jobs = _jobs()[:2]
    full = run_cs_stacked(jobs, _options(tmp_path / "full"))

    class Stop(Exception):
        pass

    class StopInRound1(Callback):
        def on_fit_start(self, trainer):
            if trainer.desc.startswith("cs round 2/"):
                raise Stop

    original = stacking.StackedTrainer.__init__

    def interrupted(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), StopInRound1()]
        original(self, *args, **kwargs)

    stacking.StackedTrainer.__init__ = interrupted
    try:
        with pytest.raises(Stop):
            run_cs_stacked(jobs, _options(tmp_path / "resumed"))
    finally:
        stacking.StackedTrainer.__init__ = original
    lines: list[str] = []
    resumed = run_cs_stacked(jobs, _options(tmp_path / "resumed", lines))
    assert any(line == "stack: 2 CS searches resume as a stack after round 1" for line in lines), lines
    for f, r in zip(full, resumed):
        assert r["stack"]["size"] == 2 and Path(f["run_dir"]).name == Path(r["run_dir"]).name
        assert [c["round"] for c in r["convergence"]] == [0, 1]
        mf, mr = _metrics(Path(f["run_dir"])), _metrics(Path(r["run_dir"]))
        assert [(x["stage"], x["step"]) for x in mf] == [(x["stage"], x["step"]) for x in mr]
        for x, y in zip(mf, mr):
            assert float(x["train_loss"]) == pytest.approx(float(y["train_loss"]), rel=1e-5)
        assert r["density"] == f["density"]
    # Members at different rounds (one's search finished but for its mask, one's folder deleted) go on alone.
    import shutil

    shutil.rmtree(Path(resumed[1]["run_dir"]))
    (Path(resumed[0]["run_dir"]) / "results.json").unlink()
    (Path(resumed[0]["run_dir"]) / "mask.safetensors").unlink()
    lines.clear()
    again = run_cs_stacked(jobs, _options(tmp_path / "resumed", lines))
    assert "stack" not in again[0] and "stack" not in again[1]
    assert "stack: 1 CS search(es) with 2 finished round(s) on disk finish unstacked" in lines, lines
    assert again[0]["density"] == full[0]["density"] and again[1]["density"] == full[1]["density"]


def test_a_member_that_diverges_stops_the_stack_and_the_members_finish_unstacked(tmp_path, monkeypatch):
    from lottery.engine import stacking
    from lottery.errors import NumericalError

    jobs = _jobs()[:2]
    alone = [run_cs(j, _options(tmp_path / "alone")) for j in jobs]
    original = stacking.StackedTrainer._train_step

    def diverge_in_round_2(self, x, y):
        if self.desc.startswith("cs round 2/") and self.iteration == 3:
            raise NumericalError("the loss became nan at step 3 (stacked members [1])")
        original(self, x, y)

    monkeypatch.setattr(stacking.StackedTrainer, "_train_step", diverge_in_round_2)
    lines: list[str] = []
    results = run_cs_stacked(jobs, _options(tmp_path / "stacked", lines))
    assert any(line.startswith("stack: the loss became nan at step 3") and
               line.endswith("the 2 searches finish unstacked") for line in lines), lines
    for r, a in zip(results, alone):  # round 1 from the stack, round 2 and the ticket alone
        assert "stack" not in r and r["density"] == a["density"]
        assert r["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=1.5 / 64)
