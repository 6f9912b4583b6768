"""Export: channel surgery (residual networks included), dense blocks and CSR layers compute what the
masked network computes; files are safetensors + JSON and load back without unpickling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lottery import masking
from lottery.export import (
    BlockConv2d, BlockLinear, CSRLinear, ExportError, blocks_from_mask, coupled_layers, dead_channel_params,
    describe, export_model, load_export, save_export,
)
from lottery.masks import Mask
from lottery.methods.structured import StructuredHparams, refill, regroup
from lottery.models import build_model, get_model_spec

SHAPE = (1, 16, 16)


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, input_shape=SHAPE, num_classes=5)
    with torch.no_grad():  # BatchNorm as after training: non-trivial statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_()
    return model.eval()


def _random_mask(model: nn.Module, name: str, density: float, seed: int = 0) -> Mask:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    names = masking.prunable_weights(model, ignore=get_model_spec(name).prune_ignore)
    return Mask({n: torch.rand(params[n].shape, generator=g) < density for n in names})


def _channel_ticket(model: nn.Module, mask: Mask) -> Mask:
    """What the structure pipeline trains: the refill mask plus the removed channels' bias/BN entries."""
    weights = dict(model.named_parameters())
    refilled = refill(mask, weights, groups=coupled_layers(model))
    full = Mask({**dict(refilled.items()), **dict(dead_channel_params(model, refilled).items())})
    masking.attach_hard_mask(model, full)  # zeroes the pruned weights, biases and BN parameters
    return full


def _masked_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.detach(), b.detach()
    tol = 1e-4 * max(1.0, float(a.abs().max()))
    assert float((a - b).abs().max()) <= tol


@pytest.mark.parametrize("name", ["conv2", "conv4", "vgg11", "lenet_300_100"])
def test_channel_export_is_smaller_and_equal_to_the_masked_network(name):
    model = _model(name)
    full = _channel_ticket(model, _random_mask(model, name, 0.3))
    exported = export_model(model, full, "dense")
    x = torch.randn(5, *SHAPE)
    _close(_masked_outputs(model, x), exported.module(x))
    layers = exported.description["layers"]
    ops = describe(model)
    for op in ops[:-1]:  # the output layer keeps its outputs
        if op["op"] not in ("conv", "linear"):
            continue
        key = f"{op['name']}.weight"
        if key in full:
            kept = int(full[key].reshape(full[key].shape[0], -1).all(1).sum())
            assert layers[op["name"]]["out"] == kept, "exactly the refilled channels remain"
            assert kept < op["out"]
    size = exported.description["size"]
    assert size["parameters"] < size["original_parameters"]
    # a conv's BatchNorm and the next layer's inputs shrank with it
    net = exported.module
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    for a, b in zip(convs, convs[1:]):
        assert b.in_channels == a.out_channels
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_features in {c.out_channels for c in convs}


def test_unstructured_ticket_exports_exactly_and_keeps_live_channels():
    model = _model("conv4")
    mask = _random_mask(model, "conv4", 0.3)
    masking.attach_hard_mask(model, mask)
    exported = export_model(model, mask, "dense")
    x = torch.randn(3, *SHAPE)
    _close(_masked_outputs(model, x), exported.module(x))
    # no row is empty at 30% density and biases are non-zero: nothing can be removed exactly
    assert all(v["out"] == v["out_original"] for v in exported.description["layers"].values())


def test_a_channel_with_zero_weights_but_a_live_batchnorm_is_kept():
    model = _model("vgg11")
    mask = Mask.ones(model, ["features.0.weight"])
    m = mask["features.0.weight"].clone()
    m[:3] = False  # rows 0-2 are empty, but BN still adds beta - gamma * mean / std to them
    masking.attach_hard_mask(model, Mask({"features.0.weight": m}))
    exported = export_model(model, Mask({"features.0.weight": m}), "dense")
    assert exported.description["layers"]["features.0"]["out"] == 64
    x = torch.randn(2, *SHAPE)
    _close(_masked_outputs(model, x), exported.module(x))


