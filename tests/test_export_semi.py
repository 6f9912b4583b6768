"""The ``semi`` export (2:4 N:M Linear layers for sparse tensor cores): it computes the masked network, records
its 2:4 layers, refuses tickets without any, loads anywhere (here: the dense masked layers and one line
saying why), and bench-latency times it without claiming a speed-up it did not get. The GPU path itself is
in tests/test_cuda.py; here only the decision (a pure function of device, dtype and compute capability)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lottery import masking
from lottery.export import (
    ExportError, export_model, load_export, save_export, semi_structured, semi_structured_supported,
)
from lottery.export.semi import semi_shape_supported, two_four
from lottery.masks import Mask
from lottery.methods.nm import nm_mask
from lottery.models import build_model, get_model_spec

SHAPE = (1, 16, 16)
FALLBACK_LINE = ("semi-structured 2:4: no CUDA GPU with compute capability >= 8.0 here; the N:M Linear layers run as "
                 "dense masked layers")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the line of a machine without a CUDA GPU")


def _nm_ticket(name: str = "conv2", seed: int = 0) -> tuple[nn.Module, Mask]:
    """A hard-masked network whose prunable weights (convs and Linear layers) are 2:4 by magnitude."""
    torch.manual_seed(seed)
    model = build_model(name, input_shape=SHAPE, num_classes=5)
    names = masking.prunable_weights(model, ignore=get_model_spec(name).prune_ignore)
    params = dict(model.named_parameters())
    mask = nm_mask({n: params[n].detach().abs() for n in names}, 2, 4)
    masking.attach_hard_mask(model, mask)
    return model.eval(), mask


def _masked_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_two_four_is_at_most_two_of_every_four_consecutive_inputs():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3], [0, 0, 0, 0, 1, 1, 0, 0]])
    assert two_four(w)
    assert not two_four(torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 0]]))  # 3 in the first group
    assert not two_four(torch.tensor([[1.0, 0, 0, 0, 0, 0]]))  # 6 inputs: not whole groups of 4
    assert not two_four(torch.zeros(2, 2, 4))  # not a matrix
    assert not two_four(w.t().contiguous())  # the pattern runs along the inputs (rows), not the outputs


def test_semi_export_equals_the_masked_network_and_records_its_2_4_layers(tmp_path):
    model, mask = _nm_ticket()
    exported = export_model(model, mask, "semi")
    d = exported.description
    assert d["kind"] == "semi" and d["check"]["ok"]
    x = torch.randn(6, *SHAPE)
    assert float((_masked_outputs(exported.module, x) - _masked_outputs(model, x)).abs().max()) <= 1e-5
    # no channel surgery: every layer keeps its full shape (the groups of 4 and the kernels' multiples)
    assert all(layer["in"] == layer["in_original"] and layer["out"] == layer["out_original"]
               for layer in d["layers"].values())
    layers = d["semi"]["layers"]
    assert d["semi"]["pattern"] == "2:4"
    assert set(layers) == {n.removesuffix(".weight") for n in mask}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, entry in layers.items():
        module = exported.module.get_submodule(entry["module"])
        if name in linears:
            assert entry["eligible"] and isinstance(module, nn.Linear)
            assert entry["shape"] == list(module.weight.shape) and two_four(module.weight)
        else:  # conv layers: torch has no semi-structured convolutions
            assert not entry["eligible"] and "conv" in entry["why"]
    folder = save_export(tmp_path / "e", exported, portable=("torchscript",))
    assert json.loads((folder / "model.json").read_text())["semi"] == d["semi"]
    assert json.loads((folder / "model.json").read_text())["portable"]["torchscript"]["check"]["ok"]


@no_gpu
def test_loading_a_semi_export_off_a_gpu_keeps_the_dense_masked_layers_and_says_so_in_one_line(tmp_path, capsys):
    model, mask = _nm_ticket()
    folder = save_export(tmp_path / "e", export_model(model, mask, "semi"))
    lines: list[str] = []
    loaded = load_export(folder, log=lines.append)
    assert lines == [FALLBACK_LINE]
    assert loaded.description["semi"]["converted"] == []
    x = torch.randn(4, *SHAPE)
    assert float((_masked_outputs(loaded.module, x) - _masked_outputs(model, x)).abs().max()) <= 1e-5
    capsys.readouterr()
    load_export(folder)  # the default: the line goes to standard error, once
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [FALLBACK_LINE] and captured.out == ""
    # asking for the GPU's dtype on the CPU changes nothing but the dtype, still in one line
    lines.clear()
    half = load_export(folder, dtype=torch.bfloat16, log=lines.append)
    assert len(lines) == 1 and next(half.module.parameters()).dtype == torch.bfloat16


def test_a_ticket_without_2_4_linear_layers_is_refused_in_one_line():
    torch.manual_seed(0)
    model = build_model("conv2", input_shape=SHAPE, num_classes=5)
    names = masking.prunable_weights(model, ignore=get_model_spec("conv2").prune_ignore)
    g = torch.Generator().manual_seed(1)
    mask = Mask({n: torch.rand(p.shape, generator=g) < 0.6 for n, p in names.items()})  # unstructured, IMP-like
    masking.attach_hard_mask(model, mask)
    with pytest.raises(ExportError, match=r"^a semi export needs a 2:4 ticket: no Linear layer of .* lottery "
                                          r"structure nm RUN_DIR --nm 2:4\)$") as info:
        export_model(model, mask, "semi")
    assert "\n" not in str(info.value)


def test_the_decision_is_a_function_of_device_dtype_and_compute_capability():
    ok, why = semi_structured_supported("cuda", torch.float16, capability=(7, 5))
    assert not ok and "compute capability is 7.5, below 8.0" in why
    ok, why = semi_structured_supported("cuda", torch.float64, capability=(9, 0))
    assert not ok and why.startswith("float64 weights:") and "float16" in why
    for dtype in (torch.float16, torch.bfloat16):
        ok, why = semi_structured_supported("cuda", dtype, capability=(8, 0))
        assert ok, why
    ok, why = semi_structured_supported("cpu", torch.float16, capability=(9, 0))  # a GPU is there, the network is not
    assert not ok and "not the CUDA GPU" in why and "device='cuda'" in why
    if not torch.cuda.is_available():
        assert semi_structured_supported("cpu", torch.float16) == (False, "no CUDA GPU with compute capability >= 8.0 here")
        assert semi_structured_supported("cuda", torch.float16)[0] is False


def test_shape_rules_are_torchs_multiples():
    assert semi_shape_supported((128, 128), torch.float16)[0]  # both backends: 16x16 (cuSPARSELt), 32x64 (CUTLASS)
    ok, why = semi_shape_supported((300, 64), torch.float16)
    assert not ok and why.startswith("300x64 is not a multiple of")


def test_semi_structured_on_a_plain_module_falls_back_unchanged_with_one_line_off_a_gpu():
    net = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        net[0].weight.mul_(nm_mask({"w": net[0].weight.abs()}, 2, 4)["w"])
    x = torch.randn(3, 128)
    before = net(x)
    lines: list[str] = []
    out, converted = semi_structured(net, log=lines.append)
    assert converted == [] and len(lines) == 1 and "dense masked" in lines[0]
    assert torch.equal(out(x), before)
    lines.clear()
    semi_structured(nn.Sequential(nn.Linear(8, 4)), log=lines.append)  # nothing 2:4: says so, once
    assert len(lines) == 1 and "nothing to convert" in lines[0]


# ============================================================================ command line


@pytest.fixture(scope="module")
def nm_run(tmp_path_factory):
    """A 1-level IMP run of LeNet-300-100 on tiny synthetic data and its 2:4 N:M ticket."""
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
    imp = run_imp(IMPJob(data, ModelHparams(model="lenet_300_100"), training,
                         IMPHparams(levels=1, rate=0.6, scope="layerwise", rewind="1it")), options)
    nm = run_structure(StructureJob(Path(imp["run_dir"]), StructuredHparams(method="nm", nm="2:4")), options)
    return Path(imp["run_dir"]), Path(nm["run_dir"])


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_cli_export_to_semi_and_bench_latency_mark_the_fallback(nm_run, tmp_path, capsys):
    from lottery.cli import main

    imp_dir, nm_dir = nm_run
    assert main(["export", str(nm_dir), "--to", "semi"]) == 0
    text = capsys.readouterr().out
    assert "2:4 Linear layers: fc_layers.0 (300x64), fc_layers.2 (100x300)" in text
    desc = json.loads((nm_dir / "export-semi" / "model.json").read_text())
    assert desc["kind"] == "semi" and desc["check"]["ok"] and (nm_dir / "export-semi" / "model.pt").exists()

    # an unstructured IMP ticket: one line, nothing written
    assert main(["export", str(imp_dir), "--to", "semi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lottery: error: a semi export needs a 2:4 ticket")
    assert not (imp_dir / "level_1" / "export-semi").exists()

    assert main(["bench-latency", str(nm_dir), "--to", "dense,semi", "--batch-sizes", "2", "--repeats", "2",
                 "--warmup", "0", "--device", "cpu", "--json", str(tmp_path / "lat.json")]) == 0
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "lat.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["dense", "masked", "export:dense", "export:semi"]
    assert report["settings"]["dtype"] == "float32"
    note = report["notes"]["export:semi"]
    assert note.startswith("timed as the dense masked network (semi-structured 2:4:")
    assert "| 2 | export:semi* |" in text and f"* export:semi: {note}" in text
    # not converted: its FLOPs are the dense network's, so it promises no speed-up
    assert report["cost"]["export:semi"]["flops_sparse"] == report["cost"]["dense"]["flops_sparse"]

    # an export folder, and the N:M run's default kinds
    assert main(["bench-latency", str(nm_dir / "export-semi"), "--batch-sizes", "2", "--repeats", "2",
                 "--warmup", "0", "--device", "cpu"]) == 0
    assert "export:semi*" in capsys.readouterr().out
    assert main(["bench-latency", str(nm_dir), "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
                 "--device", "cpu", "--json", str(tmp_path / "auto.json")]) == 0
    auto = json.loads((tmp_path / "auto.json").read_text())
    assert {r["variant"] for r in auto["rows"]} == {"dense", "masked", "export:dense", "export:semi"}


# ============================================================================ the GPU benchmark's dry run


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "nm_layer_speed.py"
    spec = importlib.util.spec_from_file_location("nm_layer_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nm_layer_speed_dry_run_checks_the_masks_without_a_gpu(capsys):
    bench = _benchmark()
    assert bench.main(["--dry-run", "--sizes", "64,128"]) == 0
    out = capsys.readouterr().out
    assert "64x64: 2:4 yes, kept 2048/4096" in out and "128x128: 2:4 yes, kept 8192/16384" in out
    assert "dry run: every check passed" in out


@no_gpu
def test_nm_layer_speed_without_a_gpu_exits_2_in_one_line(capsys):
    assert _benchmark().main(["--sizes", "64"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["nm_layer_speed: nothing timed: no CUDA GPU with compute capability >= 8.0 here "
                   "(--dry-run checks the masks on any machine)"]
