"""Export: channel surgery (residual networks included), dense blocks and CSR layers compute what the
masked network computes; files are safetensors + JSON and load back without unpickling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lottery import masking
from lottery.export import (
    BlockConv2d, BlockLinear, CSRLinear, ExportError, blocks_from_mask, coupled_layers, dead_channel_params,
    describe, export_model, load_export, save_export,
)
from lottery.errors import ConfigError
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


# ============================================================================ any traced network


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.b(F.relu(self.bn_a(self.a(x))))  # a residual addition without a ReLU after it


class _UserNet(nn.Module):
    """A user's own network: not registered, functional ReLUs and pooling, torch.flatten, a lone BatchNorm."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = _Block(8)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.post_bn = nn.BatchNorm2d(12)
        self.drop = nn.Dropout(0.5)
        self.hidden = nn.Linear(12 * 4 * 4, 20)
        self.out = nn.Linear(20, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.max_pool2d(self.block(x), 2)
        x = self.post_bn(torch.relu(self.conv(x)))  # after the ReLU: its channels are kept whole
        x = F.avg_pool2d(x, 2)
        x = torch.flatten(x, 1)
        return self.out(self.drop(F.relu(self.hidden(x))))


def _user_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _UserNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def _user_mask(model: nn.Module, density: float, seed: int = 0) -> Mask:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    names = masking.prunable_weights(model, ignore=("out.weight",))
    return Mask({n: torch.rand(params[n].shape, generator=g) < density for n in names})


def test_a_user_defined_network_exports_and_equals_the_masked_network():
    model = _user_net()
    assert not hasattr(model, "input_shape")
    groups = coupled_layers(model, SHAPE)
    assert [sorted(g) for g in groups] == [["block.b.weight", "stem.weight"]]  # added by the residual
    refilled = refill(_user_mask(model, 0.4), dict(model.named_parameters()), groups=groups)
    full = Mask({**dict(refilled.items()), **dict(dead_channel_params(model, refilled, SHAPE).items())})
    masking.attach_hard_mask(model, full)
    exported = export_model(model, full, "dense", input_shape=SHAPE)
    x = torch.randn(6, *SHAPE)
    _close(_masked_outputs(model, x), exported.module(x))
    layers = exported.description["layers"]
    assert layers["stem"]["out"] == layers["block.b"]["out"] < 8
    assert layers["block.a"]["out"] < 8 and layers["hidden"]["out"] < 20
    assert layers["conv"]["out"] == 12, "a BatchNorm after the ReLU keeps its channels"
    assert layers["hidden"]["in"] == 12 * 16
    assert exported.description["size"]["parameters"] < exported.description["size"]["original_parameters"]


@pytest.mark.parametrize("kind", ["blocks", "csr"])
def test_a_user_defined_network_exports_as_blocks_and_csr(kind):
    model = _user_net(seed=1)
    mask = _user_mask(model, 0.3, seed=1)
    masking.attach_hard_mask(model, mask)
    exported = export_model(model, mask, kind, input_shape=SHAPE)
    x = torch.randn(3, *SHAPE)
    _close(_masked_outputs(model, x), exported.module(x))


class _Flat(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = self.conv(x)
        if self.how == "view":
            x = x.view(x.size(0), -1)
        elif self.how == "reshape":
            x = x.reshape(x.shape[0], -1)
        elif self.how == "method":
            x = x.flatten(1)
        else:
            x = torch.flatten(x, start_dim=1)
        return self.fc(x)


@pytest.mark.parametrize("how", ["view", "reshape", "method", "function"])
def test_every_spelling_of_flatten_is_read_as_one(how):
    assert [op["op"] for op in describe(_Flat(how), SHAPE)] == ["conv", "flatten", "linear"]


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(1, 4, 3)
        self.right = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(8 * 14 * 14, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.cat([self.left(x), self.right(x)], 1), 1))


def test_an_unsupported_operation_is_refused_in_one_line_naming_it():
    with pytest.raises(ExportError) as err:
        export_model(_Concat(), to="dense", input_shape=SHAPE)
    text = str(err.value)
    assert "\n" not in text
    assert "torch.cat at node 'cat'" in text and "Conv2d" in text  # what it is, and what is supported
    with pytest.raises(ExportError, match=r"nn.Sigmoid at node 'features_1' \(in features.1\)") as err:
        describe(_Sigmoid(), SHAPE)
    assert "\n" not in str(err.value)
    with pytest.raises(ExportError, match="input shape is unknown"):
        describe(nn.Sequential(nn.Linear(3, 3)))
    assert describe(nn.Sequential(nn.Linear(3, 3)), (3,)) == [
        {"op": "linear", "name": "0", "in": 3, "out": 3, "bias": True}]


class _Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid())

    def forward(self, x):
        return self.features(x)


