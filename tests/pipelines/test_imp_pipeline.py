"""IMP, IMP-C, LRR, fine-tuning, one-shot pruning, controls and stability as resumable run folders.

Everything runs on tiny synthetic data (1x8x8 images, 160 training examples, 5 iterations per epoch)
with a small conv + BatchNorm network registered for these tests only, so that BN buffers are checked.
"""

import argparse
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from lottery.engine import Callback
from lottery.experiment import RunOptions
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json
from lottery.masks import Mask
from lottery.methods.imp import (
    FinetuneHparams, IMPHparams, LRRHparams, OneShotHparams, RandomPruneHparams, RandomReinitHparams,
    magnitude_prune, one_shot_magnitude,
)
from lottery.methods.stability import StabilityHparams
from lottery.models import registry
from lottery.pipelines.imp import (
    FinetuneJob, IMPJob, LRRJob, OneShotJob, StabilityJob, run_finetune, run_imp, run_lrr, run_one_shot,
    run_random_prune, run_random_reinit, run_stability,
)

MODEL = "tiny_bn_imp_test"
IPE = 5  # 160 training examples / batch 32
DATA = DataHparams(dataset="synthetic", val_size=40, synthetic_shape=(1, 8, 8), synthetic_classes=4,
                   synthetic_train_size=200, synthetic_test_size=100)
