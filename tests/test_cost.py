"""lottery.cost: parameters and FLOPs of sparse networks, against hand-computed counts and the run folders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lottery import masking
from lottery.cost import add_cost, layer_positions, network_cost, requested_density_fields
from lottery.experiment import RunOptions
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import read_json
from lottery.masks import Mask
from lottery.methods.gmp import GMPHparams
from lottery.models import build_model
from lottery.pipelines.gmp import GMPJob, run_gmp


def test_lenet_300_100_dense_is_266200_macs_per_example():
    model = build_model("lenet_300_100", input_shape=(1, 28, 28), num_classes=10)
    cost = network_cost(model, None, (1, 28, 28))
    assert cost["flops_dense"] == cost["flops_sparse"] == 784 * 300 + 300 * 100 + 100 * 10 == 266_200
    assert cost["params_total"] == cost["params_nonzero"] == 266_200 + 300 + 100 + 10  # with biases
    assert cost["theoretical_speedup"] == 1.0


class _SmallConvNet(nn.Module):
    """conv 1->4 3x3 pad 1 on 6x6, pool 2, conv 4->2 3x3 no pad on 3x3, linear 2 -> 3 (per position of 1x1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 3, bias=False)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def test_a_hand_built_mask_gives_the_hand_computed_count():
    model = _SmallConvNet()
    m1 = torch.zeros(4, 1, 3, 3, dtype=torch.bool)
    m1[0] = True  # one output channel kept: 9 weights
    m1[1, 0, 1, 1] = True  # and one weight of another: 10 in all
    m2 = torch.ones(2, 4, 3, 3, dtype=torch.bool)
    m2[1] = False  # half of conv2: 36 of 72
    mask = Mask({"conv1.weight": m1, "conv2.weight": m2})
    assert layer_positions(model, (1, 6, 6)) == {"conv1": 36, "conv2": 1, "fc": 1}
    cost = network_cost(model, mask, (1, 6, 6))
    # dense: conv1 36 weights x 36 positions + conv2 72 x 1 + fc 6 x 1
    assert cost["flops_dense"] == 36 * 36 + 72 + 6
    assert cost["flops_sparse"] == 10 * 36 + 36 + 6
    assert cost["theoretical_speedup"] == pytest.approx((36 * 36 + 72 + 6) / (10 * 36 + 36 + 6))
    total = 36 + 4 + 72 + 6 + 3
    assert cost["params_total"] == total and cost["params_nonzero"] == total - 26 - 36
    layers = cost["layers"]
    assert layers["conv1.weight"]["flops_share"] == pytest.approx(36 * 36 / (36 * 36 + 72 + 6))
    assert layers["fc.weight"]["kept"] == 6  # not in the mask: dense
    assert math.isclose(sum(v["flops_share"] for v in layers.values()), 1.0)


def test_soft_and_hard_masked_models_count_like_the_plain_one():
    plain = _SmallConvNet()
    soft = _SmallConvNet()
    masking.attach_soft_mask(soft, None, s0=0.0)  # mask logits are not parameters of the network's cost
    assert network_cost(soft, None, (1, 6, 6)) == network_cost(plain, None, (1, 6, 6))


def test_requested_density_error_is_relative():
    assert requested_density_fields(0.05, 0.045) == {"requested_density": 0.05,
                                                      "density_relative_error": pytest.approx(-0.1)}
    assert requested_density_fields(None, 0.3) == {}


def test_add_cost_writes_each_layers_flops_into_mask_json(tmp_path: Path):
    model = _SmallConvNet()
    mask = Mask({"conv1.weight": torch.ones(4, 1, 3, 3, dtype=torch.bool), "conv2.weight": torch.zeros(2, 4, 3, 3, dtype=torch.bool)})
    report = mask.save(tmp_path / "mask.safetensors")
    results = add_cost({"density": mask.density()}, model, mask, (1, 6, 6), report, requested_density=0.4)
    on_disk = read_json(report)
    assert on_disk["layers"]["conv2.weight"]["flops_sparse"] == 0
    assert on_disk["layers"]["conv1.weight"]["flops_share"] == pytest.approx(36 * 36 / (36 * 36 + 72 + 6))
    assert on_disk["flops_sparse"] == results["flops_sparse"] == 36 * 36 + 6
    assert results["density_relative_error"] == pytest.approx((mask.density() - 0.4) / 0.4)


def test_a_runs_results_json_holds_the_cost_of_its_saved_mask(tmp_path: Path):
    data = DataHparams(dataset="synthetic", synthetic_shape=(1, 8, 8), synthetic_train_size=200,
                       synthetic_test_size=100, val_size=40)
    job = GMPJob(data, ModelHparams("lenet_300_100"), TrainingHparams(training_steps="3ep", batch_size=32, lr=0.05),
                 GMPHparams(density=0.05, prune_start="1ep", prune_end="2ep", prune_every="2it"))
    results = run_gmp(job, RunOptions(out=tmp_path, progress=False, log=lambda m: None))
    folder = Path(results["run_dir"])
    mask = Mask.load(folder / "mask.safetensors")
    model = build_model("lenet_300_100", input_shape=(1, 8, 8), num_classes=10)
    expected = network_cost(model, mask, (1, 8, 8))
    on_disk = read_json(folder / "results.json")
    for key in ("params_total", "params_nonzero", "flops_dense", "flops_sparse", "theoretical_speedup"):
        assert on_disk[key] == expected[key], key
    assert on_disk["flops_dense"] == 64 * 300 + 300 * 100 + 100 * 10
    assert on_disk["requested_density"] == 0.05
    assert abs(on_disk["density_relative_error"]) < 0.01
    layers = read_json(folder / "mask.json")["layers"]
    assert layers["fc_layers.0.weight"]["flops_sparse"] == int(mask["fc_layers.0.weight"].sum())
