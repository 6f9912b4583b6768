"""Structured tickets: refill / refill+ budgets, regroup's dense blocks and row rules, failing
partitioners, and the structure pipelines on a tiny synthetic run."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from lottery.errors import ConfigError
from lottery.masks import Mask
from lottery.methods.structured import (
    PartitionError, StructuredHparams, channel_counts, kahypar_partition, metis_partition, refill, regroup,
    regroup_blocks, structure,
)


def _random_mask(seed: int, shapes: dict[str, tuple[int, ...]], density: float) -> tuple[Mask, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mask = Mask({n: torch.rand(s, generator=g) < density for n, s in shapes.items()})
    weights = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    return mask, weights


SHAPES = {"conv.weight": (24, 6, 3, 3), "fc.weight": (40, 30), "tiny.weight": (5, 4)}


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


# ============================================================================ refill


@pytest.mark.parametrize("seed,density", [(0, 0.3), (1, 0.07), (2, 0.6), (3, 0.01)])
@pytest.mark.parametrize("score", ["l1", "count"])
def test_refill_keeps_the_layer_budget_in_whole_channels(seed, density, score):
    mask, weights = _random_mask(seed, SHAPES, density)
    out = refill(mask, weights, score=score)
    assert list(out) == list(mask)
    for name, m in mask.items():
        m2, o2 = _rows(m), _rows(out[name])
        nnz, fan_in = int(m2.sum()), m2.shape[1]
        full = o2.all(1)
        assert torch.equal(full, o2.any(1)), "every row is kept whole or dropped whole"
        expected = max(1, nnz // fan_in) if nnz else 0
        assert int(full.sum()) == expected == channel_counts(mask)[name]
        assert int(o2.sum()) <= max(nnz, fan_in if nnz else 0), "never more weights than the budget"
        assert int(o2.sum()) + fan_in > nnz or nnz == 0, "the budget is used up to less than one channel"
        # the kept rows are the best-scored ones
        s = (weights[name].abs().reshape(m2.shape) * m2).sum(1) if score == "l1" else m2.sum(1).float()
        if 0 < int(full.sum()) < m2.shape[0]:
            assert s[full].min() >= s[~full].max()


def test_refill_breaks_ties_by_lower_index_and_needs_weights_for_l1():
    mask = Mask({"w": torch.tensor([[1, 0], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)})
    out = refill(mask, score="count")  # nnz 4, fan_in 2: two rows; row 2 (count 2) then row 0 (tie with 1)
    assert out["w"].all(1).tolist() == [True, False, True, False]
    with pytest.raises(ConfigError):
        refill(mask, score="l1")


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 1.0])
def test_refill_plus_adds_the_stated_fraction_of_dropped_channels(rate):
    mask, weights = _random_mask(5, SHAPES, 0.2)
    base = refill(mask, weights)
    plus = refill(mask, weights, fillback_rate=rate)
    for name in mask:
        rows = mask[name].shape[0]
        n = int(_rows(base[name]).all(1).sum())
        k = int(_rows(plus[name]).all(1).sum())
        assert k == n + int(Fraction(str(rate)) * (rows - n))
        assert not bool((base[name] & ~plus[name]).any()), "refill+ keeps refill's channels"
        assert torch.equal(_rows(plus[name]).all(1), _rows(plus[name]).any(1))


def test_refill_coupled_layers_keep_the_same_channels():
    mask, weights = _random_mask(7, {"a.weight": (16, 8, 3, 3), "b.weight": (16, 16, 1, 1), "c.weight": (12, 5)}, 0.3)
    out = refill(mask, weights, groups=[["a.weight", "b.weight"]])
    ra, rb = _rows(out["a.weight"]).all(1), _rows(out["b.weight"]).all(1)
    assert torch.equal(ra, rb)
    nnz = int(mask["a.weight"].sum()) + int(mask["b.weight"].sum())
    assert int(ra.sum()) == nnz // (8 * 9 + 16)
    assert int(_rows(out["c.weight"]).all(1).sum()) == channel_counts(mask)["c.weight"]
    with pytest.raises(ConfigError):
        refill(mask, weights, groups=[["a.weight", "c.weight"]])  # different channel counts


def test_refill_of_an_empty_layer_keeps_nothing():
    mask = Mask({"w": torch.zeros(6, 4, dtype=torch.bool), "v": torch.ones(3, 2, dtype=torch.bool)})
    out = refill(mask, score="count")
    assert not out["w"].any() and out["v"].all()


# ============================================================================ regroup


def _stripes(rows: int, k: int):
    """A fake partitioner: row i goes to part i % k (deterministic, no external tool)."""
    def partition(matrices, ks):
        return [np.arange(m.shape[0]) % kk for m, kk in zip(matrices, ks)]
    return partition


def _check_blocks(mask: Mask, hp: StructuredHparams, blocks, new: Mask) -> None:
    for name, m in mask.items():
        m2 = _rows(m).numpy()
        union = np.zeros_like(m2)
        seen_rows: set[int] = set()
        for b in blocks[name]:
            assert not (set(b.rows) & seen_rows), "blocks of a layer have disjoint rows"
            seen_rows |= set(b.rows)
            rows_needed = min(hp.min_rows, m2.shape[0])
            assert rows_needed <= len(b.rows) <= max(hp.max_rows, rows_needed)
            chunk = m2[list(b.rows)].astype(np.int64)
            counts = chunk.sum(0)
            nnz, used = int(counts.sum()), int((counts > 0).sum())
            # widened over the most used columns until it covers the rows' kept weights or its area
            # would pass coverage x their count (at least one column)
            assert len(b.cols) == max(1, min(used, int(Fraction(str(hp.coverage)) * nnz) // len(b.rows)))
            assert b.area <= max(len(b.rows), hp.coverage * nnz)
            order = np.argsort(-counts, kind="stable")
            assert set(b.cols) == set(order[: len(b.cols)].tolist())
            union[np.ix_(list(b.rows), list(b.cols))] = True
        assert np.array_equal(union, _rows(new[name]).numpy()), "the new mask is the union of the blocks"


def test_regroup_mask_is_a_union_of_dense_blocks_meeting_the_row_rules():
    hp = StructuredHparams(method="regroup", parts=4, min_rows=4, max_rows=6, coverage=1.5)
    mask, _ = _random_mask(3, {"conv.weight": (32, 4, 3, 3), "fc.weight": (20, 30), "small.weight": (3, 7)}, 0.25)
    part = _stripes(0, 0)
    blocks = regroup_blocks(mask, hp, partition=part)
    new = regroup(mask, None, hp, partition=part)
    _check_blocks(mask, hp, blocks, new)
    assert len(blocks["small.weight"]) == 1 and len(blocks["small.weight"][0].rows) == 3  # smaller than min_rows
    assert all(len(b.rows) <= 6 for b in blocks["conv.weight"])  # parts of 8 rows were split


@pytest.mark.parametrize("partitioner", ["kahypar", "metis"])
def test_regroup_with_a_real_partitioner(partitioner):
    pytest.importorskip("kahypar" if partitioner == "kahypar" else "pymetis")
    hp = StructuredHparams(method="regroup", partitioner=partitioner, min_rows=8, max_rows=16)
    mask, weights = _random_mask(4, {"conv.weight": (64, 8, 3, 3), "fc.weight": (48, 40)}, 0.2)
    blocks = regroup_blocks(mask, hp)
    new = structure(mask, weights, hp)
    _check_blocks(mask, hp, blocks, new)
    assert new == regroup(mask, weights, hp), "deterministic for a fixed seed"
    assert new != mask


def test_small_parts_are_dissolved_into_others():
    hp = StructuredHparams(method="regroup", parts=4, min_rows=4, max_rows=32)
    mask, _ = _random_mask(9, {"w": (16, 10)}, 0.4)

    def lopsided(matrices, ks):  # parts of 10, 3, 2, 1 rows: the three small ones are dissolved
        return [np.array([0] * 10 + [1] * 3 + [2] * 2 + [3])]

    blocks = regroup_blocks(mask, hp, partition=lopsided)["w"]
    assert sorted(r for b in blocks for r in b.rows) == [r for r in range(16) if mask["w"][r].any()]
    assert all(len(b.rows) >= 4 for b in blocks)


def test_a_failing_partitioner_raises_and_never_falls_back():
    hp = StructuredHparams(method="regroup", min_rows=4, max_rows=8)
    mask, _ = _random_mask(1, {"w": (16, 12)}, 0.3)

    def crash(matrices, ks):
        raise RuntimeError("segfault-ish")

    with pytest.raises(PartitionError, match="segfault-ish"):
        regroup(mask, None, hp, partition=crash)
    with pytest.raises(PartitionError, match="invalid partition"):
        regroup(mask, None, hp, partition=lambda ms, ks: [np.full(m.shape[0], 99) for m in ms])
    with pytest.raises(PartitionError, match="invalid partition"):
        regroup(mask, None, hp, partition=lambda ms, ks: [np.zeros(3, dtype=np.int64) for m in ms])


def test_kahypar_failures_raise_partition_error():
    m = np.random.default_rng(0).random((16, 10)) < 0.3
    # KaHyPar calls exit() on a context it cannot read: the child dies, we raise (whether or not it is installed)
    with pytest.raises(PartitionError, match="KaHyPar"):
        kahypar_partition([m], [2], config="mode=direct\nobjective=cut\nnot-a-key=1\n")
    with pytest.raises(PartitionError, match="could not run"):
        kahypar_partition([m], [2], python="/nonexistent/python")


def test_metis_partition_labels():
    pytest.importorskip("pymetis")
    m = np.random.default_rng(1).random((20, 12)) < 0.3
    (labels,) = metis_partition([m], [2])
    assert labels.shape == (20,) and set(labels.tolist()) <= {0, 1}


def test_hparams_validation_and_identity():
    with pytest.raises(ConfigError):
        StructuredHparams(method="prune")
    with pytest.raises(ConfigError):
        StructuredHparams(fillback_rate=1.5)
    with pytest.raises(ConfigError):
        StructuredHparams(min_rows=32, max_rows=16)
    assert StructuredHparams(method="refill", fillback_rate=0.3, parts=4).identity() == StructuredHparams()
    plus = StructuredHparams(method="refill+", fillback_rate=0.3, parts=4).identity()
    assert plus.fillback_rate == 0.3 and plus.parts == 8
    assert StructuredHparams(method="regroup", score="count").identity().score == "l1"


# ============================================================================ pipelines


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A 1-level IMP run and a 1-round CS search of conv2 on tiny synthetic 1x8x8 data."""
    from lottery.experiment import RunOptions
    from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
    from lottery.methods.cs import CSHparams
    from lottery.methods.imp import IMPHparams
    from lottery.pipelines.cs import CSJob, run_cs
    from lottery.pipelines.imp import IMPJob, run_imp

    out = tmp_path_factory.mktemp("structured_runs")
    data = DataHparams(dataset="synthetic", val_size=32, synthetic_shape=(1, 8, 8), synthetic_classes=4,
                       synthetic_train_size=96, synthetic_test_size=64)
    training = TrainingHparams(training_steps="2ep", batch_size=32, lr=0.05, momentum=0.9)
    model = ModelHparams(model="conv2")
    options = RunOptions(out=out, progress=False, log=lambda m: None)
    imp = run_imp(IMPJob(data, model, training, IMPHparams(levels=1, rate=0.6, scope="layerwise", rewind="1it")), options)
    cs = run_cs(CSJob(data, model, training, CSHparams(rounds=1, rewind="1it", s0=0.05, lam=1e-6,
                                                       temperature_schedule="iteration"), dense_reference=False), options)
    return out, options, Path(imp["run_dir"]), Path(cs["run_dir"])