def test_residual_network_exports_correctly_with_stages_shrinking_together():
    model = _model("resnet20")
    groups = coupled_layers(model)
    assert sorted(groups[0]) == sorted(["conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight",
                                        "layer1.2.conv2.weight"])
    assert "layer2.0.shortcut.0.weight" in groups[1]
    full = _channel_ticket(model, _random_mask(model, "resnet20", 0.4, seed=2))
    exported = export_model(model, full, "dense")
    x = torch.randn(4, *SHAPE)
    _close(_masked_outputs(model, x), exported.module(x))
    layers = exported.description["layers"]
    for group in groups:  # every tensor added in a stage has the same (smaller) channels
        outs = {layers[n.removesuffix(".weight")]["out"] for n in group}
        kept = {tuple(layers[n.removesuffix(".weight")]["kept_out"]) for n in group}
        assert len(outs) == 1 and len(kept) == 1
        assert outs.pop() < full[group[0]].shape[0]
    assert layers["layer1.0.conv1"]["out"] < 16, "inner convs shrink on their own"
    assert layers["fc"]["in"] == layers["layer3.0.conv2"]["out"]


def test_residual_network_with_uncoupled_channels_still_exports_exactly():
    """Refilled without coupling, the stage keeps the union of its layers' live channels: still exact."""
    model = _model("resnet20", seed=1)
    mask = _random_mask(model, "resnet20", 0.4, seed=3)
    refilled = refill(mask, dict(model.named_parameters()))  # no groups
    full = Mask({**dict(refilled.items()), **dict(dead_channel_params(model, refilled).items())})
    masking.attach_hard_mask(model, full)
    exported = export_model(model, full, "dense")
    x = torch.randn(3, *SHAPE)
    _close(_masked_outputs(model, x), exported.module(x))
    layers = exported.description["layers"]
    union = set()
    for n in ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"):
        union |= set(full[f"{n}.weight"].reshape(16, -1).all(1).nonzero().flatten().tolist())
    assert layers["conv1"]["kept_out"] == sorted(union)


def _fake_partition(matrices, ks):
    return [np.arange(m.shape[0]) % k for m, k in zip(matrices, ks)]


@pytest.mark.parametrize("name", ["conv4", "resnet20"])
@pytest.mark.parametrize("columns", ["element", "channel"])
def test_group_export_runs_each_dense_block_as_one_product(name, columns):
    model = _model(name)
    mask = _random_mask(model, name, 0.2)
    hp = StructuredHparams(method="regroup", min_rows=4, max_rows=8, columns=columns)
    grouped = regroup(mask, None, hp, partition=_fake_partition)
    masking.attach_hard_mask(model, grouped)
    exported = export_model(model, grouped, "blocks")
    x = torch.randn(3, *SHAPE)
    _close(_masked_outputs(model, x), exported.module(x))
    block_layers = [m for m in exported.module.modules() if isinstance(m, (BlockConv2d, BlockLinear))]
    assert block_layers
    masked_layers = {n.removesuffix(".weight") for n, m in grouped.items() if not m.all()}
    assert {op["name"] for op in _all_ops(exported.description["ops"]) if op["op"].endswith("_blocks")} == masked_layers
    for m in block_layers:
        if isinstance(m, BlockConv2d) and m.unit == "channel":  # r x c x kh x kw convs over input channels
            assert all(w.dim() == 4 for w in m.weights)
        else:
            assert all(w.dim() == 2 for w in m.weights)
    if columns == "channel":  # whole input channels: every 3x3 conv runs its blocks as small convs
        assert all(m.unit == "channel" for m in block_layers if isinstance(m, BlockConv2d))


def _all_ops(ops):
    for op in ops:
        yield op
        if op["op"] == "residual":
            yield from _all_ops(op["body"])
            yield from _all_ops(op["shortcut"])


