"""Tests of lottery.masks.Mask: construction, counts, validation, files, torch.nn.utils.prune interop."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from lottery.errors import CheckpointError, ConfigError
from lottery.masking import attach_hard_mask, prunable_weights
from lottery.masks import Mask


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2)
    )


def hand_mask() -> Mask:
    return Mask(
        {
            "a.weight": torch.tensor([[1, 0], [1, 1]], dtype=torch.uint8),  # 3 / 4
            "b.weight": torch.tensor([True, False, False, False, False, False]),  # 1 / 6
        }
    )


def random_mask(model: nn.Module, density: float = 0.5, seed: int = 1) -> Mask:
    g = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(p.shape, generator=g) < density for n, p in prunable_weights(model).items()})


# ------------------------------------------------------------------ construction and mapping


def test_construct_mapping_protocol_and_equality():
    m = hand_mask()
    assert list(m) == ["a.weight", "b.weight"] and list(m.keys()) == ["a.weight", "b.weight"]
    assert len(m) == 2 and "a.weight" in m and "c.weight" not in m
    assert all(t.dtype == torch.bool for t in m.values())
    assert torch.equal(m["a.weight"], torch.tensor([[True, False], [True, True]]))
    assert dict(m.items()).keys() == {"a.weight", "b.weight"}
    # equality: same keys (any order) and equal tensors
    same = Mask({"b.weight": m["b.weight"].clone(), "a.weight": m["a.weight"].float()})
    assert same == m
    other = Mask({"a.weight": m["a.weight"], "b.weight": ~m["b.weight"]})
    assert other != m
    assert Mask({"a.weight": m["a.weight"]}) != m
    # the constructor copies: changing the source does not change the mask
    src = torch.ones(3, dtype=torch.bool)
    c = Mask({"x": src})
    src[0] = False
    assert bool(c["x"].all())


def test_non_binary_values_rejected():
    with pytest.raises(ConfigError, match="a.weight"):
        Mask({"a.weight": torch.tensor([0.0, 0.5, 1.0])})
    with pytest.raises(ConfigError):
        Mask({"a.weight": torch.tensor([2, 0])})


def test_ones_from_model_and_shapes():
    net = small_net()
    m = Mask.ones(net)
    assert list(m) == ["0.weight", "3.weight", "5.weight"]
    assert m.density() == 1.0 and m.num_total() == 3 * 2 * 9 + 48 * 5 + 10
    m2 = Mask.ones(net, ["3.weight"])
    assert list(m2) == ["3.weight"] and m2["3.weight"].shape == (5, 48)
    m3 = Mask.ones({"x": (2, 3), "y": torch.zeros(4)})
    assert m3["x"].shape == (2, 3) and m3["y"].shape == (4,) and m3.num_kept() == 10
    with pytest.raises(ConfigError, match="nope"):
        Mask.ones(net, ["nope.weight"])


# ------------------------------------------------------------------ counts


def test_density_numbers_exact():
    m = hand_mask()
    assert m.num_kept() == 4 and m.num_total() == 10 and m.num_pruned() == 6
    assert m.density() == 0.4 and m.sparsity() == pytest.approx(0.6)
    assert m.layer_densities() == {"a.weight": 0.75, "b.weight": 1 / 6}
    r = m.sparsity_report()
    assert r["density"] == 0.4 and r["kept"] == 4 and r["total"] == 10
    assert r["layers"]["a.weight"] == {"kept": 3, "total": 4, "density": 0.75, "shape": [2, 2]}
    assert r["layers"]["b.weight"]["kept"] == 1 and r["layers"]["b.weight"]["total"] == 6
    assert Mask().density() == 1.0 and Mask().num_total() == 0


def test_intersection_union_invert():
    a = Mask({"w": torch.tensor([1, 1, 0, 0])})
    b = Mask({"w": torch.tensor([1, 0, 1, 0])})
    assert (a & b) == Mask({"w": torch.tensor([1, 0, 0, 0])})
    assert (a | b) == Mask({"w": torch.tensor([1, 1, 1, 0])})
    assert a.union(b) == (a | b) and a.intersection(b) == (a & b)
    assert ~a == Mask({"w": torch.tensor([0, 0, 1, 1])})
    with pytest.raises(ConfigError, match="only in the first"):
        _ = a & Mask({"v": torch.tensor([1, 1, 0, 0])})
    with pytest.raises(ConfigError, match="shapes"):
        _ = a & Mask({"w": torch.tensor([1, 1, 0])})
    assert a.to("cpu") == a and a.clone() == a


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40))
def test_counts_of_and_or_are_consistent(pairs):
    a = Mask({"w": torch.tensor([p[0] for p in pairs])})
    b = Mask({"w": torch.tensor([p[1] for p in pairs])})
    assert (a | b).num_kept() + (a & b).num_kept() == a.num_kept() + b.num_kept()
    assert (a & b).num_kept() <= min(a.num_kept(), b.num_kept())
    assert a.num_kept() + (~a).num_kept() == a.num_total()


# ------------------------------------------------------------------ validation


def test_validate_names_offending_entries():
    net = small_net()
    good = random_mask(net)
    good.validate(net)
    good.validate(net, expected_names=list(prunable_weights(net)))

    bad = Mask({"0.weight": good["0.weight"], "7.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(CheckpointError, match=r"7\.weight") as err:
        bad.validate(net)
    assert "unexpected" in str(err.value)

    wrong_shape = Mask({"3.weight": torch.ones(48, 5, dtype=torch.bool)})
    with pytest.raises(CheckpointError) as err:
        wrong_shape.validate(net)
    assert "3.weight" in str(err.value) and "expected (5, 48), got (48, 5)" in str(err.value)

    partial = Mask({"0.weight": good["0.weight"]})
    with pytest.raises(CheckpointError, match="missing") as err:
        partial.validate(net, expected_names=list(prunable_weights(net)))
    assert "3.weight" in str(err.value) and "5.weight" in str(err.value)


# ------------------------------------------------------------------ files


def test_save_load_round_trip_and_report(tmp_path):
    net = small_net()
    m = random_mask(net, density=0.3)
    path = tmp_path / "sub" / "mask.safetensors"
    report_path = m.save(path)
    assert report_path == tmp_path / "sub" / "mask.json" and report_path.is_file()
    loaded = Mask.load(path)
    assert loaded == m and list(loaded) == list(m)
    report = json.loads(report_path.read_text())
    assert report["density"] == m.density() == loaded.density()
    assert report["kept"] == m.num_kept() and report["total"] == m.num_total()
    assert report["layers"]["3.weight"]["density"] == m.layer_densities()["3.weight"]
    # the file is safetensors (a JSON header, no pickle) holding uint8 0/1
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("3.weight").dtype == torch.uint8
        assert f.metadata()["format"] == "lottery.mask"
    # no temporary files left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["mask.json", "mask.safetensors"]


def test_load_corrupt_or_missing_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Mask.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file" * 3)
    with pytest.raises(CheckpointError, match="corrupt"):
        Mask.load(garbage)
    good = tmp_path / "good.safetensors"
    hand_mask().save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="corrupt"):
        Mask.load(truncated)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        Mask.load(empty)


def test_load_keeps_module_order(tmp_path):
    names = ["layer.2.weight", "layer.10.weight", "fc.weight", "conv1.weight"]  # not sorted
    m = Mask({n: torch.ones(i + 1, dtype=torch.bool) for i, n in enumerate(names)})
    m.save(tmp_path / "m.safetensors")
    assert list(Mask.load(tmp_path / "m.safetensors")) == names


def test_load_rejects_non_binary_values(tmp_path):
    from lottery.io import save_tensors

    path = tmp_path / "bad.safetensors"
    save_tensors(path, {"w": torch.tensor([0, 1, 2], dtype=torch.uint8)})
    with pytest.raises(CheckpointError, match="other than 0 and 1"):
        Mask.load(path)


def test_save_refuses_json_path(tmp_path):
    with pytest.raises(ConfigError):
        hand_mask().save(tmp_path / "mask.json")


# ------------------------------------------------------------------ torch.nn.utils.prune interop


def test_torch_prune_round_trip_from_our_mask():
    net = small_net()
    m = random_mask(net, density=0.4)
    m.to_torch_prune(net)
    assert hasattr(net[0], "weight_orig") and hasattr(net[0], "weight_mask")
    assert Mask.from_torch_prune(net) == m
    sd = net.state_dict()
    assert "3.weight_orig" in sd and "3.weight_mask" in sd
    assert Mask.from_torch_prune(sd) == m


def test_torch_prune_round_trip_from_torch_mask_and_same_outputs():
    torch.manual_seed(3)
    pruned = small_net()
    for module in (pruned[0], pruned[3], pruned[5]):
        prune.random_unstructured(module, "weight", amount=0.6)
    prune.l1_unstructured(pruned[3], "weight", amount=0.3)  # stacked: a PruningContainer
    m = Mask.from_torch_prune(pruned)
    assert set(m) == {"0.weight", "3.weight", "5.weight"}
    for name in m:
        module = pruned.get_submodule(name.split(".")[0])
        assert torch.equal(m[name], module.weight_mask != 0)

    # the other direction: a fresh model pruned by to_torch_prune gets identical buffers
    fresh = small_net()
    m.to_torch_prune(fresh)
    for name in m:
        i = name.split(".")[0]
        assert torch.equal(fresh.get_submodule(i).weight_mask, pruned.get_submodule(i).weight_mask)

    # our hard mask on the same weights gives the same function as torch's pruning
    ours = small_net()
    with torch.no_grad():
        for name in m:
            i = name.split(".")[0]
            ours.get_submodule(i).weight.copy_(pruned.get_submodule(i).weight_orig)
    attach_hard_mask(ours, m)
    x = torch.randn(4, 2, 6, 6)
    assert torch.equal(ours(x), pruned(x))


def test_from_torch_prune_ignores_unrelated_mask_buffers():
    sd = {
        "attn_mask": torch.ones(2, 2),
        "fc.weight": torch.randn(2, 2),
        "fc.weight_mask": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
    }
    m = Mask.from_torch_prune(sd)
    assert list(m) == ["fc.weight"] and m.num_kept() == 2


def test_load_or_create_makes_once_then_loads(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return Mask({"w": torch.tensor([[True, False], [False, True]])})

    path = tmp_path / "mask.safetensors"
    first = Mask.load_or_create(path, make)
    second = Mask.load_or_create(path, make)
    assert calls == [1] and first == second and path.exists()