def test_structure_after_imp_and_cs_retrains_from_the_rewind_point(tiny_runs):
    from lottery.export import export_model
    from lottery.io import load_tensors, read_json
    from lottery.pipelines.structured import StructureJob, load_run_network, run_structure

    out, options, imp_dir, cs_dir = tiny_runs
    r = run_structure(StructureJob(imp_dir, StructuredHparams(method="refill")), options)
    assert r["method"] == "refill" and r["after"] == "imp" and r["level"] == 1
    assert set(r) >= {"density", "test_accuracy", "epochs", "retrain_epochs", "source_density", "channels"}
    folder = Path(r["run_dir"])
    mask = Mask.load(folder / "mask.safetensors")
    src_mask = Mask.load(imp_dir / "level_1" / "mask.safetensors")
    assert mask == refill(src_mask, load_tensors(imp_dir / "level_1" / "model.safetensors"))
    state = load_tensors(folder / "model.safetensors")
    for name, m in mask.items():
        assert not bool(state[name][~m].any()), "pruned weights are exactly zero after retraining"
        dead = ~_rows(m).any(1)
        bias = state[name.replace(".weight", ".bias")]
        if name != "fc.weight":
            assert not bool(bias[dead].any()), "removed channels have zero bias"
    assert read_json(folder / "results.json") == run_structure(StructureJob(imp_dir, StructuredHparams()), options)

    model, loaded_mask, info = load_run_network(folder)
    assert loaded_mask == mask and info["method"] == "refill"
    exported = export_model(model, loaded_mask, "dense")
    assert exported.description["layers"]["features.0"]["out"] == int(_rows(mask["features.0.weight"]).all(1).sum())

    c = run_structure(StructureJob(cs_dir, StructuredHparams(method="refill+", fillback_rate=0.5), after="cs"), options)
    assert c["after"] == "cs" and c["level"] is None and c["method"] == "refill+"
    with pytest.raises(ConfigError):
        run_structure(StructureJob(cs_dir, StructuredHparams(), after="imp"), options)


