"""The resumable stochastic-L0 and GMP jobs on tiny synthetic data: folder contents, results.json and
mask.safetensors, the ticket (rewind state x mask from k, exact zeros), the pruned network (= the gated
network in eval mode), resuming after an interruption, sweeps and the command line."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lottery.pipelines.gmp as gmp_pipe
import lottery.pipelines.l0 as l0_pipe
from lottery import cli
import lottery.cli.cs as cli_cs
import lottery.cli.common as cli_common
from lottery.cli.l0gmp import register
from lottery.engine import Callback
from lottery.errors import ConfigError
from lottery.experiment import RunOptions
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json
from lottery.masks import Mask
from lottery.methods.gmp import GMPHparams
from lottery.methods.imp import kept_count
from lottery.methods.l0 import L0Hparams, attach_l0_gates, l0_hard_mask
from lottery.models import build_model
from lottery.pipelines.gmp import GMPJob, run_gmp
from lottery.pipelines.l0 import L0Job, run_l0

# 200 images of 1x8x8, 40 held out: 160 / 32 = 5 iterations per epoch
DATA = DataHparams(dataset="synthetic", synthetic_shape=(1, 8, 8), synthetic_train_size=200, synthetic_test_size=100,
                   val_size=40)
IPE = 5
MODEL = ModelHparams("lenet_300_100")
TRAIN = TrainingHparams(training_steps="2ep", batch_size=32, lr=0.05, momentum=0.9)
# log_alpha starts near the pruning threshold log(-gamma/zeta) = -2.4, so that 10 steps prune part of the weights
L0 = L0Hparams(lam=2e-3, gate_lr=0.05, init_drop_rate=0.9, init_std=0.3, rewind="3it")
L0_JOB = L0Job(DATA, MODEL, TRAIN, L0)
GMP = GMPHparams(density=0.05, prune_start="1ep", prune_end="2ep", prune_every="2it")
GMP_JOB = GMPJob(DATA, MODEL, TRAIN.replace(training_steps="3ep"), GMP)
PRUNABLE = ["fc_layers.0.weight", "fc_layers.2.weight"]  # lenet_300_100 keeps its output layer dense


def _options(out: Path, logs: list | None = None) -> RunOptions:
    return RunOptions(out=out, progress=False, log=(logs.append if logs is not None else (lambda m: None)))


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


class _Interrupt(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer):
        if trainer.iteration == self.at:
            raise KeyboardInterrupt


class _StateAt(Callback):
    def __init__(self, at: int, record: dict):
        self.at, self.record = at, record

    def on_step_end(self, trainer):
        if trainer.iteration == self.at:
            sd = trainer.model.state_dict()
            self.record["state_at_k"] = {k: v.detach().clone() for k, v in sd.items() if not k.endswith("_log_alpha")}


@pytest.fixture(scope="module")
def l0_ticket(tmp_path_factory):
    """One uninterrupted, instrumented L0 ticket search with its dense reference."""
    out = tmp_path_factory.mktemp("l0")
    record: dict = {}
    original = l0_pipe.search_callbacks

    class CheckedEnforce(l0_pipe.EnforceMaskCallback):
        def on_fit_start(self, trainer):
            super().on_fit_start(trainer)
            record["ticket_start"] = trainer.iteration
            record["ticket_state"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(l0_pipe, "search_callbacks", lambda hp: [*original(hp), _StateAt(3, record)])
        mp.setattr(l0_pipe, "EnforceMaskCallback", CheckedEnforce)
        results = run_l0(L0_JOB, _options(out))
    return SimpleNamespace(out=out, folder=Path(results["run_dir"]), results=results, record=record)


# -- stochastic L0 ----------------------------------------------------------------------------------------
def test_l0_ticket_folder_and_results(l0_ticket):
    folder, r = l0_ticket.folder, l0_ticket.results
    assert folder.name.startswith("search-l0_lenet_300_100_synthetic_s0_")
    for f in ("hparams.json", "rewind.safetensors", "search/state.safetensors", "search/history.json",
              "mask.safetensors", "mask.json", "ticket/model.safetensors", "metrics.csv", "results.json"):
        assert (folder / f).exists(), f
    assert not list(folder.rglob("checkpoint.safetensors"))
    assert read_json(folder / "results.json") == r
    assert (r["kind"], r["method"], r["mode"], r["lam"], r["rewind"]) == ("search-l0", "l0", "ticket", 2e-3, "3it")
    mask = Mask.load(folder / "mask.safetensors")
    assert list(mask) == PRUNABLE
    assert r["density"] == mask.density() and r["kept_weights"] == mask.num_kept()
    assert 0 < r["density"] < 1  # partly pruned
    assert r["epochs"] == pytest.approx(2 + (10 - 3) / IPE) and r["search_epochs"] == 2
    assert r["test_accuracy"] is not None and r["dense_test_accuracy"] is not None
    assert {row["stage"] for row in _rows(folder)} == {"search", "ticket"}


def test_l0_mask_is_z_positive_of_the_final_search_state(l0_ticket):
    model = build_model("lenet_300_100", input_shape=(1, 8, 8), num_classes=10)
    attach_l0_gates(model, PRUNABLE)
    model.load_state_dict(load_tensors(l0_ticket.folder / "search/state.safetensors"))
    assert l0_hard_mask(model) == Mask.load(l0_ticket.folder / "mask.safetensors")


def test_l0_ticket_is_rewind_state_times_mask_from_k(l0_ticket):
    rec = l0_ticket.record
    rewind = load_tensors(l0_ticket.folder / "rewind.safetensors")
    assert not any(k.endswith("_log_alpha") for k in rewind)
    assert set(rewind) == set(rec["state_at_k"])
    for k, v in rewind.items():
        assert torch.equal(v, rec["state_at_k"][k]), k
    mask = Mask.load(l0_ticket.folder / "mask.safetensors")
    assert rec["ticket_start"] == 3
    for n, m in mask.items():
        torch.testing.assert_close(rec["ticket_state"][n], rewind[n] * m, rtol=0, atol=0)
    final = load_tensors(l0_ticket.folder / "ticket/model.safetensors")
    assert not any(k.endswith("_mask") or k.endswith("_log_alpha") for k in final)
    for n, m in mask.items():
        assert torch.all(final[n][~m] == 0)


def test_l0_finished_run_is_reused(l0_ticket):
    logs: list[str] = []
    again = run_l0(L0_JOB, _options(l0_ticket.out, logs))
    assert again == l0_ticket.results
    assert any("already finished" in line for line in logs)


def test_l0_resumes_after_interruptions_to_the_same_result(l0_ticket, tmp_path):
    original = l0_pipe.search_callbacks
    with pytest.MonkeyPatch.context() as mp:  # killed in the second epoch of the search
        mp.setattr(l0_pipe, "search_callbacks", lambda hp: [*original(hp), _Interrupt(7)])
        with pytest.raises(KeyboardInterrupt):
            run_l0(L0_JOB, _options(tmp_path))

    class Killed(l0_pipe.EnforceMaskCallback):
        def on_step_end(self, trainer):
            super().on_step_end(trainer)
            if trainer.iteration == 8:
                raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:  # then killed while retraining the ticket
        mp.setattr(l0_pipe, "EnforceMaskCallback", Killed)
        with pytest.raises(KeyboardInterrupt):
            run_l0(L0_JOB, _options(tmp_path))
    folder = tmp_path / l0_ticket.folder.name
    assert (folder / "search/state.safetensors").exists() and (folder / "ticket/checkpoint.safetensors").exists()
    r = run_l0(L0_JOB, _options(tmp_path))
    base = l0_ticket.results
    for key in ("density", "kept_weights", "test_accuracy", "val_accuracy", "search_test_accuracy", "epochs"):
        assert r[key] == base[key], key
    assert Mask.load(folder / "mask.safetensors") == Mask.load(l0_ticket.folder / "mask.safetensors")
    for k, v in load_tensors(folder / "ticket/model.safetensors").items():
        assert torch.equal(v, load_tensors(l0_ticket.folder / "ticket/model.safetensors")[k]), k


def test_l0_prune_mode_is_the_eval_network_then_fine_tuned(tmp_path):
    job = L0Job(DATA, MODEL, TRAIN, L0.replace(finetune_steps="1ep"), mode="prune", dense_reference=False)
    r = run_l0(job, _options(tmp_path))
    folder = Path(r["run_dir"])
    assert folder.name.startswith("prune-l0_") and (r["kind"], r["mode"], r["rewind"]) == ("prune-l0", "prune", None)
    assert "dense_test_accuracy" not in r
    assert (folder / "rewind.safetensors").exists(), "saved in both modes, so that a ticket run can reuse the search"
    # baking w * z reproduces the network the search evaluated in eval mode
    assert r["test_accuracy_before_finetune"] == r["search_test_accuracy"]
    assert r["epochs"] == 3 and r["finetune_epochs"] == 1
    mask = Mask.load(folder / "mask.safetensors")
    pruned = load_tensors(folder / "pruned/model.safetensors")
    for n, m in mask.items():
        assert torch.all(pruned[n][~m] == 0)
    assert {row["stage"] for row in _rows(folder)} == {"search", "finetune"}


def test_l0_ticket_and_prune_of_one_setting_share_one_search(tmp_path):
    ticket = L0Job(DATA, MODEL, TRAIN, L0, dense_reference=False)
    prune = L0Job(DATA, MODEL, TRAIN, L0, mode="prune", dense_reference=False)
    fresh = {"ticket": run_l0(ticket, _options(tmp_path / "t")), "prune": run_l0(prune, _options(tmp_path / "p"))}
    for first, second in ((ticket, prune), (prune, ticket)):
        out, logs = tmp_path / f"{first.mode}-then-{second.mode}", []
        run_l0(first, _options(out))
        r = run_l0(second, _options(out, logs))
        assert any("reusing the finished L0 search" in line for line in logs), logs
        want = fresh[second.mode]
        for key in ("density", "kept_weights", "test_accuracy", "search_test_accuracy", "epochs"):
            assert r[key] == want[key], key
        assert Mask.load(Path(r["run_dir"]) / "mask.safetensors") == Mask.load(Path(want["run_dir"]) / "mask.safetensors")
        assert [row["stage"] for row in _rows(Path(r["run_dir"]))] == [row["stage"] for row in _rows(Path(want["run_dir"]))]
    # an unfinished sibling (no state.safetensors) is not reused: the run searches itself
    out, logs = tmp_path / "unfinished", []
    run_l0(ticket, _options(out))
    sibling = Path(run_l0(ticket, _options(out))["run_dir"])
    (sibling / "search" / "state.safetensors").unlink()
    r = run_l0(prune, _options(out, logs))
    assert not any("reusing" in line for line in logs) and r["test_accuracy"] == fresh["prune"]["test_accuracy"]


def test_l0_rewind_after_the_end_fails_before_training(tmp_path):
    job = L0Job(DATA, MODEL, TRAIN, L0.replace(rewind="3ep"))
    with pytest.raises(ConfigError, match="rewind"):
        run_l0(job, _options(tmp_path))
    assert not list(tmp_path.glob("train_*"))


# -- gradual magnitude pruning ----------------------------------------------------------------------------
def test_gmp_run_hits_target_and_writes_results(tmp_path):
    r = run_gmp(GMP_JOB, _options(tmp_path))
    folder = Path(r["run_dir"])
    assert folder.name.startswith("prune-gmp_lenet_300_100_synthetic_s0_")
    for f in ("hparams.json", "history.json", "mask.safetensors", "mask.json", "pruned/model.safetensors",
              "metrics.csv", "results.json"):
        assert (folder / f).exists(), f
    assert not (folder / "checkpoint.safetensors").exists()
    mask = Mask.load(folder / "mask.safetensors")
    assert list(mask) == PRUNABLE
    assert mask.num_kept() == kept_count(0.05, mask.num_total()) == r["kept_weights"]
    assert (r["method"], r["target_density"], r["density"]) == ("gmp", 0.05, mask.density())
    assert (r["prune_start_iteration"], r["prune_end_iteration"], r["pruning_steps"]) == (5, 9, 3)
    assert r["epochs"] == 3 and r["dense_test_accuracy"] is not None
    pruned = load_tensors(folder / "pruned/model.safetensors")
    assert not any(k.endswith("_mask") for k in pruned)
    for n, m in mask.items():
        assert torch.all(pruned[n][~m] == 0)
    rows = _rows(folder)
    densities = {int(row["step"]): float(row["density"]) for row in rows}
    assert densities[5] == 1.0  # nothing pruned up to t0 = 1ep
    assert densities[10] == densities[15] == mask.density()


def test_gmp_resumes_to_the_same_result(tmp_path):
    base = run_gmp(GMP_JOB, _options(tmp_path / "a"))
    original = gmp_pipe.EnforceMaskCallback

    class Killed(original):
        def on_step_end(self, trainer):
            super().on_step_end(trainer)
            if trainer.iteration == 7:  # after the epoch-1 checkpoint and the first pruning steps
                raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gmp_pipe, "EnforceMaskCallback", Killed)
        with pytest.raises(KeyboardInterrupt):
            run_gmp(GMP_JOB, _options(tmp_path / "b"))
    r = run_gmp(GMP_JOB, _options(tmp_path / "b"))
    for key in ("density", "kept_weights", "test_accuracy", "val_accuracy"):
        assert r[key] == base[key], key
    assert Mask.load(Path(r["run_dir"]) / "mask.safetensors") == Mask.load(Path(base["run_dir"]) / "mask.safetensors")


def test_gmp_impossible_schedule_fails_before_training(tmp_path):
    job = GMPJob(DATA, MODEL, TRAIN, GMP.replace(prune_end="5ep"))
    with pytest.raises(ConfigError, match="after the end of training"):
        run_gmp(job, _options(tmp_path))
    assert not list(tmp_path.glob("train_*"))


# -- sweeps and the command line --------------------------------------------------------------------------
def test_sweep_kinds_run_and_name_the_pipelines_folders(tmp_path):
    from lottery.sweep import _run_folder, build_job, make_spec, run_sweep

    small = TRAIN.replace(training_steps="1ep")
    specs = [
        make_spec("l0", data=DATA, model=MODEL, training=small, l0=L0.replace(rewind="2it")),
        make_spec("l0-prune", data=DATA, model=MODEL, training=small, l0=L0),
        make_spec("gmp", data=DATA, model=MODEL, training=small, gmp=GMP.replace(prune_start="1it", prune_end="4it")),
    ]
    result = run_sweep(specs, _options(tmp_path), backend="serial", threads_per_worker=1, name="l0gmp")
    assert result.ok, [o.error for o in result.failures]
    got = result.results
    assert [(r["method"], r.get("mode")) for r in got] == [("l0", "ticket"), ("l0", "prune"), ("gmp", None)]
    for spec, r in zip(specs, got):
        assert Path(r["run_dir"]) == tmp_path / _run_folder(build_job(spec))
        assert (Path(r["run_dir"]) / "mask.safetensors").exists()
    assert len([o for o in result.outcomes if o.role == "dense-reference"]) == 1  # shared by the three


def _parser():
    parser = cli_common.OneLineErrorParser(prog="lottery")
    sub = parser.add_subparsers(dest="command", parser_class=cli_common.OneLineErrorParser)
    search_sub, prune_sub = cli_cs.register(sub)
    register(search_sub, prune_sub, cli_common.common_flags)
    return parser


DATA_FLAGS = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-train-size", "200",
              "--synthetic-test-size", "100", "--val-size", "40", "--batch-size", "32", "--lr", "0.05",
              "--no-progress", "--epochs", "1"]


@pytest.mark.parametrize("argv, kind", [
    (["search", "l0", "--lam", "2e-3", "--gate-lr", "0.05", "--rewind", "2it"], "search-l0"),
    (["prune", "l0", "--lam", "2e-3", "--gate-optimizer", "sgd", "--gate-momentum", "0.5", "--no-dense"], "prune-l0"),
    (["prune", "gmp", "--density", "0.05", "--prune-start", "1it", "--prune-end", "4it", "--prune-every", "1it"],
     "prune-gmp"),
])
def test_cli_commands(argv, kind, tmp_path, capsys):
    args = _parser().parse_args([*argv, *DATA_FLAGS, "--out", str(tmp_path)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "run folder:" in printed and kind in printed
    folder = next(tmp_path.glob(f"{kind}_*"))
    hp = read_json(folder / "hparams.json")
    if kind == "prune-l0":
        assert (hp["l0"]["gate_optimizer"], hp["l0"]["gate_momentum"]) == ("sgd", 0.5)
        assert not list(tmp_path.glob("train_*"))
    if kind == "prune-gmp":
        assert read_json(folder / "results.json")["density"] == kept_count(0.05, 49200) / 49200