TRAIN = TrainingHparams(training_steps="3ep", batch_size=32, lr=0.1, momentum=0.9)
PRUNABLE = {"conv.weight": 36, "hidden.weight": 240}  # fc.weight (the output layer) is ignored


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to OpenMP spinning when other processes
    share the cores (2 threads on a busy 2-core machine made these tests 15x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyBN(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.hidden = nn.Linear(16, 15)
        self.fc = nn.Linear(15, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1)
        return self.fc(torch.relu(self.hidden(x)))


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    spec = registry.ModelSpec(name=MODEL, builder=lambda *, input_shape, num_classes: TinyBN(input_shape, num_classes),
                              input_shape=(1, 8, 8), num_classes=4, prune_ignore=("fc.weight",))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry._REGISTRY, MODEL, spec)
        yield


def _options(out, lines=None):
    return RunOptions(out=out, progress=False, log=(lines.append if lines is not None else (lambda m: None)))


class Recorder(Callback):
    """Records what each stage's Trainer starts from: the full state, the iteration and the LRs used."""

    def __init__(self, log, stage):
        self.log, self.stage = log, stage

    def on_fit_start(self, trainer):
        self.log[self.stage] = {"state": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                                "iteration": trainer.iteration, "lrs": set()}

    def on_step_start(self, trainer):
        self.log[self.stage]["lrs"].add(round(trainer.lr(), 12))


class Crash(Callback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer):
        if trainer.iteration == self.at:
            raise KeyboardInterrupt("simulated kill")


def recorder(log):
    return lambda stage: [Recorder(log, stage)]


def _levels(folder, n):
    return [folder / f"level_{i}" for i in range(n + 1)]


def _assert_state_equal(actual, expected, mask=None):
    """``actual`` (a trainer's model state, with *_mask buffers) equals ``expected`` x mask, every key."""
    for k, v in expected.items():
        want = v * mask[k] if mask is not None and k in mask else v
        assert torch.equal(actual[k], want), k
    extra = {k for k in actual if k not in expected}
    assert extra == {f"{n}_mask" for n in (mask or {})}
    for n in mask or {}:
        assert torch.equal(actual[f"{n}_mask"], mask[n]), n


# -- IMP ------------------------------------------------------------------------------------------------
IMP_HP = IMPHparams(levels=3, rate=0.2, scope="global", rewind="3it")


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("imp")
    log, lines = {}, []
    results = run_imp(IMPJob(DATA, ModelHparams(model=MODEL), TRAIN, IMP_HP, seed=0), _options(out, lines),
                      callbacks=recorder(log))
    return results, next(out.glob("search-imp_*")), log, lines


def test_imp_exact_counts_shrinking_masks_and_ignored_weights(imp_run):
    results, folder, _, lines = imp_run
    masks = [Mask.load(d / "mask.safetensors") for d in _levels(folder, 3)]
    assert list(masks[0]) == list(PRUNABLE)  # fc.weight is never in a mask, so never counted
    kept = sum(PRUNABLE.values())
    for level, (prev, mask) in enumerate(zip(masks, masks[1:]), start=1):
        kept -= math.ceil(Fraction(1, 5) * kept)
        assert mask.num_kept() == kept
        assert all(not (mask[n] & ~prev[n]).any() for n in mask)
        assert results["levels"][level]["density"] == pytest.approx(kept / 276)
        assert read_json(folder / f"level_{level}" / "results.json")["kept_weights"] == kept
        # pruned by magnitude from the previous level's trained weights
        trained = load_tensors(folder / f"level_{level - 1}" / "model.safetensors")
        assert mask == magnitude_prune(trained, prev, 0.2, "global")
        final = load_tensors(folder / f"level_{level}" / "model.safetensors")
        for n in mask:
            assert (final[n][~mask[n]] == 0).all()
        assert (final["fc.weight"] != 0).all()  # the ignored layer is trained, never masked
    assert [r["method"] for r in results["levels"]] == ["imp"] * 4
    assert sum("imp level" in line and "density" in line for line in lines) == 4  # a line per level
    assert any("test acc %" in line for line in lines)  # the summary table
    assert (folder / "accuracy_vs_density.png").exists() and (folder / "metrics.csv").exists()


def test_imp_each_level_starts_from_rewind_state_times_mask(imp_run):
    _, folder, log, _ = imp_run
    rewind = load_tensors(folder / "rewind.safetensors")
    initial = log["level_0"]["state"]
    assert log["level_0"]["iteration"] == 0
    # k = 3it: the rewind state is the one after 3 steps, BN statistics included (not the initial ones)
    assert not torch.equal(rewind["bn.running_mean"], initial["bn.running_mean"])
    assert int(rewind["bn.num_batches_tracked"]) == 3
    for level in (1, 2, 3):
        mask = Mask.load(folder / f"level_{level}" / "mask.safetensors")
        start = log[f"level_{level}"]
        assert start["iteration"] == 3
        _assert_state_equal(start["state"], rewind, mask)


def test_imp_epoch_accounting(imp_run):
    results = imp_run[0]
    T, k = 15, 3
    for r in results["levels"]:
        assert r["epochs"] == pytest.approx((T + r["level"] * (T - k)) / IPE)
    assert results["epochs_total"] == pytest.approx((T + 3 * (T - k)) / IPE)


def test_killed_and_resumed_imp_gives_the_same_run(imp_run, tmp_path):
    reference, ref_folder = imp_run[0], imp_run[1]
    job = IMPJob(DATA, ModelHparams(model=MODEL), TRAIN, IMP_HP, seed=0)
    with pytest.raises(KeyboardInterrupt):
        # killed in level 2, mid-epoch, after its first checkpoint
        run_imp(job, _options(tmp_path), callbacks=lambda stage: [Crash(7)] if stage == "level_2" else [])
    folder = tmp_path / ref_folder.name
    assert (folder / "level_2" / "checkpoint.safetensors").exists()
    assert not (folder / "level_2" / "results.json").exists()
    log = {}
    resumed = run_imp(job, _options(tmp_path), callbacks=recorder(log))
    assert "level_0" not in log and "level_1" not in log  # finished stages are not run again
    for a, b in zip(reference["levels"], resumed["levels"]):
        for key in ("density", "kept_weights", "test_accuracy", "val_accuracy", "test_loss", "epochs"):
            assert a[key] == b[key], (a["level"], key)
    for level in range(4):
        assert Mask.load(ref_folder / f"level_{level}" / "mask.safetensors") == \
            Mask.load(folder / f"level_{level}" / "mask.safetensors")
        ref_w, new_w = (load_tensors(f / f"level_{level}" / "model.safetensors") for f in (ref_folder, folder))
        for k in ref_w:
            assert torch.equal(ref_w[k], new_w[k]), (level, k)
    # asking for more levels continues the same folder
    more = run_imp(IMPJob(DATA, ModelHparams(model=MODEL), TRAIN, IMP_HP.replace(levels=4), seed=0),
                   _options(tmp_path), callbacks=recorder(log))
    assert len(more["levels"]) == 5 and list(tmp_path.glob("search-imp_*")) == [folder]


def test_layerwise_imp_counts(tmp_path):
    hp = IMPHparams(levels=2, rate=0.2, scope="layerwise", rewind="0it")
    train = TRAIN.replace(training_steps="1ep")
    run_imp(IMPJob(DATA, ModelHparams(model=MODEL), train, hp, seed=1), _options(tmp_path))
    folder = next(tmp_path.glob("search-imp_*"))
    # k = 0: the rewind state is the initialisation itself (the original lottery-ticket procedure)
    torch.manual_seed(1)
    init = TinyBN((1, 8, 8), 4).state_dict()
    rewind = load_tensors(folder / "rewind.safetensors")
    assert all(torch.equal(init[k], rewind[k]) for k in init)
    kept = dict(PRUNABLE)
    for level in (1, 2):
        mask = Mask.load(folder / f"level_{level}" / "mask.safetensors")
        for n in kept:
            kept[n] -= math.ceil(Fraction(1, 5) * kept[n])  # 36 -> 28 -> 22 (ceil(7.2) = 8, ceil(5.6) = 6)
            assert int(mask[n].sum()) == kept[n]
    assert kept["conv.weight"] == 22


# -- IMP-C ----------------------------------------------------------------------------------------------
def test_imp_c_continues_from_the_previous_levels_end_weights(tmp_path):
    log = {}
    hp = IMPHparams(levels=2, rewind="1ep", variant="continue")
    results = run_imp(IMPJob(DATA, ModelHparams(model=MODEL), TRAIN, hp, seed=0), _options(tmp_path),
                      callbacks=recorder(log))
    folder = next(tmp_path.glob("search-imp-c_*"))
    rewind = load_tensors(folder / "rewind.safetensors")
    sources = {1: folder / "level_0" / "model.safetensors", 2: folder / "level_1" / "continued.safetensors"}
    T, k = 15, 5
    for level in (1, 2):
        mask = Mask.load(folder / f"level_{level}" / "mask.safetensors")
        prev = Mask.load(folder / f"level_{level - 1}" / "mask.safetensors")
        source = load_tensors(sources[level])
        assert mask == magnitude_prune(source, prev, 0.2, "global")  # pruned from the continued weights
        cont = log[f"level_{level}_continued"]
        assert cont["iteration"] == 0  # the LR schedule restarts
        _assert_state_equal(cont["state"], source, mask)
        ticket = log[f"level_{level}"]
        assert ticket["iteration"] == k
        _assert_state_equal(ticket["state"], rewind, mask)
        r = results["levels"][level]
        assert r["method"] == "imp-c"
        assert r["epochs"] == pytest.approx((level * T + (T - k)) / IPE)
        assert r["continued_epochs"] == pytest.approx((level + 1) * T / IPE)
        assert r["continued_test_accuracy"] == read_json(folder / f"level_{level}" / "continued_history.json")["last"]["test_accuracy"]
        assert r["test_accuracy"] == read_json(folder / f"level_{level}" / "history.json")["last"]["test_accuracy"]
    assert results["epochs_total"] == pytest.approx((3 * T + 2 * (T - k)) / IPE)


# -- LRR and fine-tuning ---------------------------------------------------------------------------------
STEP_TRAIN = TRAIN.replace(schedule="multistep", milestones=("2ep",), gamma=0.1)


def test_lrr_replays_the_schedule_from_k_on_the_previous_weights(tmp_path):
    log = {}
    results = run_lrr(LRRJob(DATA, ModelHparams(model=MODEL), STEP_TRAIN, LRRHparams(levels=2, rewind="1ep"), seed=0),
                      _options(tmp_path), callbacks=recorder(log))
    folder = next(tmp_path.glob("prune-lrr_*"))
    for level in (1, 2):
        mask = Mask.load(folder / f"level_{level}" / "mask.safetensors")
        prev = load_tensors(folder / f"level_{level - 1}" / "model.safetensors")
        start = log[f"level_{level}"]
        assert start["iteration"] == 5
        assert start["lrs"] == {0.1, 0.01}  # the schedule from 1ep: 0.1 until 2ep, then 0.01
        _assert_state_equal(start["state"], prev, mask)
        assert results["levels"][level]["epochs"] == pytest.approx((15 + level * 10) / IPE)
    assert {r["method"] for r in results["levels"]} == {"lrr"}
    assert results["levels"][0]["dense_run_dir"]  # level 0 is the shared dense run of `lottery train`


def test_finetune_trains_at_the_final_lr(tmp_path):
    log = {}
    hp = FinetuneHparams(levels=2, finetune_steps="1ep")
    results = run_finetune(FinetuneJob(DATA, ModelHparams(model=MODEL), STEP_TRAIN, hp, seed=0), _options(tmp_path),
                           callbacks=recorder(log))
    folder = next(tmp_path.glob("prune-finetune_*"))
    for level in (1, 2):
        start = log[f"level_{level}"]
        assert start["iteration"] == 0
        assert len(start["lrs"]) == 1 and start["lrs"].pop() == pytest.approx(0.01)
        prev = load_tensors(folder / f"level_{level - 1}" / "model.safetensors")
        _assert_state_equal(start["state"], prev, Mask.load(folder / f"level_{level}" / "mask.safetensors"))
        assert results["levels"][level]["epochs"] == pytest.approx(3 + level * 1)
        assert results["levels"][level]["method"] == "finetune"


# -- one-shot ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_one_shot_magnitude(tmp_path, scope):
    results = run_one_shot(OneShotJob(DATA, ModelHparams(model=MODEL), TRAIN,
                                      OneShotHparams(density=0.3, scope=scope, finetune_steps="1ep"), seed=0),
                           _options(tmp_path))
    folder = next(tmp_path.glob("prune-magnitude_*"))
    mask = Mask.load(folder / "mask.safetensors")
    if scope == "global":
        assert mask.num_kept() == math.floor(0.3 * 276)
    else:
        assert {n: int(m.sum()) for n, m in mask.items()} == {"conv.weight": 10, "hidden.weight": 72}
    dense = load_tensors(next(tmp_path.glob("train_*")) / "model.safetensors")
    assert mask == one_shot_magnitude(dense, 0.3, scope, names=list(PRUNABLE))
    final = load_tensors(folder / "model.safetensors")
    assert all((final[n][~m] == 0).all() for n, m in mask.items())
    assert results["method"] == "magnitude" and results["epochs"] == pytest.approx(4.0)
    assert results["density"] == mask.density()
    assert "test_accuracy_before_finetune" in results


# -- controls ----------------------------------------------------------------------------------------------
def test_random_prune_control(imp_run, tmp_path):
    _, source, _, _ = imp_run
    ref = Mask.load(source / "level_2" / "mask.safetensors")
    rewind = load_tensors(source / "rewind.safetensors")
    log = {}
    lines: list[str] = []
    r = run_random_prune(source, RandomPruneHparams(level=2, seed=1), _options(tmp_path, lines), callbacks=recorder(log))
    folder = next(tmp_path.glob("control-random-prune_*"))
    mask = Mask.load(folder / "mask.safetensors")
    assert {n: int(m.sum()) for n, m in mask.items()} == {n: int(m.sum()) for n, m in ref.items()}
    assert mask != ref
    assert log["control"]["iteration"] == 3
    _assert_state_equal(log["control"]["state"], rewind, mask)
    assert r["method"] == "random-prune" and r["density"] == ref.density() and r["level"] == 2
    assert r["epochs"] == pytest.approx(12 / IPE)
    # seeded: a second run with the same seed is the same folder; another seed another mask
    assert run_random_prune(source, RandomPruneHparams(level=2, seed=1), _options(tmp_path)) == r
    # the log line names both seeds: the source run's and the control's own draw
    assert any(f"random-prune control of level 2 (density {r['density']:.4f}, run seed {r['seed']}, control seed 1)"
               in line for line in lines), lines
    run_random_prune(source, RandomPruneHparams(level=2, seed=2, scope="global"), _options(tmp_path))
    other = [f for f in tmp_path.glob("control-random-prune_*") if f != folder]
    assert len(other) == 1
    mask2 = Mask.load(other[0] / "mask.safetensors")
    assert mask2.num_kept() == ref.num_kept() and mask2 != mask


def test_random_reinit_control(imp_run, tmp_path):
    _, source, _, _ = imp_run
    ref = Mask.load(source / "level_2" / "mask.safetensors")
    rewind = load_tensors(source / "rewind.safetensors")
    log = {}
    r = run_random_reinit(source, RandomReinitHparams(level=2, seed=1), _options(tmp_path), callbacks=recorder(log))
    start = log["control"]["state"]
    assert torch.equal(start["conv.weight_mask"], ref["conv.weight"])
    assert Mask.load(next(tmp_path.glob("control-random-reinit_*")) / "mask.safetensors") == ref
    for n, m in ref.items():
        assert (start[n][~m] == 0).all()
        assert not torch.equal(start[n][m], rewind[n][m])  # new weights
    assert not torch.equal(start["fc.weight"], rewind["fc.weight"])  # every parameter is drawn again
    assert r["method"] == "random-reinit" and r["density"] == ref.density()
    assert r["ticket_test_accuracy"] == read_json(source / "level_2" / "results.json")["test_accuracy"]


# -- stability --------------------------------------------------------------------------------------------
def test_stability_job(imp_run, tmp_path):
    _, source, _, _ = imp_run
    mask_path = source / "level_1" / "mask.safetensors"
    mask = Mask.load(mask_path)
    hp = StabilityHparams(rewind_points=("0it", "1ep"), points=4, mask=str(mask_path))
    log, lines = {}, []
    results = run_stability(StabilityJob(DATA, ModelHparams(model=MODEL), TRAIN, hp, seed=0),
                            _options(tmp_path, lines), callbacks=recorder(log))
    folder = next(tmp_path.glob("stability_*"))
    for name in ("stability.csv", "stability.md", "stability.png", "results.json"):
        assert (folder / name).exists(), name
    assert [r["rewind"] for r in results["rows"]] == ["0it", "1ep"]
    for row in results["rows"]:
        kdir = folder / ("k_" + row["rewind"])
        snap = load_tensors(folder / "dense" / f"rewind_{row['rewind_iteration']}it.safetensors")
        for i in range(2):
            start = log[f"k_{row['rewind']}_copy_{i}"]
            assert start["iteration"] == row["rewind_iteration"]
            _assert_state_equal(start["state"], snap, mask)
            last = read_json(kdir / f"copy_{i}_history.json")["last"]
            assert row["error_a" if i == 0 else "error_b"] == pytest.approx(1 - last["test_accuracy"])
        assert row["instability"] >= 0 and row["l2_to_dense"] > 0 and row["density"] == mask.density()
        assert len(row["errors"]) == 4
    # the two copies really differ in data order
    a, b = (load_tensors(folder / "k_0it" / f"copy_{i}.safetensors") for i in range(2))
    assert not torch.equal(a["hidden.weight"], b["hidden.weight"])
    assert "| k |" in (folder / "stability.md").read_text()
    assert sum(line.startswith("stability k=") for line in lines) == 2


def test_stability_reuses_a_sibling_runs_dense_network(imp_run, tmp_path):
    """A second analysis of the same recipe and seed (another mask) starts from the first one's dense
    run instead of training it again, and gets the same rows as a run that trained its own."""
    _, source, _, _ = imp_run
    job = lambda hp: StabilityJob(DATA, ModelHparams(model=MODEL), TRAIN, hp, seed=0)  # noqa: E731
    first = StabilityHparams(rewind_points=("0it", "1ep"), points=4)
    run_stability(job(first), _options(tmp_path / "shared"))
    ticket = StabilityHparams(rewind_points=("1ep",), points=4, mask=str(source / "level_2" / "mask.safetensors"))
    log, lines = {}, []
    reused = run_stability(job(ticket), _options(tmp_path / "shared", lines), callbacks=recorder(log))
    assert "dense" not in log, "the dense network was trained again"
    assert any(line.startswith("stability dense: reused from") for line in lines)
    alone = run_stability(job(ticket), _options(tmp_path / "alone"))
    for a, b in zip(reused["rows"], alone["rows"]):
        assert a["errors"] == b["errors"] and a["l2_to_dense"] == b["l2_to_dense"]
    assert reused["dense_test_accuracy"] == alone["dense_test_accuracy"]
    # a rewind point the sibling did not save, or another seed: trained here
    log2 = {}
    run_stability(job(StabilityHparams(rewind_points=("2it",), points=4)), _options(tmp_path / "shared"),
                  callbacks=recorder(log2))
    assert "dense" in log2
    log3 = {}
    run_stability(StabilityJob(DATA, ModelHparams(model=MODEL), TRAIN, first, seed=1), _options(tmp_path / "shared"),
                  callbacks=recorder(log3))
    assert "dense" in log3


def test_stability_of_a_ticket_starts_from_the_state_it_is_given(imp_run, tmp_path):
    """``start_state``: the copies start from that state times the mask (a ticket's own rewind weights), not
    from the dense network's state at k; the file is named in results.json."""
    from lottery.io import save_tensors

    _, source, _, _ = imp_run
    mask_path = source / "level_1" / "mask.safetensors"
    mask = Mask.load(mask_path)
    own = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in load_tensors(source / "rewind.safetensors").items()}
    save_tensors(tmp_path / "own.safetensors", own)  # surely not the dense run's state at 3 iterations
    hp = StabilityHparams(rewind_points=("3it",), points=4, mask=str(mask_path),
                          start_state=str(tmp_path / "own.safetensors"))
    log = {}
    results = run_stability(StabilityJob(DATA, ModelHparams(model=MODEL), TRAIN, hp, seed=0),
                            _options(tmp_path / "out"), callbacks=recorder(log))
    for i in range(2):
        start = log[f"k_3it_copy_{i}"]
        assert start["iteration"] == 3
        _assert_state_equal(start["state"], own, mask)
    assert results["start_state"] == str(tmp_path / "own.safetensors")
    assert results["rows"][0]["density"] == mask.density()