def test_structured_epochs_are_the_source_epochs_for_the_mask_plus_the_retraining(tiny_runs):
    from lottery.io import read_json
    from lottery.pipelines.structured import StructureJob, run_structure

    out, options, imp_dir, cs_dir = tiny_runs
    cs, level = read_json(cs_dir / "results.json"), read_json(imp_dir / "level_1" / "results.json")
    hp = StructuredHparams(method="refill+", fillback_rate=0.25)
    # The mask comes from the CS search's rounds (not its ticket's retraining), or from the IMP chain up
    # to and including the level (whose trained weights score the channels).
    for source, after, mask_epochs in ((cs_dir, "cs", cs["search_epochs"]), (imp_dir, "imp", level["epochs"])):
        r = run_structure(StructureJob(source, hp, after=after), options)
        assert r["source_epochs"] == pytest.approx(mask_epochs)
        assert r["retrain_epochs"] > 0
        assert r["epochs"] == pytest.approx(mask_epochs + r["retrain_epochs"])


def test_structure_inside_the_imp_loop(tiny_runs):
    from lottery.pipelines.structured import StructuredIMPJob, run_structured_imp

    out, options, imp_dir, _ = tiny_runs
    s = run_structured_imp(StructuredIMPJob(imp_dir, StructuredHparams(method="refill"), levels=2), options)
    assert [lv["level"] for lv in s["levels"]] == [1, 2]
    d1, d2 = (lv["density"] for lv in s["levels"])
    assert d2 < d1 < 1.0
    for lv in s["levels"]:
        m = Mask.load(Path(lv["level_dir"]) / "mask.safetensors")
        for t in m.values():
            assert torch.equal(_rows(t).all(1), _rows(t).any(1)), "whole channels at every level"
    again = run_structured_imp(StructuredIMPJob(imp_dir, StructuredHparams(method="refill"), levels=2), options)
    assert again["levels"] == s["levels"]


