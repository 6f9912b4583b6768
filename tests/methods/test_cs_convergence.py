"""lottery.methods.cs_convergence: the round-end figures against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lottery import masking
from lottery.masks import Mask
from lottery.methods.cs_convergence import (
    MAX_ACCURACY_GAP, MAX_UNDECIDED, UNDECIDED_LOGIT, gap_limit_for, is_converged, mask_flips, round_convergence,
    soft_and_hard_accuracy, undecided_fractions,
)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def _set_logits(model: nn.Module, fn) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for s in masking.mask_logits(model).values():
            s.copy_(fn(s.shape))
    return {n: s.detach().clone() for n, s in masking.mask_logits(model).items()}


def test_threshold_is_one_percent_from_binary():
    assert torch.sigmoid(torch.tensor(UNDECIDED_LOGIT)).item() == pytest.approx(0.99)


@pytest.mark.parametrize("beta", [1.0, 37.0, 1000.0])
def test_undecided_fractions_match_a_direct_count(beta):
    model = _net()
    masking.attach_soft_mask(model, None, s0=0.0)
    g = torch.Generator().manual_seed(1)
    # magnitudes from 1e-5 to 10: some undecided and some decided at every beta tested
    logits = _set_logits(model, lambda shape: torch.randn(shape, generator=g).sign()
                         * torch.logspace(-5, 1, steps=math.prod(shape))[torch.randperm(math.prod(shape), generator=g)].reshape(shape))
    got = undecided_fractions(model, beta)
    total = sum(s.numel() for s in logits.values())
    direct = {n: float(((beta * s).abs() < math.log(99)).float().mean()) for n, s in logits.items()}
    overall = sum(int(((beta * s).abs() < math.log(99)).sum()) for s in logits.values()) / total
    assert got["per_layer"] == pytest.approx(direct)
    assert got["overall"] == pytest.approx(overall)
    assert 0 < got["overall"] < 1  # the test data have both kinds


def test_mask_flips_count_changed_entries():
    a = Mask({"w": torch.tensor([True, False, True, True]), "v": torch.tensor([[False, False]])})
    b = Mask({"w": torch.tensor([False, False, True, False]), "v": torch.tensor([[True, False]])})
    assert mask_flips(a, b) == 3
    assert mask_flips(a, a) == 0


def _data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def test_decided_mask_gives_equal_soft_and_hard_outputs_and_accuracy():
    model = _net()
    masking.attach_soft_mask(model, None, s0=0.0)
    g = torch.Generator().manual_seed(2)
    # every logit at least 0.05 from 0: at beta 1000 |beta*s| >= 50, the sigmoid is 0 or 1 to float precision
    _set_logits(model, lambda shape: torch.sign(torch.randn(shape, generator=g)) * (0.05 + torch.rand(shape, generator=g)))
    masking.set_temperature(model, 1000.0)
    x = torch.randn(20, 12)
    with torch.no_grad():
        soft = model(x)
        with masking.hardened_soft_masks(model):
            hard = model(x)
    torch.testing.assert_close(soft, hard)
    s, h, count = soft_and_hard_accuracy(model, _data(), "cpu", 1000.0)
    assert s == h and count == 96
    assert undecided_fractions(model, 1000.0)["overall"] == 0


def test_hardened_network_is_the_hard_limit_computed_directly():
    model = _net()
    masking.attach_soft_mask(model, None, s0=0.3)
    g = torch.Generator().manual_seed(3)
    logits = _set_logits(model, lambda shape: torch.randn(shape, generator=g) * 0.01)
    masking.set_temperature(model, 5.0)
    x = torch.randn(7, 12)
    plain = _net()  # same initial weights (seeded), masked by hand: w * 1[s > 0] / sigmoid(s0)
    scale = 1 / torch.sigmoid(torch.tensor(0.3))
    with torch.no_grad():
        for name, s in logits.items():
            plain.get_parameter(name).mul_((s > 0).float() * scale)
        with masking.hardened_soft_masks(model):
            got = model(x)
        soft = model(x)
    torch.testing.assert_close(got, plain(x))
    assert not torch.allclose(soft, got)  # outside the block the soft masks are back


def _accuracy(net: nn.Module, batches) -> float:
    with torch.no_grad():
        hits = sum(int((net(x).argmax(1) == y).sum()) for x, y in batches)
    return hits / sum(len(y) for _, y in batches)


def test_round_convergence_figures_against_direct_computations():
    model = _net()
    masking.attach_soft_mask(model, None, s0=0.0)
    start = masking.hard_mask_from_logits(model)  # s0 = 0: nothing kept at the start
    g = torch.Generator().manual_seed(4)
    logits = _set_logits(model, lambda shape: torch.randn(shape, generator=g) * 0.003)
    data = _data()
    conv = round_convergence(model, data, "cpu", 1000.0, start)
    kept = sum(int((s > 0).sum()) for s in logits.values())
    assert conv["flips"] == kept
    assert conv["density"] == pytest.approx(kept / sum(s.numel() for s in logits.values()))
    # soft: w * sigmoid(1000 s) / sigmoid(0); hard: w * 1[s > 0] / sigmoid(0), on plain copies of the network
    soft_net, hard_net = _net(), _net()
    with torch.no_grad():
        for name, s in logits.items():
            soft_net.get_parameter(name).mul_(torch.sigmoid(1000.0 * s) * 2)
            hard_net.get_parameter(name).mul_((s > 0).float() * 2)
    assert conv["soft_val_accuracy"] == pytest.approx(_accuracy(soft_net, data))
    assert conv["hard_val_accuracy"] == pytest.approx(_accuracy(hard_net, data))
    assert conv["soft_val_accuracy"] != conv["hard_val_accuracy"]  # these logits are far from decided
    assert conv["converged"] is False and conv["undecided"] > MAX_UNDECIDED


def test_is_converged_limits():
    assert is_converged(MAX_UNDECIDED, MAX_ACCURACY_GAP)
    assert not is_converged(MAX_UNDECIDED + 1e-6, 0.0)
    assert not is_converged(0.0, -MAX_ACCURACY_GAP - 1e-6)
    # on a small validation split one example is the smallest visible gap
    assert gap_limit_for(64) == pytest.approx(1 / 64) and gap_limit_for(10_000) == MAX_ACCURACY_GAP
    assert is_converged(0.0, 1 / 64, gap_limit_for(64))


def test_the_gap_limit_is_worded_in_points_singular_or_plural():
    from lottery.methods.cs_convergence import gap_limit_for, not_converged_message

    conv = {"undecided": 0.0, "soft_hard_gap": 0.04, "hard_val_accuracy": 0.11, "soft_val_accuracy": 0.15}
    small = not_converged_message({**conv, "soft_hard_gap_limit": gap_limit_for(100)}, 0)
    assert "(limit 1 point apart)" in small  # one example of 100
    large = not_converged_message({**conv, "soft_hard_gap_limit": gap_limit_for(5000)}, 0)
    assert "(limit 0.3 points apart)" in large