# ============================================================================ preprocessing, portable files

MEAN, STD = [0.3], [0.2]


def _normalised(raw: torch.Tensor) -> torch.Tensor:
    return (raw - MEAN[0]) / STD[0]


def test_load_export_takes_raw_pixels_and_normalises_them(tmp_path):
    from lottery.data import dataset_info

    model = _model("conv2")
    full = _channel_ticket(model, _random_mask(model, "conv2", 0.3))
    exported = export_model(model, full, "dense", preprocessing={"mean": MEAN, "std": STD})
    folder = save_export(tmp_path / "e", exported)
    desc = json.loads((folder / "model.json").read_text())
    assert desc["preprocessing"]["mean"] == MEAN and desc["preprocessing"]["std"] == STD
    assert desc["preprocessing"]["input_shape"] == list(SHAPE) and "[0, 1]" in desc["preprocessing"]["input"]
    loaded = load_export(folder)
    raw = torch.rand(5, *SHAPE)
    _close(_masked_outputs(model, _normalised(raw)), loaded.module(raw))
    _close(_masked_outputs(model, _normalised(raw)), exported.module(raw))
    # a data set's spec does as well; no preprocessing leaves the inputs as they are
    mnist = dataset_info("mnist")
    spec = export_model(model, full, "dense", preprocessing=mnist).description["preprocessing"]
    assert spec["mean"] == pytest.approx(list(mnist.mean)) and spec["std"] == pytest.approx(list(mnist.std))
    assert export_model(model, full, "dense").description["preprocessing"] is None
    with pytest.raises(ConfigError, match="1 means"):
        export_model(model, full, "dense", preprocessing={"mean": [0.1, 0.2], "std": [1, 1]})


_RUN_WITHOUT_LOTTERY = """
import sys
sys.modules["lottery"] = None  # importing lottery would fail here
import numpy as np, torch
net = torch.jit.load(sys.argv[1])
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], net(x).numpy())
assert not [m for m, v in sys.modules.items() if m.startswith("lottery") and v is not None]
"""


@pytest.mark.parametrize("name,kind", [("resnet20", "dense"), ("lenet_300_100", "csr")])
def test_torchscript_file_runs_without_lottery_on_raw_pixels(tmp_path, name, kind):
    model = _model(name)
    if kind == "dense":
        mask = _channel_ticket(model, _random_mask(model, name, 0.4))
    else:
        mask = _random_mask(model, name, 0.2)
        masking.attach_hard_mask(model, mask)
    exported = export_model(model, mask, kind, preprocessing={"mean": MEAN, "std": STD})
    folder = save_export(tmp_path / "e", exported, portable=("torchscript",))
    desc = json.loads((folder / "model.json").read_text())
    assert desc["portable"]["torchscript"]["file"] == "model.pt" and desc["portable"]["torchscript"]["check"]["ok"]
    raw = torch.rand(7, *SHAPE)
    np.save(tmp_path / "x.npy", raw.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _RUN_WITHOUT_LOTTERY, str(folder / "model.pt"), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], cwd=tmp_path, env=env, check=True, timeout=300)
    _close(_masked_outputs(model, _normalised(raw)), torch.from_numpy(np.load(tmp_path / "y.npy")))


def test_a_portable_file_that_differs_from_the_masked_network_is_not_written(tmp_path):
    model = _model("conv2")
    full = _channel_ticket(model, _random_mask(model, "conv2", 0.3))
    exported = export_model(model, full, "dense", preprocessing={"mean": MEAN, "std": STD})
    inputs, reference = exported.sample
    exported.sample = (inputs, reference + 1.0)
    with pytest.raises(ExportError, match="was not written"):
        save_export(tmp_path / "e", exported, portable=("torchscript",))
    assert not (tmp_path / "e" / "model.pt").exists() and not list((tmp_path / "e").glob(".model.pt*"))