def test_nm_tickets_after_imp_after_cs_and_inside_the_imp_loop(tiny_runs):
    from lottery.io import load_tensors
    from lottery.methods.nm import nm_prune, satisfies_nm
    from lottery.pipelines.structured import StructuredIMPJob, StructureJob, run_structure, run_structured_imp

    out, options, imp_dir, cs_dir = tiny_runs
    hp = StructuredHparams(method="nm", nm="2:4")
    r = run_structure(StructureJob(imp_dir, hp), options)
    mask = Mask.load(Path(r["run_dir"]) / "mask.safetensors")
    src = Mask.load(imp_dir / "level_1" / "mask.safetensors")
    assert satisfies_nm(mask, 2, 4) and mask == nm_prune(src, load_tensors(imp_dir / "level_1" / "model.safetensors"))
    assert "structure-nm_" in r["run_dir"]

    c = run_structure(StructureJob(cs_dir, hp, after="cs"), options)
    cs_mask = Mask.load(Path(c["run_dir"]) / "mask.safetensors")
    raw = load_tensors(cs_dir / "round_0" / "state.safetensors")
    logits = {n: raw[n + "_mask_logits"] for n in cs_mask}
    assert satisfies_nm(cs_mask, 2, 4)
    assert cs_mask == nm_prune(Mask.load(cs_dir / "mask.safetensors"), {}, 2, 4, scores=logits), "the logits decide"

    s = run_structured_imp(StructuredIMPJob(imp_dir, hp, levels=2), options)  # N:M as IMP's granularity
    for lv in s["levels"]:
        assert satisfies_nm(Mask.load(Path(lv["level_dir"]) / "mask.safetensors"), 2, 4)
    assert s["levels"][1]["density"] < s["levels"][0]["density"] <= 0.5


