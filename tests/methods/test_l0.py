"""Stochastic L0 with hard concrete gates: the distribution of the gate against its closed forms (Monte
Carlo), the expected-L0 penalty, the deterministic test-time gate, the parametrisation (state_dict, baking,
conflicts with other masks) and the callbacks inside a real Trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from conftest import tiny_mlp
from lottery import masking
from lottery.engine import Trainer
from lottery.errors import ConfigError
from lottery.hparams import TrainingHparams
from lottery.masks import Mask
from lottery.methods.l0 import (
    BETA, GAMMA, ZETA, L0Hparams, L0PenaltyCallback, L0SnapshotCallback, attach_l0_gates, expected_density,
    expected_l0, gate_probability_nonzero, hard_concrete_deterministic, hard_concrete_sample, l0_gates,
    l0_hard_mask, l0_penalty, log_alphas, make_l0_optimizers, non_gate_parameters, plain_state_dict,
    remove_l0_gates,
)

LOG_ALPHAS = torch.tensor([-4.0, -2.0, -0.5, 0.0, 0.7, 2.0, 4.0])
N_SAMPLES = 40_000


def _samples(log_alpha: torch.Tensor, n: int = N_SAMPLES, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return hard_concrete_sample(log_alpha.expand(n, -1), generator=g)


def _within(mc: torch.Tensor, exact: torch.Tensor, n: int) -> None:
    """Monte-Carlo frequencies within 5 binomial standard errors (plus a hair) of the exact values."""
    se = torch.sqrt(exact * (1 - exact) / n)
    assert torch.all((mc - exact).abs() <= 5 * se + 1e-3), (mc, exact)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


# -- the gate's distribution ------------------------------------------------------------------------------
def test_sample_in_unit_interval_with_exact_zeros_and_ones():
    z = _samples(LOG_ALPHAS)
    assert z.min() >= 0 and z.max() <= 1
    # every log_alpha of moderate size gives both exact 0 and exact 1 with positive probability
    for j in range(1, len(LOG_ALPHAS) - 1):
        assert (z[:, j] == 0).any() and (z[:, j] == 1).any(), LOG_ALPHAS[j]
    assert ((z > 0) & (z < 1)).any()  # and values in between


def test_exact_zero_and_one_frequencies_match_closed_forms():
    """P(z = 0) = 1 - sigmoid(la - beta log(-gamma/zeta)), P(z = 1) = sigmoid(la - beta log((1-gamma)/(zeta-1)))."""
    z = _samples(LOG_ALPHAS, seed=1)
    p0 = 1 - torch.sigmoid(LOG_ALPHAS - BETA * math.log(-GAMMA / ZETA))
    p1 = torch.sigmoid(LOG_ALPHAS - BETA * math.log((1 - GAMMA) / (ZETA - 1)))
    _within((z == 0).double().mean(0).float(), p0, N_SAMPLES)
    _within((z == 1).double().mean(0).float(), p1, N_SAMPLES)


def test_sample_matches_the_formula_for_given_u():
    la = torch.tensor([-1.0, 0.0, 0.3, 2.5])
    u = torch.tensor([0.2, 0.5, 0.9, 0.01])
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + la) / BETA)
    expected = torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0, 1)
    torch.testing.assert_close(hard_concrete_sample(la, u=u), expected)


@settings(max_examples=60, deadline=None)
@given(la=st.floats(-30, 30), u=st.floats(0.0, 1.0), beta=st.floats(0.1, 2.0))
def test_sample_always_finite_and_in_range(la, u, beta):
    z = hard_concrete_sample(torch.tensor([la]), beta=beta, u=torch.tensor([u]))
    assert torch.isfinite(z).all() and 0 <= float(z) <= 1


def test_expected_l0_penalty_against_monte_carlo():
    """lam * sum(sigmoid(la - beta log(-gamma/zeta))) against lam * (number of non-zero sampled gates)."""
    model = _net()
    names = ["0.weight", "2.weight"]
    g = torch.Generator().manual_seed(3)
    attach_l0_gates(model, names, log_alpha_init={n: 2 * torch.randn(p.shape, generator=g) for n, p in
                                                    masking.logical_named_parameters(model).items() if n in names})
    lam = 0.01
    exact = l0_penalty(model, lam)
    gates = l0_gates(model)
    n = 4000
    with torch.no_grad():
        counts = sum((_samples(gate.log_alpha.reshape(-1), n, seed=i) > 0).double().mean(0).sum()
                     for i, gate in enumerate(gates.values()))
    total = sum(gate.log_alpha.numel() for gate in gates.values())
    # each gate's frequency has variance <= 1/(4n); the sum of `total` of them a std <= sqrt(total / (4n))
    assert abs(float(exact.detach()) - lam * float(counts)) <= lam * 5 * math.sqrt(total / (4 * n))
    # the closed form itself, and the mean mode
    direct = sum(torch.sigmoid(gt.log_alpha - BETA * math.log(-GAMMA / ZETA)).sum() for gt in gates.values()).detach()
    torch.testing.assert_close(exact, lam * direct)
    torch.testing.assert_close(l0_penalty(model, lam, "mean"), lam * direct / total)
    assert expected_density(model) == pytest.approx(float(direct) / total)


def test_penalty_gradient_reaches_log_alpha_and_lowers_it():
    model = _net()
    attach_l0_gates(model, ["0.weight"])
    l0_penalty(model, 1.0).backward()
    la = log_alphas(model)["0.weight"]
    assert la.grad is not None and torch.all(la.grad > 0)  # descending the penalty lowers every log_alpha
    assert model[0].parametrizations.weight.original.grad is None  # the penalty does not touch the weights


def test_task_gradient_reaches_log_alpha_through_the_sample():
    model = _net()
    attach_l0_gates(model, ["0.weight"], init_drop_rate=0.3)
    model.train()
    model(torch.randn(8, 6)).square().sum().backward()
    assert log_alphas(model)["0.weight"].grad.abs().sum() > 0


# -- the test-time gate ----------------------------------------------------------------------------------
def test_test_time_gate_is_deterministic_and_draws_no_random_numbers():
    model = _net()
    attach_l0_gates(model, ["0.weight", "2.weight"], init_std=1.0)
    x = torch.randn(4, 6)
    model.eval()
    state = torch.get_rng_state()
    a, b = model(x), model(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    gate = l0_gates(model)["0.weight"]
    z = hard_concrete_deterministic(gate.log_alpha)
    torch.testing.assert_close(model[0].weight, model[0].parametrizations.weight.original * z)
    torch.testing.assert_close(z, torch.clamp(torch.sigmoid(gate.log_alpha) * (ZETA - GAMMA) + GAMMA, 0, 1))
    model.train()  # training mode samples: two passes differ
    assert not torch.equal(model(x), model(x))


def test_hard_mask_is_z_positive_and_the_closed_form_threshold():
    model = _net()
    attach_l0_gates(model, ["0.weight"], init_std=3.0)
    la = log_alphas(model)["0.weight"].detach()
    mask = l0_hard_mask(model)
    assert torch.equal(mask["0.weight"], hard_concrete_deterministic(la) > 0)
    # z > 0  <=>  log_alpha > log(-gamma / zeta)
    assert torch.equal(mask["0.weight"], la > math.log(-GAMMA / ZETA))
    assert 0 < mask.density() < 1


def test_probability_nonzero_formula():
    la = torch.linspace(-5, 5, 11)
    torch.testing.assert_close(gate_probability_nonzero(la), torch.sigmoid(la - BETA * math.log(-GAMMA / ZETA)))


# -- the parametrisation ----------------------------------------------------------------------------------
def test_init_follows_drop_rate_and_std():
    model = nn.Linear(200, 100)
    g = torch.Generator().manual_seed(0)
    la = attach_l0_gates(model, ["weight"], init_drop_rate=0.2, init_std=0.05, generator=g)["weight"].detach()
    assert la.mean().item() == pytest.approx(math.log(0.8 / 0.2), abs=0.005)
    assert la.std().item() == pytest.approx(0.05, rel=0.05)
    assert L0Hparams(init_drop_rate=0.5).init_mean == 0.0


def test_state_dict_keys_round_trip_and_plain_weights():
    model = tiny_mlp()
    attach_l0_gates(model, ["0.weight", "3.weight"])
    sd = model.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "0.weight_log_alpha", "3.weight", "3.bias", "3.weight_log_alpha"]
    other = tiny_mlp(seed=5)
    attach_l0_gates(other, ["0.weight", "3.weight"], init_drop_rate=0.9)
    assert str(other.load_state_dict(sd)) == "<All keys matched successfully>"
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # the rewind state of a gated model loads into a plain model
    plain = tiny_mlp(seed=7)
    plain.load_state_dict(plain_state_dict(sd))
    assert torch.equal(plain[0].weight, sd["0.weight"])
    # missing keys are reported under their public names
    broken = {k: v for k, v in sd.items() if k != "3.weight_log_alpha"}
    result = other.load_state_dict(broken, strict=False)
    assert result.missing_keys == ["3.weight_log_alpha"]


def test_remove_bakes_the_eval_network_with_exact_zeros():
    model = _net()
    attach_l0_gates(model, ["0.weight", "2.weight"], init_std=2.0)
    model.eval()
    x = torch.randn(16, 6)
    expected_out = model(x)
    expected_mask = l0_hard_mask(model)
    mask = remove_l0_gates(model, bake=True)
    assert mask == expected_mask and 0 < mask.density() < 1
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert type(model[0]) is nn.Linear and not l0_gates(model)
    torch.testing.assert_close(model(x), expected_out, rtol=0, atol=0)
    for n, m in mask.items():
        w = dict(model.named_parameters())[n]
        assert torch.all(w[~m] == 0)


def test_remove_without_baking_keeps_raw_weights():
    model = _net()
    raw = model[0].weight.detach().clone()
    attach_l0_gates(model, ["0.weight"], init_std=2.0)
    remove_l0_gates(model, bake=False)
    assert torch.equal(model[0].weight, raw)


def test_conflicts_with_other_masks_are_refused():
    model = _net()
    masking.attach_hard_mask(model, Mask.ones(model, ["0.weight"]))
    with pytest.raises(ConfigError, match="hard or CS mask"):
        attach_l0_gates(model, ["0.weight"])
    model = _net()
    masking.attach_soft_mask(model, ["0.weight"])
    with pytest.raises(ConfigError, match="hard or CS mask"):
        attach_l0_gates(model, ["0.weight"])
    model = _net()
    attach_l0_gates(model, ["0.weight"])
    with pytest.raises(ConfigError):
        masking.attach_soft_mask(model, ["0.weight"])
    with pytest.raises(ConfigError):
        masking.attach_hard_mask(model, Mask.ones({"0.weight": (5, 6)}))
    with pytest.raises(ConfigError, match="not a parameter"):
        attach_l0_gates(model, ["nope.weight"])


def test_attach_defaults_to_prunable_weights_and_reattaching_replaces():
    model = tiny_mlp()
    got = attach_l0_gates(model, ignore=("3.weight",))
    assert list(got) == ["0.weight"]
    la = attach_l0_gates(model, ["0.weight"], init_drop_rate=0.1)["0.weight"]
    assert list(log_alphas(model)) == ["0.weight"] and log_alphas(model)["0.weight"] is la
    assert masking.prunable_weights(model)["0.weight"] is model[0].parametrizations.weight.original
    assert "0.weight" in masking.logical_named_parameters(model)


def test_deepcopy_keeps_gates_and_state_dict_names():
    model = tiny_mlp()
    attach_l0_gates(model, ["0.weight"])
    clone = copy.deepcopy(model)
    assert list(clone.state_dict()) == list(model.state_dict())
    assert list(log_alphas(clone)) == ["0.weight"]


# -- hparams, optimizers, callbacks ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    dict(lam=-1.0), dict(penalty="l1"), dict(init_drop_rate=0.0), dict(init_drop_rate=1.0), dict(gate_gamma=0.1),
    dict(gate_zeta=1.0), dict(gate_beta=0.0), dict(rewind="2 epochs"), dict(gate_optimizer="rmsprop"),
    dict(gate_lr=0.0), dict(gate_optimizer="sgd", gate_momentum=0.0), dict(search_steps="x"),
])
def test_hparams_validation(bad):
    with pytest.raises(ConfigError):
        L0Hparams(**bad)


def test_optimizers_separate_gates_without_weight_decay():
    model = tiny_mlp()
    attach_l0_gates(model, ["0.weight", "3.weight"])
    training = TrainingHparams(lr=0.1, momentum=0.9, weight_decay=1e-4)
    w_opt, g_opt = make_l0_optimizers(model, training, L0Hparams())
    gate_ids = {id(p) for p in log_alphas(model).values()}
    assert {id(p) for p in g_opt.param_groups[0]["params"]} == gate_ids
    assert not gate_ids & {id(p) for g in w_opt.param_groups for p in g["params"]}
    assert len(non_gate_parameters(model)) == len(w_opt.param_groups[0]["params"]) == 4
    assert isinstance(g_opt, torch.optim.Adam) and g_opt.param_groups[0]["lr"] == 1e-3
    assert g_opt.param_groups[0]["weight_decay"] == 0 and w_opt.param_groups[0]["weight_decay"] == 1e-4
    _, sgd = make_l0_optimizers(model, training, L0Hparams(gate_optimizer="sgd", gate_momentum=0.5))
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.5, True, 0.0)


def test_search_in_a_trainer_prunes_with_a_strong_penalty_and_reports_density(tiny_data):
    train, test = tiny_data
    model = tiny_mlp()
    attach_l0_gates(model, ["0.weight", "3.weight"])
    hp = L0Hparams(lam=0.05, gate_lr=0.1)
    training = TrainingHparams(training_steps="4ep", lr=0.05)
    snaps = []
    trainer = Trainer(model, train, training, optimizers=make_l0_optimizers(model, training, hp),
                      eval_loaders={"test": test}, callbacks=[L0PenaltyCallback(hp), L0SnapshotCallback(3, snaps.append)],
                      progress=False, log=lambda m: None)
    rows = trainer.fit()
    assert all({"density", "expected_density", "penalty"} <= set(r) for r in rows)
    assert rows[-1]["expected_density"] < rows[0]["expected_density"] < 0.84
    assert rows[-1]["density"] < 1.0 and rows[-1]["density"] == l0_hard_mask(model).density()
    assert rows[-1]["penalty"] > 0
    assert len(snaps) == 1 and not any(k.endswith("_log_alpha") for k in snaps[0])
    assert set(snaps[0]) == set(tiny_mlp().state_dict())
    assert float(expected_l0(model).detach()) == pytest.approx(rows[-1]["expected_density"] * 32 * 24, rel=1e-6)
