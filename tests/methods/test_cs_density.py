"""lottery.methods.cs_density and the density / budget-robust parts of ContinuousSparsification."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from lottery import masking
from lottery.errors import ConfigError
from lottery.methods.cs import DENSITY_S0, ContinuousSparsification, CSHparams
from lottery.methods.cs_convergence import MAX_UNDECIDED, undecided_fractions
from lottery.methods.cs_density import (
    kept_count, project_to_density, round_target_density, scheduled_density, tie_gap,
)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), frac=st.floats(0.001, 0.999))
def test_projection_keeps_exactly_the_top_logits(seed, frac):
    model = _net()
    masking.attach_soft_mask(model, None, s0=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in masking.mask_logits(model).values():
            s.copy_(torch.randn(s.shape, generator=g) * 0.1 + 0.03)
    before = torch.cat([s.detach().reshape(-1).clone() for s in masking.mask_logits(model).values()])
    n = before.numel()
    keep = min(n - 1, max(1, round(frac * n)))
    shift = project_to_density(model, keep)
    after = torch.cat([s.detach().reshape(-1) for s in masking.mask_logits(model).values()])
    assert kept_count(model) == keep
    # one common shift: the order (what CS learned) is unchanged, the kept set is the top `keep`
    torch.testing.assert_close(before - after, torch.full_like(before, shift))
    assert set((after > 0).nonzero().flatten().tolist()) == set(torch.topk(before, keep).indices.tolist())


def test_projection_cuts_through_tied_logits_by_index():
    model = _net()
    masking.attach_soft_mask(model, None, s0=DENSITY_S0)  # all equal: no common shift separates them
    logits = list(masking.mask_logits(model).values())
    n = sum(s.numel() for s in logits)
    with torch.no_grad():
        logits[0].view(-1)[:5] = 1.0  # five above the tie
    project_to_density(model, 5 + 100)
    assert kept_count(model) == 105
    flat = torch.cat([s.detach().reshape(-1) for s in logits])
    assert bool((flat[:105] > 0).all()) and not bool((flat[105:] > 0).any())  # the tied ones by index
    project_to_density(model, n - 1)  # and back up through the (now two-valued) tie
    assert kept_count(model) == n - 1


def test_a_split_tie_is_set_apart_by_the_gap_and_stays_apart_under_identical_updates():
    model = _net()
    masking.attach_soft_mask(model, None, s0=DENSITY_S0)  # all tied
    logits = list(masking.mask_logits(model).values())
    n = sum(s.numel() for s in logits)
    gap = tie_gap(4000.0)
    assert gap * 4000.0 == pytest.approx(2 * math.log(99))
    project_to_density(model, 300, gap)
    flat = torch.cat([s.detach().reshape(-1) for s in logits])
    assert kept_count(model) == 300
    assert bool((flat[:300] == gap).all()) and bool((flat[300:] == -gap).all())
    with torch.no_grad():  # the same update for every tied entry (what dead units' logits get)
        for s in logits:
            s.add_(0.37)
    project_to_density(model, 300, gap)  # the cut falls in the middle of the gap: nothing re-ties
    flat = torch.cat([s.detach().reshape(-1) for s in logits])
    torch.testing.assert_close(flat[:300], torch.full((300,), gap))
    torch.testing.assert_close(flat[300:], torch.full((n - 300,), -gap))


def test_projection_gives_up_only_on_non_finite_logits():
    model = _net()
    masking.attach_soft_mask(model, None, s0=0.0)
    with torch.no_grad():
        for s in masking.mask_logits(model).values():
            s.fill_(math.inf)
    assert project_to_density(model, 3) is None


@pytest.mark.parametrize("density", [0.2, 0.7])
def test_dead_inputs_tie_their_logits_and_the_density_is_still_met(density):
    """Inputs that are always 0 give their weights identical gradients (only the penalty's): tied logits.
    At 0.7 the cut has to go through that tied block (42 % of the logits); without the gap the whole
    block ends at the cut (41.7 % undecided). Not every such case converges: at 0.9 the penalty moves
    the block's parts apart again in some seeds (benchmarks/cs_tied_logits.py; docs/cs.md)."""
    batches = [(x.clone(), y) for x, y in _task()]
    for x, _ in batches:
        x[:, 10:] = 0
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cs = ContinuousSparsification(model, opt, epochs_per_round=2, steps_per_epoch=len(batches), rounds=1,
                                  density=density)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a round that ends undecided warns: the split ties must not
        _train(cs, model, opt, batches)
    assert cs.mask().num_kept() == round(density * cs.mask().num_total())
    # the dead inputs' tied logits were split with a gap: none of them is left at the cut
    assert undecided_fractions(model, cs.hp.beta_final)["overall"] <= MAX_UNDECIDED


def test_schedules():
    assert round_target_density(0.05, 0, 1) == pytest.approx(0.05)
    assert [round_target_density(0.125, r, 3) for r in range(3)] == pytest.approx([0.5, 0.25, 0.125])
    assert scheduled_density(1.0, 0.1, 0, 100, 0.5) == pytest.approx(1.0)
    assert scheduled_density(1.0, 0.1, 25, 100, 0.5) == pytest.approx(math.sqrt(0.1))
    assert scheduled_density(1.0, 0.1, 50, 100, 0.5) == pytest.approx(0.1)
    assert scheduled_density(1.0, 0.1, 99, 100, 0.5) == 0.1  # exactly the end, not exp(log(end))
    assert all(scheduled_density(1.0, d, 60, 100, 0.6) == d for d in (0.05, 0.1 / 3, 0.7))
    with pytest.raises(ConfigError):
        round_target_density(1.0, 0, 1)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"density": 0.1, "s0": 0.0}, "drop --s0"),
    ({"density": 0.0}, "strictly between 0 and 1"),
    ({"density": 1.0}, "strictly between 0 and 1"),
    ({"density": 1.5}, "strictly between 0 and 1"),
    ({"density_ramp": 0.0}, "density_ramp"),
    ({"mask_optimizer": "rmsprop"}, "mask_optimizer"),
])
def test_bad_density_settings_are_one_line_errors(kwargs, fragment):
    with pytest.raises(ConfigError) as e:
        CSHparams(**kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_initial_logit_and_logit_lr():
    assert CSHparams().initial_logit == 0.0
    assert CSHparams(density=0.1).initial_logit == DENSITY_S0
    assert CSHparams(s0=-0.05).initial_logit == -0.05
    assert CSHparams().logit_lr(0.1, 400) == pytest.approx(0.1 / 20)
    assert CSHparams(mask_optimizer="sgd").logit_lr(0.3, 400) == 0.3
    assert CSHparams(mask_lr=0.01).logit_lr(0.3, 400) == 0.01


def _task(seed: int = 0, n: int = 512):
    """A synthetic task where only the first 5 of 20 inputs carry the label."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    w = torch.randn(5, 4, generator=g)
    y = (x[:, :5] @ w).argmax(1)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def _train(cs: ContinuousSparsification, model, optimizer, batches, epochs: int | None = None):
    """The README's loop, for ``epochs`` epochs (default: all of cs's rounds)."""
    for _ in range(cs.total_epochs if epochs is None else epochs):
        for x, y in batches:
            loss = F.cross_entropy(model(x), y) + cs.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            cs.step()
        cs.epoch_end()


@pytest.mark.parametrize("density, rounds, epochs", [(0.2, 1, 1), (0.05, 2, 2), (0.3, 3, 1)])
def test_api_reaches_the_target_density_with_a_binary_mask(density, rounds, epochs):
    batches = _task()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cs = ContinuousSparsification(model, opt, epochs_per_round=epochs, steps_per_epoch=len(batches),
                                  rounds=rounds, density=density)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged search warns of nothing
        _train(cs, model, opt, batches)
    n = cs.mask().num_total()
    assert cs.mask().num_kept() == round(density * n)
    conv = cs.convergence(batches)
    assert conv["undecided"] <= 0.01
    assert conv["soft_val_accuracy"] == pytest.approx(conv["hard_val_accuracy"], abs=0.003)


def test_api_default_recipe_needs_steps_per_epoch():
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        ContinuousSparsification(_net(), None, epochs_per_round=2)


def test_api_warns_when_a_round_ends_undecided():
    """The paper's recipe at a tiny learning rate: the logits stay near 0 and the API says so."""
    batches = _task()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    cs = ContinuousSparsification(model, opt, mask_optimizer="sgd", epochs_per_round=1, rounds=1, beta_final=200.0)
    with pytest.warns(RuntimeWarning, match="undecided"):
        _train(cs, model, opt, batches)