@pytest.mark.parametrize("name,kind", [("resnet20", "dense"), ("conv2", "blocks")])
def test_onnx_file_runs_in_onnxruntime_on_raw_pixels(tmp_path, name, kind):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = _model(name)
    if kind == "dense":
        mask = _channel_ticket(model, _random_mask(model, name, 0.4))
    else:
        mask = regroup(_random_mask(model, name, 0.2), None, StructuredHparams(method="regroup", min_rows=4, max_rows=8),
                       partition=_fake_partition)
        masking.attach_hard_mask(model, mask)
    exported = export_model(model, mask, kind, preprocessing={"mean": MEAN, "std": STD})
    folder = save_export(tmp_path / "e", exported, portable=("onnx",))
    assert json.loads((folder / "model.json").read_text())["portable"]["onnx"]["check"]["ok"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    raw = torch.rand(5, *SHAPE)
    got = session.run(None, {"pixels": raw.numpy()})[0]
    _close(_masked_outputs(model, _normalised(raw)), torch.from_numpy(got))


def test_onnx_refuses_csr_layers(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _model("lenet_300_100")
    mask = _random_mask(model, "lenet_300_100", 0.2)
    masking.attach_hard_mask(model, mask)
    with pytest.raises(ExportError, match="ONNX has no sparse CSR"):
        save_export(tmp_path / "e", export_model(model, mask, "csr"), portable=("onnx",))


def test_a_version_1_export_still_loads(tmp_path):
    """Version 1 descriptions had no residual 'relu' flag: every residual addition was followed by a ReLU."""
    model = _model("resnet20")
    full = _channel_ticket(model, _random_mask(model, "resnet20", 0.4))
    folder = save_export(tmp_path / "e", export_model(model, full, "dense"))
    desc = json.loads((folder / "model.json").read_text())

    def strip(ops):
        for op in ops:
            if op["op"] == "residual":
                assert op.pop("relu") is True
                strip(op["body"])
                strip(op["shortcut"])

    strip(desc["ops"])
    desc["version"] = 1
    desc.pop("preprocessing")
    (folder / "model.json").write_text(json.dumps(desc))
    x = torch.randn(2, *SHAPE)
    _close(_masked_outputs(model, x), load_export(folder).module(x))


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


# ============================================================================ packed block layers (issue 22)


def _blocky(out: int, cols: int, unit: int, seed: int) -> torch.Tensor:
    """A mask whose rows come in groups of identical kept columns of different widths (several buckets),
    with one row of no block; columns in units of ``unit`` (a conv's kh*kw for channel blocks)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(out, cols, dtype=torch.bool)
    units = cols // unit
    for r0, width in zip(range(0, out - 1, 3), (1, units, max(1, units // 3), max(1, units // 2), 2, units - 1)):
        keep = torch.randperm(units, generator=g)[:width]
        m[r0:min(r0 + 3, out - 1), (keep.unsqueeze(1) * unit + torch.arange(unit)).reshape(-1)] = True
    return m


def _block_layer(layer, w2: torch.Tensor, m: torch.Tensor, kernel_shape=None):
    blocks = blocks_from_mask(m)
    with torch.no_grad():
        for i, (r, c) in enumerate(blocks):
            wb = w2[r][:, c]
            if kernel_shape is not None:  # channel blocks: r x channels x kh x kw
                k = kernel_shape[0] * kernel_shape[1]
                wb = w2.view(w2.shape[0], -1, *kernel_shape)[r][:, torch.tensor(c[::k]) // k]
                c = [x // k for x in c[::k]]
            layer.weights[i].copy_(wb)
            getattr(layer, f"rows_{i}").copy_(torch.tensor(r))
            getattr(layer, f"cols_{i}").copy_(torch.tensor(c))
        if layer.bias is not None:
            layer.bias.copy_(torch.linspace(-1, 1, layer.out_features))
    return blocks


@pytest.mark.parametrize("path", ["packed", "loop", "auto"])
@pytest.mark.parametrize("kind", ["linear", "conv-element", "conv-channel"])
def test_packed_block_layers_equal_the_masked_layer(kind, path):
    torch.manual_seed(0)
    if kind == "linear":
        w, unit = torch.randn(17, 30), 1
    else:
        w, unit = torch.randn(17, 5, 3, 3), (9 if kind == "conv-channel" else 1)
    m = _blocky(17, w[0].numel(), unit, seed=1)
    wm = (w.reshape(17, -1) * m).reshape_as(w)
    sizes = [[len(r), len(c) // unit] for r, c in blocks_from_mask(m)]
    if kind == "linear":
        layer = BlockLinear(30, 17, sizes)
        x = torch.randn(4, 30)
        want = F.linear(x, wm, torch.linspace(-1, 1, 17))
    else:
        layer = BlockConv2d(5, 17, 3, 2, 1, 1, sizes, unit="channel" if unit > 1 else "element")
        x = torch.randn(4, 5, 9, 9)
        want = F.conv2d(x, wm, torch.linspace(-1, 1, 17), stride=2, padding=1)
    _block_layer(layer, w.reshape(17, -1), m, (3, 3) if unit > 1 else None)
    layer.path = path
    assert len(layer._buckets if layer._packed else (layer.pack() or layer._buckets)) >= 2  # several widths
    assert layer._zero_row  # row 16 is in no block
    assert layer.padded_weights_per_position() >= layer.weights_per_position()
    with torch.no_grad():
        _close(want, layer(x))
        _close(want[:1], layer(x[:1]))  # another shape: 'auto' times both paths again
    if path == "auto":
        assert len(layer._choice) == 2


def test_packed_blocks_follow_changed_and_loaded_tensors():
    torch.manual_seed(0)
    w = torch.randn(8, 12)
    m = _blocky(8, 12, 1, seed=2)
    layer = BlockLinear(12, 8, [[len(r), len(c)] for r, c in blocks_from_mask(m)])
    _block_layer(layer, w, m)
    layer.path = "packed"
    x = torch.randn(3, 12)
    with torch.no_grad():
        first = layer(x)
        layer.weights[0].mul_(2)
        assert torch.equal(layer(x), first)  # the packed copy is stale until pack() ...
        layer.pack()
        assert not torch.equal(layer(x), first)  # ... which rebuilds it
        other = BlockLinear(12, 8, [[len(r), len(c)] for r, c in blocks_from_mask(m)])
        other.path = "packed"
        other.load_state_dict(layer.state_dict())  # load_state_dict repacks
        assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("path", ["packed", "loop"])
def test_block_export_of_a_residual_network_on_either_path(path):
    model = _user_net(seed=2)
    mask = _user_mask(model, 0.35, seed=2)
    masking.attach_hard_mask(model, mask)
    exported = export_model(model, mask, "blocks", input_shape=SHAPE)
    blocks = [m for m in exported.module.modules() if isinstance(m, (BlockConv2d, BlockLinear))]
    assert blocks and any(isinstance(m, BlockConv2d) for m in blocks)
    for m in blocks:
        m.path = path
    x = torch.randn(5, *SHAPE)
    _close(_masked_outputs(model, x), exported.module(x))


def test_a_killed_exports_temporary_file_is_removed_by_the_next_export(tmp_path):
    model = _model("conv2")
    mask = _channel_ticket(model, _random_mask(model, "conv2", 0.3))
    exported = export_model(model, mask, "dense", preprocessing={"mean": MEAN, "std": STD})
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / ".model.pt.tmp-99999").write_bytes(b"half a file")  # an export killed mid-write
    folder = save_export(tmp_path / "e", exported, portable=("torchscript",))
    assert (folder / "model.pt").is_file() and not list(folder.glob(".model.pt.tmp-*"))


def _linked_chain(seed: int, second: str = "channel"):
    """A network of block layers linked by link_blocks (conv -> conv through ReLU and max-pool, conv ->
    flatten -> Linear, Linear -> Linear) whose masks have blocks of several widths (padding rows in the
    packed output), rows of no block (with a bias: constant channels) and a row in no block of the last
    layer; and the same network as plain masked layers. ``second``: the unit of the second conv's blocks
    (``element``: it reads the first conv's packed output through im2col columns, and is not linked to
    the Linear after it)."""
    from lottery.export.layers import _ConvBN

    torch.manual_seed(seed)
    specs = [("conv", 3, 8), ("conv", 8, 8), ("linear", 8 * 2 * 2, 10), ("linear", 10, 6)]
    blocks, plain = [], []
    for i, (kind, cin, cout) in enumerate(specs):
        w = torch.randn(cout, cin, 3, 3) if kind == "conv" else torch.randn(cout, cin)
        m = _blocky(cout, w[0].numel(), 9 if kind == "conv" else 1, seed=seed + i)
        if i == 0:  # rows 0-2 read input channel 0, rows 3-5 all three, row 6 channel 1 (padded to 3 rows), row 7 none
            m = torch.zeros(8, 3, 9, dtype=torch.bool)
            m[0:3, 0], m[3:6], m[6, 1] = True, True, True
            m = m.reshape(8, 27)
        wm = (w.reshape(cout, -1) * m).reshape_as(w)
        unit = 9 if kind == "conv" and not (i == 1 and second == "element") else 1
        sizes = [[len(r), len(c) // unit] for r, c in blocks_from_mask(m)]
        layer = (BlockConv2d(cin, cout, 3, 1, 1, 1, sizes, unit="channel" if unit == 9 else "element") if kind == "conv"
                 else BlockLinear(cin, cout, sizes))
        _block_layer(layer, w.reshape(cout, -1), m, (3, 3) if unit == 9 else None)
        ref = nn.Conv2d(cin, cout, 3, padding=1) if kind == "conv" else nn.Linear(cin, cout)
        with torch.no_grad():
            ref.weight.copy_(wm)
            ref.bias.copy_(torch.linspace(-1, 1, cout))
        blocks.append(_ConvBN(layer, None) if kind == "conv" else layer)
        plain.append(ref)
    between = [[nn.ReLU(), nn.MaxPool2d(2)], [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()], [nn.ReLU()], []]
    net = nn.Sequential(*[m for b, rest in zip(blocks, between) for m in (b, *rest)])
    ref = nn.Sequential(*[m for p, rest in zip(plain, between) for m in (p, *rest)])
    return net, ref


@pytest.mark.parametrize("paths", ["packed", "loop-in-the-middle", "auto", "packed-element-second"])
def test_linked_block_layers_skip_the_output_gather_and_equal_the_masked_network(paths):
    from lottery.export import link_blocks

    second = "element" if paths.endswith("element-second") else "channel"
    paths = paths.replace("-element-second", "")
    net, ref = _linked_chain(seed=3, second=second)
    # conv->conv, conv->flatten->linear (not from element blocks), linear->linear
    assert link_blocks(net) == ([(0, 3), (3, 7), (7, 9)] if second == "channel" else [(0, 3), (7, 9)])
    layers = [m for m in net.modules() if isinstance(m, (BlockConv2d, BlockLinear))]
    for i, layer in enumerate(layers):
        layer.path = "loop" if paths == "loop-in-the-middle" and i == 1 else paths
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        want = ref.eval()(x)
        _close(want, net.eval()(x))
        _close(want[:1], net(x[:1]))
        first = layers[0](x)
    emitting = paths == "packed"  # only when both layers of a link run the packed path
    assert layers[0]._emits_packed() is emitting and layers[1]._reads_packed() is emitting
    # a producer that emits leaves its rows in packed order: padding rows and the constant rows of no block
    assert first.shape[1] == (layers[0]._packed_rows if emitting else layers[0].out_features)
    assert layers[0]._packed_rows > layers[0].out_features and layers[0]._zero_row
    # load_state_dict repacks both ends of a link
    net2, _ = _linked_chain(seed=4, second=second)
    link_blocks(net2)
    for layer in (m for m in net2.modules() if isinstance(m, (BlockConv2d, BlockLinear))):
        layer.path = "packed"
    net2.load_state_dict(net.state_dict())
    with torch.no_grad():
        _close(want, net2.eval()(x))
