"""The GPU presets hold the reference recipes; here each runs a few iterations on synthetic data of
its real input shape (CPU), through the same command line a user types on a GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lottery.cli import main
from lottery.presets import PRESETS, get_preset

SHAPES = {"cifar10_resnet20": "3,32,32", "cifar10_vgg16": "3,32,32", "imagenet_resnet50": "3,224,224",
          "fashion_conv4_narrow": "1,28,28", "fashion_resnet20": "1,28,28"}
CPU_PRESETS_RUN_ELSEWHERE = {"fashion_lenet"}  # tests/test_cli.py and the README's `make run` train it on real data


def _tiny(preset: str, tmp_path: Path, batch: int) -> list[str]:
    classes = "1000" if preset == "imagenet_resnet50" else "10"
    return ["--preset", preset, "--dataset", "synthetic", "--synthetic-shape", SHAPES[preset],
            "--synthetic-classes", classes, "--synthetic-train-size", str(2 * batch), "--synthetic-test-size", "4",
            "--val-size", "0", "--batch-size", str(batch), "--training-steps", "2it", "--milestones", "1it",
            "--warmup-steps", "0it", "--eval-every", "2it", "--no-progress", "--out", str(tmp_path)]


def test_reference_recipes_are_the_documented_ones():
    r20 = get_preset("cifar10_resnet20")
    assert (r20.training.training_steps, r20.training.lr, r20.training.momentum, r20.training.weight_decay) == ("160ep", 0.1, 0.9, 1e-4)
    assert r20.training.milestones == ("80ep", "120ep") and r20.data.val_size == 5000
    assert r20.methods["cs"]["round_steps"] == "85ep" and r20.methods["cs"]["round_milestones"] == ("56ep", "71ep")
    assert r20.methods["cs"]["rewind"] == "2ep" and r20.methods["imp"]["rewind"] == "500it"
    assert get_preset("cifar10_vgg16").methods["imp"]["rewind"] == "1000it"
    r50 = get_preset("imagenet_resnet50").training
    assert (r50.batch_size, r50.lr, r50.training_steps, r50.warmup_steps) == (1024, 0.4, "90ep", "5ep")
    assert r50.milestones == ("30ep", "60ep", "80ep")


@pytest.mark.parametrize("preset", ["cifar10_resnet20", "cifar10_vgg16"])
def test_cifar_presets_cs_and_imp_smoke(preset, tmp_path, capsys):
    args = _tiny(preset, tmp_path, batch=8)
    cs = ["--round-steps", "2it", "--round-milestones", "1it", "--rewind", "1it", "--rounds", "2", "--no-dense"]
    assert main(["search", "cs", *args, *cs]) == 0
    assert main(["search", "imp", *args, "--levels", "1", "--rewind", "1it"]) == 0
    (cs_dir,) = tmp_path.glob("search-cs_*")
    results = json.loads((cs_dir / "results.json").read_text())
    assert 0 < results["density"] <= 1
    mask = json.loads((cs_dir / "mask.json").read_text())
    if preset == "cifar10_resnet20":  # the CS reference masks only the 3x3 convs
        assert not any("shortcut" in name or name.startswith("fc.") for name in mask["layers"])
        assert "conv1.weight" in mask["layers"] and "layer3.2.conv2.weight" in mask["layers"]
    (imp_dir,) = tmp_path.glob("search-imp_*")
    assert json.loads((imp_dir / "level_1" / "results.json").read_text())["density"] == pytest.approx(0.8, abs=1e-3)


@pytest.mark.slow
def test_imagenet_resnet50_cs_smoke(tmp_path):
    """ResNet-50 at 224x224, 1000 classes: two CS iterations and a ticket step (slow-ish on a CPU)."""
    args = _tiny("imagenet_resnet50", tmp_path, batch=2)
    assert main(["search", "cs", *args, "--rounds", "1", "--rewind", "1it", "--no-dense"]) == 0
    (cs_dir,) = tmp_path.glob("search-cs_*")
    results = json.loads((cs_dir / "results.json").read_text())
    assert results["model"] == "resnet50" and 0 < results["density"] <= 1


def test_narrow_conv_preset_cs_and_imp_smoke(tmp_path):
    """The CPU convolutional benchmark recipe: Conv-4 at width 0.125 (8, 8, 16, 16 channels) builds and
    runs CS and IMP from the command line; its run folders record the width."""
    args = _tiny("fashion_conv4_narrow", tmp_path, batch=8)
    assert main(["search", "cs", *args, "--round-steps", "2it", "--rewind", "1it", "--rounds", "2", "--no-dense"]) == 0
    assert main(["search", "imp", *args, "--levels", "1", "--rewind", "1it"]) == 0
    (cs_dir,) = tmp_path.glob("search-cs_*")
    hparams = json.loads((cs_dir / "hparams.json").read_text())
    assert hparams["model"]["model"] == "conv4" and hparams["model"]["width"] == 0.125
    mask = json.loads((cs_dir / "mask.json").read_text())
    assert "features.0.weight" in mask["layers"] and "fc.weight" not in mask["layers"]
    (imp_dir,) = tmp_path.glob("search-imp_*")
    assert json.loads((imp_dir / "level_1" / "results.json").read_text())["density"] == pytest.approx(0.8, abs=1e-3)


def test_residual_cpu_preset_cs_and_imp_smoke(tmp_path):
    """The CPU residual benchmark recipe (issue 21): ResNet-20 at width 0.25 runs CS, IMP and dense training
    from the command line for two iterations on synthetic data of Fashion-MNIST's shape."""
    args = _tiny("fashion_resnet20", tmp_path, batch=8)
    assert main(["search", "cs", *args, "--round-steps", "2it", "--rewind", "1it", "--rounds", "2", "--no-dense"]) == 0
    assert main(["search", "imp", *args, "--levels", "1", "--rewind", "1it"]) == 0
    (cs_dir,) = tmp_path.glob("search-cs_*")
    hparams = json.loads((cs_dir / "hparams.json").read_text())
    assert hparams["model"] == {"model": "resnet20", "prune_ignore": None, "width": 0.25}
    assert hparams["training"]["training_steps"] == "2it" and hparams["training"]["schedule"] == "cosine"
    mask = json.loads((cs_dir / "mask.json").read_text())
    assert mask["layers"]["conv1.weight"]["shape"] == [4, 1, 3, 3]
    assert mask["layers"]["layer3.2.conv2.weight"]["shape"] == [16, 16, 3, 3]
    (imp_dir,) = tmp_path.glob("search-imp_*")
    assert json.loads((imp_dir / "level_1" / "results.json").read_text())["density"] == pytest.approx(0.8, abs=1e-3)


def test_every_preset_is_smoke_tested():
    assert set(PRESETS) - CPU_PRESETS_RUN_ELSEWHERE == set(SHAPES)
