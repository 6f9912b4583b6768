"""IMP's pruning strategies and controls: exact counts, masks that only shrink, deterministic ties and seeds."""

from fractions import Fraction
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from lottery import masking
from lottery.errors import ConfigError
from lottery.masks import Mask
from lottery.methods.imp import (
    FinetuneHparams, IMPHparams, LRRHparams, OneShotHparams, RandomPruneHparams, magnitude_prune,
    one_shot_magnitude, prune_count, random_prune, random_reinit,
)

# Layer sizes where the ceiling matters (0.2 * 7 = 1.4 removes 2) and where it does not (0.2 * 15 = 3).
SHAPES = {"a.weight": (3, 5), "b.weight": (7,), "c.weight": (2, 3, 2)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to OpenMP spinning when other processes
    share the cores (2 threads on a busy 2-core machine made these tests 15x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _weights(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def _exact_ceil(rate, n):
    return math.ceil(Fraction(str(rate)) * n)


def _is_subset(new: Mask, old: Mask) -> bool:
    return all(not bool((new[n] & ~old[n]).any()) for n in old)


def test_prune_count_is_exact_where_floats_are_not():
    assert math.ceil(0.07 * 100) == 8  # the floating-point trap this guards against
    assert prune_count(0.07, 100) == 7
    assert prune_count(0.55, 100) == 55
    assert prune_count(0.2, 15) == 3
    assert prune_count(0.2, 16) == 4  # ceil(3.2)
    assert prune_count(0.2, 1) == 1
    assert prune_count(0.2, 0) == 0


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_counts_per_level_and_masks_only_shrink(scope):
    weights = _weights()
    mask = Mask.ones(weights)
    kept_global = mask.num_kept()
    kept_layers = {n: int(m.sum()) for n, m in mask.items()}
    for level in range(8):
        # later levels prune from other weights: the ranking must still never resurrect a weight
        weights = _weights(seed=level + 1)
        new = magnitude_prune(weights, mask, rate=0.2, scope=scope)
        assert list(new) == list(mask)
        assert _is_subset(new, mask)
        if scope == "global":
            kept_global -= _exact_ceil(0.2, kept_global)
            assert new.num_kept() == kept_global
        else:
            for n in mask:
                kept_layers[n] -= _exact_ceil(0.2, kept_layers[n])
                assert int(new[n].sum()) == kept_layers[n], (level, n)
        mask = new


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_removes_the_smallest_magnitudes_among_the_kept(scope):
    weights = _weights(3)
    current = Mask.ones(weights)
    current = magnitude_prune(weights, current, 0.3, scope)
    # pruned weights get huge magnitudes: they must not come back, and not be counted as candidates
    for n, m in current.items():
        weights[n] = torch.where(m, weights[n], torch.full_like(weights[n], 1e6))
    new = magnitude_prune(weights, current, 0.3, scope)
    groups = [list(current)] if scope == "global" else [[n] for n in current]
    for names in groups:
        removed = torch.cat([weights[n][current[n] & ~new[n]].abs() for n in names])
        kept = torch.cat([weights[n][new[n]].abs() for n in names])
        assert removed.numel() > 0
        assert removed.max() <= kept.min()


def test_ties_are_broken_deterministically_in_layer_then_index_order():
    weights = {n: torch.ones(s) for n, s in SHAPES.items()}
    mask = magnitude_prune(weights, Mask.ones(weights), 0.2, "global")
    assert mask == magnitude_prune(weights, Mask.ones(weights), 0.2, "global")
    # 34 weights, ceil(6.8) = 7 removed: all equal, so the first 7 in layer order (all in a.weight)
    flat = torch.cat([mask[n].reshape(-1) for n in SHAPES])
    assert flat[:7].sum() == 0 and flat[7:].all()
    # signs do not matter, only magnitudes
    weights["a.weight"][0, 0] = -0.5
    mask2 = magnitude_prune(weights, Mask.ones(weights), 0.2, "global")
    assert not mask2["a.weight"][0, 0]


def test_only_the_masks_names_are_pruned_and_other_weights_are_ignored():
    weights = _weights()
    weights["fc.weight"] = torch.zeros(4, 4)  # smallest of all, but not in the mask (an ignored layer)
    current = Mask.ones({n: weights[n] for n in SHAPES})
    new = magnitude_prune(weights, current, 0.2)
    assert "fc.weight" not in new
    assert new.num_total() == sum(math.prod(s) for s in SHAPES.values())


def test_bad_arguments_are_config_errors():
    weights = _weights()
    with pytest.raises(ConfigError):
        magnitude_prune(weights, Mask.ones(weights), rate=1.0)
    with pytest.raises(ConfigError):
        magnitude_prune(weights, Mask.ones(weights), scope="channel")
    with pytest.raises(ConfigError):
        magnitude_prune({"a.weight": weights["a.weight"]}, Mask.ones(weights))
    for bad in (dict(rate=0.0), dict(scope="x"), dict(rewind="5 epochs"), dict(variant="lrr"), dict(levels=-1)):
        with pytest.raises(ConfigError):
            IMPHparams(**bad)
    with pytest.raises(ConfigError):
        LRRHparams(rate=1.5)
    with pytest.raises(ConfigError):
        FinetuneHparams(finetune_steps="0ep")
    with pytest.raises(ConfigError):
        OneShotHparams(density=0.0)
    with pytest.raises(ConfigError):
        RandomPruneHparams(scope="nope")


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 1.0])
def test_one_shot_keeps_floor_density_times_count(scope, density):
    weights = _weights(1)
    mask = one_shot_magnitude(weights, density, scope)
    if scope == "global":
        assert mask.num_kept() == math.floor(Fraction(str(density)) * 34)
        kept = torch.cat([weights[n][mask[n]].abs() for n in SHAPES])
        removed = torch.cat([weights[n][~mask[n]].abs() for n in SHAPES])
        if removed.numel() and kept.numel():
            assert removed.max() <= kept.min()
    else:
        for n, s in SHAPES.items():
            assert int(mask[n].sum()) == math.floor(Fraction(str(density)) * math.prod(s))


def test_one_shot_from_a_mask_keeps_pruned_weights_pruned():
    weights = _weights(2)
    current = magnitude_prune(weights, Mask.ones(weights), 0.5)
    for n, m in current.items():
        weights[n] = torch.where(m, weights[n], torch.full_like(weights[n], 99.0))
    mask = one_shot_magnitude(weights, 0.25, current=current)
    assert mask.num_kept() == 8 and _is_subset(mask, current)  # floor(0.25 * 34)


def _reference_mask():
    return magnitude_prune(_weights(5), Mask.ones(_weights(5)), 0.5, "layerwise")


def test_random_prune_layerwise_keeps_each_layers_count_and_is_seeded():
    ref = magnitude_prune(_weights(5), Mask.ones(_weights(5)), 0.6, "global")  # uneven per-layer densities
    a = random_prune(ref, seed=1)
    assert a == random_prune(ref, like=ref, scope="layerwise", seed=1)
    assert a != random_prune(ref, seed=2)
    for n in ref:
        assert int(a[n].sum()) == int(ref[n].sum())
    assert a != ref


def test_random_prune_global_keeps_the_total_only():
    ref = _reference_mask()
    masks = [random_prune(ref, scope="global", seed=s) for s in range(20)]
    assert all(m.num_kept() == ref.num_kept() for m in masks)
    assert masks[0] == random_prune(ref, scope="global", seed=0)
    # spread over all layers: per-layer counts vary between seeds
    assert len({tuple(int(m[n].sum()) for n in ref) for m in masks}) > 1


def test_random_prune_from_shapes_and_density():
    m = random_prune(SHAPES, 0.5, scope="layerwise", seed=0)
    for n, s in SHAPES.items():
        assert tuple(m[n].shape) == s
        assert int(m[n].sum()) == math.prod(s) // 2
    assert random_prune(SHAPES, 0.25, scope="global", seed=0).num_kept() == 8  # floor(8.5)
    with pytest.raises(ConfigError):
        random_prune(SHAPES)  # neither a density nor a reference mask


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_random_reinit_keeps_the_mask_and_draws_new_weights():
    torch.manual_seed(0)
    net = BNNet()
    net(torch.randn(8, 1, 4, 4))  # move the BN statistics away from their reset values
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weights = {"conv.weight": net.conv.weight.detach(), "fc.weight": net.fc.weight.detach()}
    mask = magnitude_prune(weights, Mask.ones(weights), 0.5)
    rng_before = torch.get_rng_state()
    random_reinit(net, mask, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert masking.current_mask(net) == mask
    after = masking.to_plain_state_dict(net.state_dict())
    for n, m in mask.items():
        assert (after[n][~m] == 0).all()
        assert not torch.equal(after[n][m], before[n][m])
    assert torch.equal(after["bn.running_mean"], torch.zeros(4))  # statistics reset with the new draw
    # seeded: the same seed gives the same network, another seed another one
    again = random_reinit(BNNet(), mask, seed=3)
    other = random_reinit(BNNet(), mask, seed=4)
    assert torch.equal(again.conv.weight, net.conv.weight)
    assert not torch.equal(other.conv.weight, net.conv.weight)
    # the draw is not the model's own initialisation for the same seed
    torch.manual_seed(3)
    assert not torch.equal(BNNet().fc.weight * mask["fc.weight"], net.fc.weight)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    rate=st.sampled_from([0.1, 0.2, 0.25, 0.5, 0.9]),
    scope=st.sampled_from(["global", "layerwise"]),
    seed=st.integers(0, 1000),
    levels=st.integers(1, 4),
)
def test_property_exact_counts_and_shrinking(sizes, rate, scope, seed, levels):
    shapes = {f"l{i}.weight": (s,) for i, s in enumerate(sizes)}
    g = torch.Generator().manual_seed(seed)
    # few distinct values: many ties
    weights = {n: torch.randint(-3, 4, s, generator=g).float() for n, s in shapes.items()}
    mask = Mask.ones(weights)
    for _ in range(levels):
        new = magnitude_prune(weights, mask, rate, scope)
        assert _is_subset(new, mask)
        if scope == "global":
            assert new.num_kept() == mask.num_kept() - _exact_ceil(rate, mask.num_kept())
        else:
            for n in mask:
                k = int(mask[n].sum())
                assert int(new[n].sum()) == k - _exact_ceil(rate, k)
        assert new == magnitude_prune(weights, mask, rate, scope)
        mask = new


def test_one_shot_count_is_exact_where_floats_are_not():
    assert math.floor(0.35 * 180) == 62  # floating point loses one weight here
    weights = {"w": torch.randn(180, generator=torch.Generator().manual_seed(0))}
    assert one_shot_magnitude(weights, 0.35).num_kept() == 63
    assert random_prune({"w": (180,)}, 0.35, seed=0).num_kept() == 63