def test_stability_start_state_refuses_bad_input_before_training(imp_run, tmp_path):
    from lottery.errors import ConfigError
    from lottery.io import save_tensors

    _, source, _, _ = imp_run
    with pytest.raises(ConfigError, match="one rewind point"):
        StabilityHparams(rewind_points=("0it", "3it"), start_state=str(source / "rewind.safetensors"))
    job = lambda path: StabilityJob(DATA, ModelHparams(model=MODEL), TRAIN,  # noqa: E731
                                    StabilityHparams(rewind_points=("3it",), points=4, start_state=str(path)), seed=0)
    log = {}
    with pytest.raises(ConfigError, match="does not exist"):
        run_stability(job(tmp_path / "missing.safetensors"), _options(tmp_path / "a"), callbacks=recorder(log))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        run_stability(job(tmp_path / "junk.safetensors"), _options(tmp_path / "b"), callbacks=recorder(log))
    save_tensors(tmp_path / "other.safetensors", {"some.weight": torch.zeros(3, 3)})
    with pytest.raises(ConfigError, match="does not fit the model"):
        run_stability(job(tmp_path / "other.safetensors"), _options(tmp_path / "c"), callbacks=recorder(log))
    assert log == {}  # nothing trained


# -- the command line -------------------------------------------------------------------------------------
def _parser():
    from lottery import cli
    import lottery.cli.common as cli_common
    from lottery.cli.imp import register

    parser = argparse.ArgumentParser(prog="lottery")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    search = sub.add_parser("search")
    search_sub = search.add_subparsers(dest="method", metavar="METHOD")
    search_sub.required = True
    prune = sub.add_parser("prune")
    prune_sub = prune.add_subparsers(dest="method", metavar="METHOD")
    prune_sub.required = True
    register(search_sub, prune_sub, sub, cli_common.common_flags)
    return parser


