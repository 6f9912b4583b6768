"""``lottery export RUN --to semi`` and ``lottery bench-latency --to semi`` (issue 22): an N:M ticket exported
as its full-size dense masked network, the pattern and its layers in model.json, the semi-structured kernels
on a supporting GPU and one fallback line elsewhere; unstructured tickets are refused before anything is
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lottery import masking
from lottery.errors import ConfigError
from lottery.methods.nm import satisfies_nm


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-level IMP run of conv2 on tiny synthetic 1x8x8 data (unstructured) and its 2:4 nm ticket."""
    from lottery.experiment import RunOptions
    from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
    from lottery.methods.imp import IMPHparams
    from lottery.methods.structured import StructuredHparams
    from lottery.pipelines.imp import IMPJob, run_imp
    from lottery.pipelines.structured import StructureJob, run_structure

    out = tmp_path_factory.mktemp("semi_runs")
    data = DataHparams(dataset="synthetic", val_size=32, synthetic_shape=(1, 8, 8), synthetic_classes=4,
                       synthetic_train_size=96, synthetic_test_size=64)
    training = TrainingHparams(training_steps="1ep", batch_size=32, lr=0.05, momentum=0.9)
    options = RunOptions(out=out, progress=False, log=lambda m: None)
    imp = run_imp(IMPJob(data, ModelHparams(model="conv2"), training,
                         IMPHparams(levels=1, rate=0.3, scope="layerwise", rewind="1it")), options)
    nm = run_structure(StructureJob(Path(imp["run_dir"]), StructuredHparams(method="nm", nm="2:4"), after="imp"),
                       options)
    return Path(imp["run_dir"]), Path(nm["run_dir"])


def _main(argv: list[str]) -> int:
    from lottery.cli import main

    return main(argv)


def test_semi_export_equals_the_masked_network_and_records_the_pattern(runs, tmp_path, capsys):
    from lottery.export import load_export
    from lottery.pipelines.structured import load_run_network

    _, nm_run = runs
    out = tmp_path / "semi"
    assert _main(["export", str(nm_run), "--to", "semi", "--out", str(out), "--no-preprocessing"]) == 0
    text = capsys.readouterr().out
    assert "N:M 2:4 Linear layers:" in text and "dense masked" in text
    desc = json.loads((out / "model.json").read_text())
    assert desc["kind"] == "semi" and desc["check"]["ok"] and (out / "model.safetensors").exists()
    model, mask, _ = load_run_network(nm_run)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert desc["nm"]["pattern"] == "2:4"
    assert desc["nm"]["layers"] == [n for n in linears if f"{n}.weight" in mask
                                    and satisfies_nm({"w": mask[f"{n}.weight"]}, 2, 4)]
    assert desc["nm"]["layers"], "an nm ticket's Linear layers keep 2:4"
    # full size: no channel surgery (it would shift the groups of 4 consecutive inputs)
    for layer in desc["layers"].values():
        assert layer["out"] == layer["out_original"] and layer["in"] == layer["in_original"]

    lines: list[str] = []
    loaded = load_export(out, log=lines.append)
    assert loaded.semi_structured == [] and len(lines) == 1 and "dense masked" in lines[0]
    masking.attach_hard_mask(model, mask)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.eval()(x)
        got = loaded.module(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # the stored Linear weights keep the pattern (what the GPU loader converts)
    checked = [op["name"] for op, module in zip(desc["ops"], loaded.module)
               if op.get("name") in desc["nm"]["layers"] and satisfies_nm({"w": module.weight.ne(0)}, 2, 4)]
    assert checked == desc["nm"]["layers"]


def test_an_unstructured_run_is_refused_before_anything_is_written(runs, tmp_path, capsys):
    imp_run, _ = runs
    out = tmp_path / "refused"
    assert _main(["export", str(imp_run), "--to", "semi", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export --to semi needs an N:M ticket" in err[0] and "lottery structure nm" in err[0]
    assert not out.exists()
    assert not list(imp_run.rglob("export-semi"))


def test_export_model_refusal_is_one_line():
    from torch import nn

    from lottery.export import export_model

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ConfigError) as info:
        export_model(net, None, "semi", input_shape=(1, 4, 4))
    assert "\n" not in str(info.value)


def test_bench_latency_times_semi_and_marks_the_cpu_row_as_the_dense_fallback(runs, tmp_path, capsys):
    _, nm_run = runs
    capsys.readouterr()
    assert _main(["bench-latency", str(nm_run), "--to", "dense,semi", "--device", "cpu", "--batch-sizes", "1",
                  "--repeats", "2", "--warmup", "0", "--json", str(tmp_path / "lat.json")]) == 0
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "lat.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["dense", "masked", "export:dense", "export:semi (dense fallback)"]
    assert "| 1 | export:semi (dense fallback) |" in text
    assert sum("semi-structured 2:4 kernels not used" in line for line in text.splitlines()) == 1
    assert report["cost"]["export:semi (dense fallback)"]["flops_sparse"] > 0

    # an export folder of kind semi: loaded once per device, one fallback line on the CPU
    out = tmp_path / "semi"
    assert _main(["export", str(nm_run), "--to", "semi", "--out", str(out), "--portable", "none"]) == 0
    capsys.readouterr()
    assert _main(["bench-latency", str(out), "--device", "cpu", "--batch-sizes", "1", "--repeats", "2",
                  "--warmup", "0"]) == 0
    text = capsys.readouterr().out
    assert "| 1 | export:semi (dense fallback) |" in text
    assert sum("semi-structured 2:4 kernels not used" in line for line in text.splitlines()) == 1


def test_bench_latency_of_an_nm_run_times_semi_by_default(runs, capsys):
    _, nm_run = runs
    assert _main(["bench-latency", str(nm_run), "--device", "cpu", "--batch-sizes", "1", "--repeats", "1",
                  "--warmup", "0"]) == 0
    assert "export:semi (dense fallback)" in capsys.readouterr().out


def test_the_cli_lists_the_export_kinds_of_the_library():
    from lottery.cli.structured import EXPORT_KINDS as CLI_KINDS
    from lottery.export import EXPORT_KINDS

    assert CLI_KINDS == EXPORT_KINDS
