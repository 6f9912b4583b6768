"""A structured ticket's results.json describes the mask it saved, and its export computes the masked network.

refill, refill+ and regroup, each from an IMP level and from a CS search that really prunes: ``density``,
``kept_weights`` and ``prunable_weights`` equal what ``mask.safetensors`` holds (and the per-layer
``channels``), and the exported network's outputs equal those of the run's network under that mask.
``write_results`` refuses numbers that do not describe the saved mask, and a reused results.json whose
numbers disagree with its mask is refused naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lottery import masking
from lottery.errors import CheckpointError, LotteryError
from lottery.experiment import RunOptions, write_results
from lottery.export import export_model
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.masks import Mask
from lottery.methods.cs import CSHparams
from lottery.methods.imp import IMPHparams
from lottery.methods.structured import StructuredHparams
from lottery.pipelines.cs import CSJob, run_cs
from lottery.pipelines.imp import IMPJob, run_imp
from lottery.pipelines.structured import StructureJob, load_run_network, run_structure

DATA = DataHparams(dataset="synthetic", val_size=32, synthetic_shape=(1, 8, 8), synthetic_classes=4,
                   synthetic_train_size=96, synthetic_test_size=64)
TRAIN = TrainingHparams(training_steps="2ep", batch_size=32, lr=0.05, momentum=0.9)
METHODS = {"refill": StructuredHparams(method="refill"),
           "refill+": StructuredHparams(method="refill+", fillback_rate=0.5),
           "regroup": StructuredHparams(method="regroup", partitioner="metis", parts=4)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("structured_sources")
    options = RunOptions(out=out, progress=False, log=lambda m: None)
    model = ModelHparams(model="conv2")
    imp = run_imp(IMPJob(DATA, model, TRAIN, IMPHparams(levels=1, rate=0.6, scope="layerwise", rewind="1it")), options)
    cs = run_cs(CSJob(DATA, model, TRAIN, CSHparams(rounds=1, rewind="1it", density=0.3), dense_reference=False), options)
    assert cs["density"] < 0.5, "the CS source must really prune"
    return options, {"imp": Path(imp["run_dir"]), "cs": Path(cs["run_dir"])}


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


@pytest.mark.parametrize("after", ["imp", "cs"])
@pytest.mark.parametrize("method", list(METHODS))
def test_results_describe_the_saved_mask_and_the_export_computes_the_masked_network(sources, after, method):
    if method == "regroup":
        pytest.importorskip("pymetis", reason="regroup with --partitioner metis needs pymetis")
    options, dirs = sources
    r = run_structure(StructureJob(dirs[after], METHODS[method], after=after), options)
    folder = Path(r["run_dir"])
    written = json.loads((folder / "results.json").read_text())
    mask = Mask.load(folder / "mask.safetensors")
    assert 0.0 < mask.density() < 1.0
    for results in (r, written):
        assert results["density"] == mask.density()
        assert results["kept_weights"] == mask.num_kept() == sum(int(m.sum()) for m in mask.values())
        assert results["prunable_weights"] == mask.num_total() == sum(m.numel() for m in mask.values())
        assert results["channels"] == {n: [int(_rows(m).any(1).sum()), m.shape[0]] for n, m in mask.items()}
    # The source's mask the results name is the one in the source folder.
    src_mask = Mask.load(dirs[after] / ("mask.safetensors" if after == "cs" else "level_1/mask.safetensors"))
    assert written["source_density"] == src_mask.density()

    model, loaded, _ = load_run_network(folder)
    assert loaded == mask
    state = model.state_dict()
    for name, m in mask.items():
        assert not bool(state[name][~m].any()), f"{name}: a pruned weight is not 0 in model.safetensors"
    masking.attach_hard_mask(model, mask)
    model.eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    for kind in ("dense" if method != "regroup" else "blocks", "csr"):
        exported = export_model(model, mask, kind)
        with torch.no_grad():
            got = exported.module.eval()(x)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), f"{kind} export differs from the masked network"


def test_numbers_that_do_not_describe_the_saved_mask_are_refused(sources, tmp_path):
    options, dirs = sources
    r = run_structure(StructureJob(dirs["imp"], METHODS["refill"], after="imp"), options)
    folder = Path(r["run_dir"])
    other = Mask.load(dirs["imp"] / "level_1" / "mask.safetensors")  # the source's mask, not the saved one
    wrong = {**r, "density": other.density()}
    with pytest.raises(LotteryError, match=r"refusing to write .*results.json: density .* where mask.safetensors "
                                           r"holds .*this is a bug in lottery"):
        write_results(folder / "results.json", wrong)
    assert json.loads((folder / "results.json").read_text())["density"] == r["density"]  # untouched
    # A results.json edited by hand (or by a broken writer) is refused when the run is reused.
    (folder / "results.json").write_text(json.dumps({**r, "kept_weights": r["kept_weights"] + 1}))
    with pytest.raises(CheckpointError, match=r"results.json does not describe its folder's mask \(kept_weights"):
        run_structure(StructureJob(dirs["imp"], METHODS["refill"], after="imp"), options)


def test_bench_latency_of_a_regroup_run_puts_flop_counts_beside_the_timings(sources, tmp_path, capsys):
    """``lottery bench-latency`` on a regroup ticket: dense, masked and both exports side by side, and each
    variant's FLOPs, the speed-up they promise and the fraction of it reached come from the counts (the
    masked network's kept weights, the block export's blocks), not from the timings."""
    pytest.importorskip("pymetis", reason="regroup with --partitioner metis needs pymetis")
    from lottery.cli import main
    from lottery.cost import network_cost

    options, dirs = sources
    r = run_structure(StructureJob(dirs["imp"], METHODS["regroup"], after="imp"), options)
    folder = Path(r["run_dir"])
    capsys.readouterr()
    assert main(["bench-latency", str(folder), "--batch-sizes", "1", "--repeats", "2", "--warmup", "0",
                 "--json", str(tmp_path / "lat.json")]) == 0
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "lat.json").read_text())
    assert [row["variant"] for row in report["rows"]] == ["dense", "dense:channels_last", "masked", "export:dense",
                                                          "export:blocks"]
    model, mask, _ = load_run_network(folder)
    shape = (1, 8, 8)
    cost = report["cost"]
    assert cost["dense"]["flops_sparse"] == network_cost(model, None, shape)["flops_dense"]
    assert cost["dense:channels_last"]["flops_sparse"] == cost["dense"]["flops_sparse"]
    assert cost["masked"]["flops_sparse"] == network_cost(model, mask, shape)["flops_sparse"] < cost["dense"]["flops_sparse"]
    blocks = export_model(model, mask, "blocks")
    assert cost["export:blocks"]["flops_sparse"] == blocks.description["flops"]["export"] < cost["dense"]["flops_sparse"]
    header = next(line for line in text.splitlines() if line.startswith("| batch |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[-3:] == ["FLOPs/example", "speed-up (FLOPs)", "of it reached"]
    for variant in ("dense", "masked", "export:blocks"):
        line = next(line for line in text.splitlines() if line.startswith(f"| 1 | {variant} |"))
        cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
        theoretical = cost["dense"]["flops_sparse"] / cost[variant]["flops_sparse"]
        assert cells["FLOPs/example"] == f"{cost[variant]['flops_sparse']:,}"
        assert cells["speed-up (FLOPs)"] == f"{theoretical:.2f}x"
        assert cells["of it reached"] == f"{100 * report['speedup']['1'][variant] / theoretical:.0f}%"