def test_cli_parser_and_help(capsys):
    parser = _parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["search", "imp", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--levels" in text and "--rewind" in text and "--variant" not in text
    args = parser.parse_args(["search", "imp", "--preset", "fashion_lenet", "--levels", "10", "--rewind", "1ep",
                              "--out", "runs/"])
    assert callable(args.func) and args.__dict__["IMPHparams.levels"] == 10
    args = parser.parse_args(["prune", "magnitude", "--density", "0.1", "--scope", "layerwise"])
    assert args.__dict__["OneShotHparams.density"] == 0.1
    for argv in (["search", "imp-c"], ["prune", "lrr", "--rewind", "2ep"], ["prune", "finetune"],
                 ["control", "random-prune", "RUN", "--level", "5", "--seed", "1", "--scope", "global"],
                 ["control", "random-reinit", "RUN", "--level", "5", "--seed", "1"],
                 ["stability", "--rewind-points", "0it,1ep,2ep", "--mask", "RUN/level_5/mask.safetensors"]):
        assert callable(parser.parse_args(argv).func), argv
    args = parser.parse_args(["stability", "--rewind-points", "0it,1ep,2ep"])
    assert args.__dict__["StabilityHparams.rewind_points"] == ("0it", "1ep", "2ep")


def test_cli_runs_imp_c_end_to_end(tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args([
        "search", "imp-c", "--model", MODEL, "--dataset", "synthetic", "--val-size", "40",
        "--synthetic-shape", "1,8,8", "--synthetic-classes", "4", "--synthetic-train-size", "200",
        "--synthetic-test-size", "100", "--training-steps", "1ep", "--batch-size", "32",
        "--levels", "1", "--rewind", "2it", "--out", str(tmp_path), "--no-progress",
    ])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "run folder:" in out
    folder = next(tmp_path.glob("search-imp-c_*"))
    summary = read_json(folder / "results.json")
    assert summary["method"] == "imp-c" and [r["level"] for r in summary["levels"]] == [0, 1]
    assert read_json(folder / "hparams.json")["imp"]["variant"] == "continue"


def test_every_imp_level_records_the_cost_of_its_own_mask(imp_run):
    """results.json of each level: parameters and FLOPs counted from that level's mask.safetensors."""
    from lottery.cost import network_cost
    from lottery.models import build_model as build

    _, folder, _, _ = imp_run
    speedups = []
    for level_dir in _levels(folder, 3):
        mask = Mask.load(level_dir / "mask.safetensors")
        model = build(MODEL, input_shape=DATA.synthetic_shape, num_classes=DATA.synthetic_classes)
        expected = network_cost(model, mask, DATA.synthetic_shape)
        result = read_json(level_dir / "results.json")
        assert {k: result[k] for k in ("params_nonzero", "flops_dense", "flops_sparse")} == {
            k: expected[k] for k in ("params_nonzero", "flops_dense", "flops_sparse")}
        assert result["params_nonzero"] == result["params_total"] - (mask.num_total() - mask.num_kept())
        layers = read_json(level_dir / "mask.json")["layers"]
        assert all(layers[n]["flops_sparse"] == expected["layers"][n]["flops_sparse"] for n in mask)
        speedups.append(result["theoretical_speedup"])
    assert speedups[0] == 1.0 and speedups == sorted(speedups)  # pruning only ever removes work


def test_sparsest_matching_level_is_never_the_dense_level():
    """When no pruned level matches, the answer is none, not level 0 (the dense network pruned nothing)."""
    from lottery.pipelines.imp import sparsest_matching

    levels = [{"level": 0, "density": 1.0, "test_accuracy": 0.90}, {"level": 1, "density": 0.8, "test_accuracy": 0.85}]
    assert sparsest_matching(levels, dense_accuracy=0.90) is None
    levels.append({"level": 2, "density": 0.64, "test_accuracy": 0.899})
    assert sparsest_matching(levels, dense_accuracy=0.90) == {"level": 2, "density": 0.64, "test_accuracy": 0.899}