def test_api_warns_when_every_weight_is_pruned():
    batches = _task()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    cs = ContinuousSparsification(model, opt, epochs_per_round=1, steps_per_epoch=len(batches), rounds=1,
                                  s0=-50.0)
    with pytest.warns(RuntimeWarning, match="keeps none"):
        _train(cs, model, opt, batches)


def test_api_state_dict_resumes_mid_round_exactly():
    """A loop rebuilt mid-round from the model's and cs's state_dicts ends where an unbroken loop ends."""
    batches = _task()

    def make():
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        cs = ContinuousSparsification(model, opt, epochs_per_round=2, steps_per_epoch=len(batches), rounds=2,
                                      density=0.1)
        return model, opt, cs

    m1, o1, c1 = make()
    _train(c1, m1, o1, batches)
    m2, o2, c2 = make()
    _train(c2, m2, o2, batches, epochs=3)  # stop after epoch 3 of 4 (in round 2)
    saved = ({k: v.clone() for k, v in m2.state_dict().items()}, o2.state_dict(), c2.state_dict())
    m3, o3, c3 = make()
    m3.load_state_dict(saved[0])
    o3.load_state_dict(saved[1])
    c3.load_state_dict(saved[2])
    assert c3.beta == c2.beta and c3.round == 1
    _train(c3, m3, o3, batches, epochs=1)
    assert c3.mask() == c1.mask()
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(m3.state_dict()[k], v)


def test_reset_between_rounds_never_overflows_pruned_logits():
    model = _net()
    masking.attach_soft_mask(model, None, s0=0.0)
    with torch.no_grad():
        for s in masking.mask_logits(model).values():
            s.fill_(-0.5)
    for _ in range(30):  # 4000 ** 30 would overflow float32 many times over
        masking.cs_reset_logits_(model, 4000.0, 0.0)
    for s in masking.mask_logits(model).values():
        assert bool(torch.isfinite(s).all()) and bool((s < 0).all())


def test_projection_cuts_a_tie_in_logical_order_in_channels_last_logits():
    """Conv nets train in channels_last on the CPU (lottery.engine.trainer): the cut through a tie edits
    the logits in their logical order and writes back, as for contiguous logits."""
    def conv_net():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
        masking.attach_soft_mask(net, None, s0=DENSITY_S0)  # every logit tied
        return net

    plain, nhwc = conv_net(), conv_net().to(memory_format=torch.channels_last)
    conv_logits = next(iter(masking.mask_logits(nhwc).values()))
    assert conv_logits.dim() == 4 and conv_logits.is_contiguous(memory_format=torch.channels_last)
    for net in (plain, nhwc):
        project_to_density(net, 100)
        assert kept_count(net) == 100
    for a, b in zip(masking.mask_logits(plain).values(), masking.mask_logits(nhwc).values()):
        assert torch.equal(a.detach(), b.detach())