# ============================================================================ command line


def _run_cli(argv: list[str]) -> int:
    """``lottery`` with this module's commands registered (also before lottery.cli wires them in)."""
    import argparse

    from lottery import cli
    import lottery.cli.common as cli_common
    from lottery.cli.structured import register

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "export" not in sub.choices:
        register(sub, cli_common.common_flags)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")
def test_cli_structure_export_and_bench_latency(tiny_runs, tmp_path, capsys):
    import json

    from lottery.export import load_export

    out, options, imp_dir, cs_dir = tiny_runs
    assert _run_cli(["structure", "refill", str(imp_dir), "--after", "imp", "--out", str(tmp_path), "--no-progress"]) == 0
    (run,) = tmp_path.glob("structure-refill_*")
    assert json.loads((run / "results.json").read_text())["method"] == "refill"
    assert _run_cli(["export", str(run), "--to", "dense"]) == 0
    text = capsys.readouterr().out
    assert "check: max |masked - exported|" in text and "features.0" in text
    exported = load_export(run / "export-dense")
    assert exported.description["source"]["run_dir"] == str(run)
    # the run's data set normalisation (synthetic: measured on its generated training set) is recorded and
    # applied: the export and its TorchScript copy take raw pixels in [0, 1]
    from lottery import masking
    from lottery.data import load_train_test
    from lottery.pipelines.structured import load_run_network

    train, _ = load_train_test("synthetic", shape=(1, 8, 8), num_classes=4, train_size=96, test_size=64)
    pre = exported.description["preprocessing"]
    assert pre["mean"] == pytest.approx(list(train.mean)) and pre["std"] == pytest.approx(list(train.std))
    model, mask, _ = load_run_network(run)
    masking.attach_hard_mask(model, mask)
    raw = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        want = model.eval()((raw - pre["mean"][0]) / pre["std"][0])
        assert torch.allclose(exported.module(raw), want, atol=1e-4)
        assert torch.allclose(torch.jit.load(str(run / "export-dense" / "model.pt"))(raw), want, atol=1e-4)
    assert exported.description["portable"]["torchscript"]["check"]["ok"]
    assert _run_cli(["bench-latency", str(run / "export-dense"), "--batch-sizes", "1,2", "--repeats", "3",
                     "--warmup", "1", "--json", str(tmp_path / "lat.json")]) == 0
    report = json.loads((tmp_path / "lat.json").read_text())
    assert {r["variant"] for r in report["rows"]} == {"dense", "dense:channels_last", "masked", "export:dense"}
    assert set(report["speedup"]) == {"1", "2"}
    assert _run_cli(["bench-latency", str(cs_dir), "--batch-sizes", "1", "--repeats", "2", "--warmup", "0"]) == 0
    assert "export:csr" in capsys.readouterr().out


def test_regroup_with_channel_columns_keeps_whole_input_channels():
    hp = StructuredHparams(method="regroup", parts=4, min_rows=4, max_rows=8, columns="channel")
    mask, _ = _random_mask(6, {"conv.weight": (32, 8, 3, 3), "fc.weight": (16, 12)}, 0.25)
    blocks = regroup_blocks(mask, hp, partition=_stripes(0, 0))
    new = regroup(mask, None, hp, partition=_stripes(0, 0))
    for b in blocks["conv.weight"]:
        chans = {c // 9 for c in b.cols}
        assert len(b.cols) == 9 * len(chans), "every kernel position of each chosen input channel"
        per_channel = mask["conv.weight"][list(b.rows)].sum((0, 2, 3))
        nnz = int(per_channel.sum())
        assert len(chans) == max(1, min(int((per_channel > 0).sum()), int(Fraction("1.5") * nnz) // (9 * len(b.rows))))
    union = torch.zeros(32, 72, dtype=torch.bool)
    for b in blocks["conv.weight"]:
        union[torch.tensor(b.rows)[:, None], torch.tensor(b.cols)[None]] = True
    assert torch.equal(union, _rows(new["conv.weight"]))
    # a Linear layer's unit is one weight either way
    assert regroup_blocks(mask, hp.replace(columns="element"), partition=_stripes(0, 0))["fc.weight"] == blocks["fc.weight"]