def test_block_conv_matches_conv2d_with_stride_padding_and_uncovered_rows():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    m = torch.zeros(6, 27, dtype=torch.bool)
    m[0:2, 0:10] = True
    m[3:6, 5:27] = True  # row 2 belongs to no block
    wm = (w.reshape(6, -1) * m).reshape_as(w)
    blocks = blocks_from_mask(m)
    assert [r for r, _ in blocks] == [[0, 1], [3, 4, 5]]
    layer = BlockConv2d(3, 6, 3, 2, 1, 1, [[len(r), len(c)] for r, c in blocks], bias=True)
    with torch.no_grad():
        for i, (r, c) in enumerate(blocks):
            layer.weights[i].copy_(w.reshape(6, -1)[r][:, c])
            getattr(layer, f"rows_{i}").copy_(torch.tensor(r))
            getattr(layer, f"cols_{i}").copy_(torch.tensor(c))
        layer.bias.copy_(torch.arange(6.0))
    x = torch.randn(2, 3, 9, 9)
    _close(torch.nn.functional.conv2d(x, wm, torch.arange(6.0), stride=2, padding=1), layer(x))


def test_csr_export_of_an_unstructured_ticket():
    model = _model("lenet_300_100")
    mask = _random_mask(model, "lenet_300_100", 0.1)
    masking.attach_hard_mask(model, mask)
    exported = export_model(model, mask, "csr")
    csr = [m for m in exported.module.modules() if isinstance(m, CSRLinear)]
    assert len(csr) == 2  # the masked hidden layers; the dense output layer stays nn.Linear
    assert sum(int(c.values.numel()) for c in csr) == mask.num_kept()
    x = torch.randn(4, *SHAPE)
    _close(_masked_outputs(model, x), exported.module(x))


@pytest.mark.parametrize("kind", ["dense", "blocks", "csr"])
def test_save_and_load_without_pickle(tmp_path, kind):
    model = _model("conv2")
    full = _channel_ticket(model, _random_mask(model, "conv2", 0.25))
    exported = export_model(model, full, kind)
    folder = save_export(tmp_path / kind, exported, extra={"source": {"run_dir": "somewhere"}})
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
    desc = json.loads((folder / "model.json").read_text())
    assert desc["format"] == "lottery.export" and desc["kind"] == kind and desc["check"]["ok"]
    assert desc["layers"]["features.0"]["out"] < desc["layers"]["features.0"]["out_original"]
    loaded = load_export(folder)
    x = torch.randn(2, *SHAPE)
    assert torch.equal(exported.module(x), loaded.module(x))


def test_unsupported_models_are_refused():
    with pytest.raises(ExportError, match="supported families"):
        describe(nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize("kind", ["csr", "blocks-element", "blocks-channel", "dense"])
def test_export_costs_what_its_masked_network_counts(kind):
    """lottery.cost on an export (its real, smaller layers) against the masked network it came from: equal
    for CSR and block exports (they store exactly the kept weights); a channel export can only be cheaper
    (it also drops the next layer's weights that read a removed channel)."""
    from lottery.cost import network_cost

    name = "lenet_300_100" if kind == "csr" else "conv4"
    model = _model(name)
    mask = _random_mask(model, name, 0.2)
    if kind.startswith("blocks"):
        hp = StructuredHparams(method="regroup", min_rows=4, max_rows=8, columns=kind.split("-")[1])
        mask = regroup(mask, None, hp, partition=_fake_partition)
    elif kind == "dense":
        mask = _channel_ticket(model, mask)
    masking.attach_hard_mask(model, mask)
    exported = export_model(model, mask, kind.split("-")[0]).module
    masked_cost = network_cost(model, mask, SHAPE)
    export_cost = network_cost(exported, None, SHAPE)
    assert export_cost["flops_dense"] == export_cost["flops_sparse"]  # no mask left: what it stores it computes
    if kind == "dense":
        assert 0 < export_cost["flops_sparse"] <= masked_cost["flops_sparse"]
    else:
        assert export_cost["flops_sparse"] == masked_cost["flops_sparse"]


def test_model_json_records_the_exports_flops():
    from lottery.cost import network_cost

    model = _model("conv4")
    full = _channel_ticket(model, _random_mask(model, "conv4", 0.3))
    exported = export_model(model, full, "dense")
    flops = exported.description["flops"]
    assert flops["export"] == network_cost(exported.module, None, SHAPE)["flops_sparse"]
    assert flops["dense"] == network_cost(_model("conv4"), None, SHAPE)["flops_dense"]
    assert flops["theoretical_speedup"] == pytest.approx(flops["dense"] / flops["export"]) and flops["theoretical_speedup"] > 1
