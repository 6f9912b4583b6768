"""Continuous Sparsification: the math against direct computations, the callbacks inside a real Trainer,
and the in-loop ``ContinuousSparsification`` API on a user's own model and training loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch.nn.functional as F
from torch import nn

from conftest import TensorBatches, blobs, tiny_mlp
from lottery import masking
from lottery.engine import Callback, Trainer
from lottery.hparams import TrainingHparams
from lottery.masks import Mask
from lottery.methods.cs import (
    ContinuousSparsification,
    CSHparams,
    EnforceMaskCallback,
    SnapshotCallback,
    make_search_optimizers,
    mask_penalty,
    search_round_callbacks,
    temperature,
)


def _noop(_msg: str) -> None:
    pass


def _small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 4))


def _set_logits(model: nn.Module, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, s in masking.mask_logits(model).items():
            s.copy_(torch.randn(s.shape, generator=g) * scale)
            out[name] = s.detach().clone()
    return out


def _raw_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    params = masking.logical_named_parameters(model)
    return {n: params[n] for n in masking.mask_logits(model)}


# -- 1. soft mask and penalty against direct computations --------------------------------------------
@pytest.mark.parametrize("s0, beta, scale_by_s0", [(0.0, 1.0, True), (0.3, 2.5, True), (-0.2, 7.0, True), (0.3, 2.5, False)])
def test_soft_mask_is_sigmoid_beta_s_over_sigmoid_s0(s0, beta, scale_by_s0):
    model = _small_net()
    masking.attach_soft_mask(model, s0=s0, scale_by_s0=scale_by_s0)
    # fresh logits all equal s0: at beta = 1 the scaled mask is exactly 1
    if scale_by_s0:
        for m in masking.soft_mask_values(model).values():
            assert torch.equal(m, torch.ones_like(m))
    logits = _set_logits(model, seed=1)
    masking.set_temperature(model, beta)
    values = masking.soft_mask_values(model)
    raw = _raw_weights(model)
    params = dict(model.named_modules())
    denom = torch.sigmoid(torch.tensor(s0)) if scale_by_s0 else torch.tensor(1.0)
    assert list(values) == ["0.weight", "3.weight", "5.weight"]
    for name, s in logits.items():
        expected = torch.sigmoid(beta * s) / denom
        torch.testing.assert_close(values[name], expected, rtol=1e-6, atol=1e-7)
        # the module's effective weight is w * m
        module = params[name.rsplit(".", 1)[0]]
        torch.testing.assert_close(module.weight, raw[name] * expected, rtol=1e-6, atol=1e-7)
    # and the forward pass uses it
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    eff = {n: raw[n] * torch.sigmoid(beta * logits[n]) / denom for n in logits}
    h = F.relu(F.conv2d(x, eff["0.weight"], model[0].bias))
    h = F.relu(F.linear(h.flatten(1), eff["3.weight"], model[3].bias))
    torch.testing.assert_close(model(x), F.linear(h, eff["5.weight"], model[5].bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_penalty_is_lam_times_sum_of_mask(mode):
    model = _small_net()
    masking.attach_soft_mask(model, s0=0.2)
    logits = _set_logits(model, seed=3, scale=2.0)
    beta, lam = 3.0, 0.37
    masking.set_temperature(model, beta)
    total = sum((torch.sigmoid(beta * s) / torch.sigmoid(torch.tensor(0.2))).double().sum() for s in logits.values())
    n = sum(s.numel() for s in logits.values())
    expected = lam * (total / n if mode == "mean" else total)
    got = mask_penalty(model, lam, mode)
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # the same through the in-loop API
    cs_model = _small_net()
    cs = ContinuousSparsification(cs_model, mask_optimizer="sgd", epochs_per_round=2, rounds=1, s0=0.2, lam=lam, penalty=mode)
    _set_logits(cs_model, seed=3, scale=2.0)
    masking.set_temperature(cs_model, beta)
    assert cs.penalty().item() == pytest.approx(expected.item(), rel=1e-6)
    # sum and mean differ by exactly the number of masked weights
    assert mask_penalty(model, lam, "sum").item() == pytest.approx(mask_penalty(model, lam, "mean").item() * n, rel=1e-6)


def test_penalty_gradient_on_logits_matches_formula():
    model = _small_net()
    s0, beta, lam = 0.1, 4.0, 0.5
    masking.attach_soft_mask(model, s0=s0)
    logits = _set_logits(model, seed=4)
    masking.set_temperature(model, beta)
    mask_penalty(model, lam).backward()
    for name, p in masking.mask_logits(model).items():
        sig = torch.sigmoid(beta * logits[name])
        expected = lam * beta * sig * (1 - sig) / torch.sigmoid(torch.tensor(s0))
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-9)


# -- 2. gradients -----------------------------------------------------------------------------------
def test_gradients_reach_logits_and_weights_through_soft_mask():
    model = _small_net()
    s0, beta = 0.3, 2.5
    masking.attach_soft_mask(model, s0=s0)
    logits = _set_logits(model, seed=5)
    masking.set_temperature(model, beta)
    raw = _raw_weights(model)
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(6))
    r = torch.randn(4, 4, generator=torch.Generator().manual_seed(7))
    (model(x) * r).sum().backward()

    # the same network written out by hand
    w = {n: raw[n].detach().clone().requires_grad_(True) for n in raw}
    s = {n: logits[n].clone().requires_grad_(True) for n in logits}
    eff = {n: w[n] * torch.sigmoid(beta * s[n]) / torch.sigmoid(torch.tensor(s0)) for n in w}
    h = F.relu(F.conv2d(x, eff["0.weight"], model[0].bias.detach()))
    h = F.relu(F.linear(h.flatten(1), eff["3.weight"], model[3].bias.detach()))
    (F.linear(h, eff["5.weight"], model[5].bias.detach()) * r).sum().backward()

    model_logits = masking.mask_logits(model)
    for n in raw:
        assert raw[n].grad is not None and model_logits[n].grad is not None, n
        torch.testing.assert_close(raw[n].grad, w[n].grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model_logits[n].grad, s[n].grad, rtol=1e-5, atol=1e-6)
        assert model_logits[n].grad.abs().sum() > 0, n
        assert raw[n].grad.abs().sum() > 0, n


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_no_gradient_through_hard_mask_to_pruned_weights(optimizer):
    model = _small_net()
    g = torch.Generator().manual_seed(8)
    mask = Mask({n: torch.rand(p.shape, generator=g) < 0.5 for n, p in masking.prunable_weights(model).items()})
    masking.attach_hard_mask(model, mask)
    params = masking.logical_named_parameters(model)
    x = torch.randn(8, 2, 6, 6, generator=g)
    model(x).pow(2).sum().backward()
    for n, m in mask.items():
        grad = params[n].grad
        assert torch.all(grad[~m] == 0), n
        assert grad[m].abs().sum() > 0, n
    # several steps with momentum / Adam moments and weight decay leave pruned weights exactly 0
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 2, 6, 6, generator=g)).pow(2).sum().backward()
        opt.step()
        for n, m in mask.items():
            assert torch.all(params[n].detach()[~m] == 0), n
            assert torch.all(params[n].grad[~m] == 0), n


# -- 3. temperature ---------------------------------------------------------------------------------
@pytest.mark.parametrize("E", [2, 3, 5, 85])
def test_temperature_endpoints_and_geometric_growth(E):
    bf = 200.0
    betas = [temperature(e, E, bf) for e in range(E)]
    assert betas[0] == 1.0
    assert betas[-1] == pytest.approx(bf, rel=1e-12)
    ratios = [b / a for a, b in zip(betas, betas[1:])]
    assert all(r == pytest.approx(bf ** (1 / (E - 1)), rel=1e-9) for r in ratios)
    assert temperature(0, 1, bf) == bf  # a one-epoch round runs at the final temperature


@settings(max_examples=60, deadline=None)
@given(E=st.integers(2, 300), bf=st.floats(1.0, 1e4), s0=st.floats(-1.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_temperature_and_reset_properties(E, bf, s0, seed):
    betas = [temperature(e, E, bf) for e in range(E)]
    assert betas[0] == 1.0 and betas[-1] == pytest.approx(bf, rel=1e-9)
    assert all(b2 >= b1 for b1, b2 in zip(betas, betas[1:]))
    model = nn.Linear(6, 5)
    masking.attach_soft_mask(model, s0=s0)
    logits = _set_logits(model, seed=seed % 10_000)
    masking.cs_reset_logits_(model, bf, s0)
    s_new = masking.mask_logits(model)["weight"].detach()
    s_old = logits["weight"]
    assert torch.equal(s_new, torch.clamp(bf * s_old, min=masking.PRUNED_LOGIT, max=s0))  # floored: no -inf
    assert torch.all(s_new[s_old <= 0] <= 0)  # pruned stays pruned
    assert torch.all(s_new <= s0)


class BetaRecorder(Callback):
    """Records the temperature the forward pass actually uses at every step (after TemperatureCallback)."""

    def __init__(self):
        self.steps: list[tuple[int, int, float]] = []  # (iteration, epoch, beta)

    def on_step_start(self, trainer):
        self.steps.append((trainer.iteration, trainer.epoch, masking.get_temperature(trainer.model)))


def _search(tiny_data, hp: CSHparams, recipe: TrainingHparams, rounds: int):
    """Run CS rounds with the library's callbacks and optimizers on a tiny MLP; one recorder per round."""
    train, test = tiny_data
    model = tiny_mlp()
    masking.attach_soft_mask(model, s0=hp.initial_logit, scale_by_s0=hp.scale_by_s0)
    recorders, histories = [], []
    for r in range(rounds):
        if r > 0:
            masking.cs_reset_logits_(model, hp.beta_final, hp.initial_logit)
        rec = BetaRecorder()
        trainer = Trainer(model, train, recipe, optimizers=make_search_optimizers(model, recipe, hp),
                          eval_loaders={"test": test}, callbacks=[*search_round_callbacks(hp, r), rec],
                          progress=False, log=_noop)
        histories.append(trainer.fit())
        recorders.append(rec)
    return model, recorders, histories


RECIPE = TrainingHparams(training_steps="3ep", batch_size=32, lr=0.1, momentum=0.9, weight_decay=1e-4)


def test_temperature_callback_per_epoch_in_trainer(tiny_data):
    bf = 50.0
    hp = CSHparams(lam=1e-4, beta_final=bf, rounds=2, temperature_schedule="epoch", mask_optimizer="sgd")
    _, recorders, histories = _search(tiny_data, hp, RECIPE, rounds=2)
    ipe = len(tiny_data[0])
    for rec, history in zip(recorders, histories):
        assert len(rec.steps) == 3 * ipe
        per_epoch: dict[int, set[float]] = {}
        for _, epoch, beta in rec.steps:
            per_epoch.setdefault(epoch, set()).add(beta)
        assert all(len(v) == 1 for v in per_epoch.values()), per_epoch  # constant within an epoch
        betas = [per_epoch[e].pop() for e in range(3)]
        assert betas[0] == 1.0  # first epoch of every round
        assert betas[-1] == pytest.approx(bf, rel=1e-6)  # last epoch of every round
        assert betas[1] == pytest.approx(math.sqrt(bf), rel=1e-6)
        assert [row["beta"] for row in history] == pytest.approx([1.0, math.sqrt(bf), bf], rel=1e-6)
        assert [row["round"] for row in history] == [histories.index(history)] * 3


def test_temperature_callback_per_iteration_in_trainer(tiny_data):
    bf = 50.0
    hp = CSHparams(lam=1e-4, beta_final=bf, rounds=2, temperature_schedule="iteration", mask_optimizer="sgd")
    _, recorders, _ = _search(tiny_data, hp, RECIPE, rounds=2)
    n = 3 * len(tiny_data[0])
    for rec in recorders:
        betas = [b for _, _, b in rec.steps]
        assert len(betas) == n
        assert betas[0] == 1.0
        assert betas[-1] == pytest.approx(bf, rel=1e-6)
        assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:]))
        assert betas == pytest.approx([bf ** (i / (n - 1)) for i in range(n)], rel=1e-5)


@pytest.mark.parametrize("E", [1, 2, 3])
def test_in_loop_beta_schedule_and_model_temperature_agree(E):
    bf = 20.0
    model = tiny_mlp()
    cs = ContinuousSparsification(model, mask_optimizer="sgd", epochs_per_round=E, rounds=3, beta_final=bf)
    seen = [(cs.beta, masking.get_temperature(model))]
    for _ in range(cs.total_epochs):
        out = cs.epoch_end()
        assert out["beta"] == cs.beta
        seen.append((cs.beta, masking.get_temperature(model)))
    # the temperature the model runs with is the one the API reports, at every epoch
    for reported, used in seen:
        assert used == pytest.approx(reported, rel=1e-6)
    per_epoch = [b for b, _ in seen[: cs.total_epochs]]  # beta during epoch 0..total-1
    for r in range(3):
        epochs = per_epoch[r * E : (r + 1) * E]
        assert epochs == pytest.approx([temperature(e, E, bf) for e in range(E)], rel=1e-9)
        assert epochs[-1] == pytest.approx(bf)
        if E > 1:
            assert epochs[0] == 1.0


# -- 4. the reset between rounds --------------------------------------------------------------------
@pytest.mark.parametrize("s0", [0.1, 0.0, -0.05])
def test_in_loop_reset_keeps_negative_logits_pruned(s0):
    bf = 50.0
    model = tiny_mlp()
    cs = ContinuousSparsification(model, mask_optimizer="sgd", epochs_per_round=2, rounds=2, s0=s0, beta_final=bf)
    logits = _set_logits(model, seed=9)
    with torch.no_grad():  # exact zeros are pruned (strict mask) and must stay pruned
        for s in masking.mask_logits(model).values():
            s.view(-1)[:7] = 0.0
    logits = {n: s.detach().clone() for n, s in masking.mask_logits(model).items()}
    cs.epoch_end()  # inside round 0: no reset
    for n, s in masking.mask_logits(model).items():
        assert torch.equal(s.detach(), logits[n])
    before = cs.mask()
    cs.epoch_end()  # end of round 0: reset
    assert cs.round == 1 and cs.beta == 1.0 and masking.get_temperature(model) == 1.0
    after = cs.mask()
    for n, s in masking.mask_logits(model).items():
        old = logits[n]
        expected = torch.clamp(bf * old, max=s0)
        assert torch.equal(s.detach(), expected), n
        neg = old < 0
        assert torch.equal(s.detach()[neg], bf * old[neg])  # pruned ones scaled, still negative
        big = old > abs(s0) / bf + 1e-6
        assert torch.all(s.detach()[big] == s0)  # the others restart at s0
        # every weight pruned before the reset is still pruned after it
        assert not torch.any(after[n] & ~before[n]), n
    # no reset after the last round
    last = {n: s.detach().clone() for n, s in masking.mask_logits(model).items()}
    cs.epoch_end()
    cs.epoch_end()
    assert cs.beta == pytest.approx(bf)
    for n, s in masking.mask_logits(model).items():
        assert torch.equal(s.detach(), last[n])


def test_reset_does_not_depend_on_current_temperature():
    """The reference code reset at beta = 1 (``min(s, s0)``); here the pruned logits become beta_final * s."""
    model = tiny_mlp()
    masking.attach_soft_mask(model, s0=0.0)
    logits = _set_logits(model, seed=10)
    masking.set_temperature(model, 123.0)
    masking.cs_reset_logits_(model, 40.0, 0.0)
    for n, s in masking.mask_logits(model).items():
        assert torch.equal(s.detach(), torch.clamp(40.0 * logits[n], max=0.0))
    assert masking.get_temperature(model) == 1.0


# -- 5. no weight decay on the logits ---------------------------------------------------------------
@pytest.mark.parametrize("weights_optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("mask_lr", [None, 0.5])
def test_search_optimizers_logits_have_no_weight_decay(weights_optimizer, mask_lr):
    model = tiny_mlp()
    masking.attach_soft_mask(model)
    _set_logits(model, seed=11)
    recipe = TrainingHparams(optimizer=weights_optimizer, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)
    hp = CSHparams(mask_lr=mask_lr, mask_momentum=0.8, mask_nesterov=True, mask_optimizer="sgd")
    w_opt, s_opt = make_search_optimizers(model, recipe, hp)
    logit_ids = {id(p) for p in masking.mask_logits(model).values()}
    w_ids = {id(p) for g in w_opt.param_groups for p in g["params"]}
    s_ids = {id(p) for g in s_opt.param_groups for p in g["params"]}
    assert s_ids == logit_ids
    assert w_ids == {id(p) for p in model.parameters()} - logit_ids
    assert all(g["weight_decay"] == 0.05 for g in w_opt.param_groups)
    assert isinstance(s_opt, torch.optim.SGD)
    for g in s_opt.param_groups:
        assert g["weight_decay"] == 0.0
        assert g["momentum"] == 0.8 and g["nesterov"] is True
        assert g["lr"] == (mask_lr if mask_lr is not None else 0.1)

    # behaviour: zero loss gradient everywhere; decay shrinks the weights, the logits do not move
    weights = {id(p): p.detach().clone() for g in w_opt.param_groups for p in g["params"]}
    logits = {n: s.detach().clone() for n, s in masking.mask_logits(model).items()}
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        w_opt.step()
        s_opt.step()
        for g in w_opt.param_groups:
            for p in g["params"]:
                old = weights[id(p)]
                nz = old != 0
                if step == 0:  # decay moves every weight towards 0 (Adam may overshoot later)
                    assert torch.equal(torch.sign(p.detach()[nz] - old[nz]), -torch.sign(old[nz]))
                if weights_optimizer == "sgd":
                    assert torch.all(p.detach()[nz].abs() < old[nz].abs())
        for n, s in masking.mask_logits(model).items():
            assert torch.equal(s.detach(), logits[n]), n


def test_in_loop_logits_group_has_no_weight_decay():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    cs = ContinuousSparsification(model, opt, mask_optimizer="sgd", epochs_per_round=2, rounds=1, mask_momentum=0.7)
    assert len(opt.param_groups) == 2
    group = opt.param_groups[-1]
    assert {id(p) for p in group["params"]} == {id(p) for p in cs.logits()}
    assert group["weight_decay"] == 0.0 and group["momentum"] == 0.7 and group["nesterov"] is True
    assert opt.param_groups[0]["weight_decay"] == 0.05
    _set_logits(model, seed=12)
    logits = [s.detach().clone() for s in cs.logits()]
    w = model[0].parametrizations.weight.original
    w_old = w.detach().clone()
    for p in [*model.parameters()]:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a.detach(), b) for a, b in zip(cs.logits(), logits))
    assert torch.all(w.detach().abs() <= w_old.abs()) and not torch.equal(w.detach(), w_old)


# -- 6 / 7. hard mask: strict, and pruned weights are 0 at every step of a ticket ---------------------
def test_hard_mask_is_strict_and_finish_gives_exact_zeros():
    model = tiny_mlp()
    cs = ContinuousSparsification(model, mask_optimizer="sgd", epochs_per_round=1, rounds=1)
    logits = _set_logits(model, seed=13)
    with torch.no_grad():
        for s in cs.logits():
            s.view(-1)[::5] = 0.0
    logits = {n: s.detach().clone() for n, s in masking.mask_logits(model).items()}
    raw = {n: w.detach().clone() for n, w in _raw_weights(model).items()}
    mask = cs.mask()
    assert isinstance(mask, Mask) and list(mask) == list(logits)
    for n, s in logits.items():
        assert mask[n].dtype == torch.bool
        assert torch.equal(mask[n], s > 0)
        assert not torch.any(mask[n][s == 0])
    assert cs.density() == pytest.approx(sum(int((s > 0).sum()) for s in logits.values()) / sum(s.numel() for s in logits.values()))
    removed = cs.finish()
    assert removed == mask
    sd = model.state_dict()
    assert list(sd) == list(tiny_mlp().state_dict())
    for n, m in mask.items():
        assert torch.all(sd[n][~m] == 0)
        assert torch.allclose(sd[n][m], raw[n][m] * 2.0)  # kept weights act as w / sigmoid(0) = 2w


def test_finish_equals_the_trained_network_at_high_temperature():
    """finish() keeps the function the search trained: the soft-masked net as beta -> infinity."""
    model = tiny_mlp().eval()
    cs = ContinuousSparsification(model, mask_optimizer="sgd", epochs_per_round=1, rounds=1, s0=-0.05)
    with torch.no_grad():
        for s in cs.logits():
            s.copy_(torch.randn(s.shape, generator=torch.Generator().manual_seed(5)).sign() * 0.5)
    masking.set_temperature(model, 1e4)
    x = torch.randn(16, 20)
    with torch.no_grad():
        limit_out = model(x)
    cs.finish()
    with torch.no_grad():
        assert torch.allclose(model(x), limit_out, atol=1e-5)


def test_finish_without_rescale_keeps_raw_weights():
    model = tiny_mlp()
    cs = ContinuousSparsification(model, mask_optimizer="sgd", epochs_per_round=1, rounds=1, s0=-0.05)
    _set_logits(model, seed=3)
    raw = {n: w.detach().clone() for n, w in _raw_weights(model).items()}
    mask = cs.finish(rescale=False)
    for n, m in mask.items():
        assert torch.equal(model.state_dict()[n][m], raw[n][m])


class PrunedAreZero(Callback):
    def __init__(self, mask: Mask):
        self.mask = mask
        self.checked = 0

    def _check(self, trainer):
        params = masking.logical_named_parameters(trainer.model)
        for n, m in self.mask.items():
            assert torch.all(params[n].detach()[~m] == 0), (n, trainer.iteration)
            assert params[n].detach()[m].abs().sum() > 0
        self.checked += 1

    def on_fit_start(self, trainer):
        self._check(trainer)

    def on_step_end(self, trainer):
        self._check(trainer)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_ticket_training_keeps_pruned_weights_zero_at_every_step(tiny_data, optimizer):
    train, test = tiny_data
    model = tiny_mlp()
    g = torch.Generator().manual_seed(14)
    mask = Mask({n: torch.rand(p.shape, generator=g) < 0.4 for n, p in masking.prunable_weights(model).items()})
    masking.attach_hard_mask(model, mask)
    before_enforce, after_enforce = PrunedAreZero(mask), PrunedAreZero(mask)
    hp = TrainingHparams(training_steps="3ep", optimizer=optimizer, lr=0.05, momentum=0.9, nesterov=optimizer == "sgd",
                         weight_decay=1e-3)
    trainer = Trainer(model, train, hp, eval_loaders={"test": test}, start=5,
                      callbacks=[before_enforce, EnforceMaskCallback(), after_enforce], progress=False, log=_noop)
    trainer.fit()
    n_steps = 3 * len(train) - 5
    # checked after each optimizer step before the safety net re-zeroes anything, and after it
    assert before_enforce.checked == after_enforce.checked == n_steps + 1
    assert masking.current_mask(model) == mask
    masking.remove_masks(model)
    for n, m in mask.items():
        assert torch.all(model.state_dict()[n][~m] == 0)


def _mask_for(model, seed: int = 14, keep: float = 0.4) -> Mask:
    g = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(p.shape, generator=g) < keep for n, p in masking.prunable_weights(model).items()})


class CountEnforce(Callback):
    """Counts calls of masking.enforce_masks (the per-step re-zeroing pass) while training."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = masking.enforce_masks

        def counting(model):
            self.calls += 1
            original(model)

        monkeypatch.setattr(masking, "enforce_masks", counting)


def _stale_state(model, mask: Mask, optimizer: str, hp: TrainingHparams):
    """An optimizer with non-zero state at pruned positions, as after rewinding to a dense step k."""
    from lottery.engine import make_optimizer

    opt = make_optimizer(model.parameters(), hp) if optimizer != "adamw" else torch.optim.AdamW(
        model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # fills momentum / moments with random values everywhere
    opt.zero_grad(set_to_none=True)
    masking.attach_hard_mask(model, mask)  # re-zeroes the weights, not the optimizer's state
    return opt


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_gradient_mask_path_keeps_pruned_weights_zero_without_per_step_rezeroing(tiny_data, optimizer, monkeypatch):
    train, test = tiny_data
    model = tiny_mlp()
    mask = _mask_for(model)
    hp = TrainingHparams(training_steps="3ep", optimizer="adam" if optimizer == "adamw" else optimizer, lr=0.05,
                         momentum=0.9, nesterov=optimizer == "sgd", weight_decay=1e-3)
    opt = _stale_state(model, mask, optimizer, hp)
    counter = CountEnforce(monkeypatch)
    check = PrunedAreZero(mask)
    enforce = EnforceMaskCallback()
    trainer = Trainer(model, train, hp, optimizers=[opt], eval_loaders={"test": test},
                      callbacks=[enforce, check], progress=False, log=_noop)
    trainer.fit()
    assert check.checked == 3 * len(train) + 1  # every step, right after the optimizer step
    assert not enforce._per_step
    assert counter.calls == 1  # at the start only: no re-zeroing pass per step


def test_gradient_mask_path_trains_the_kept_weights_exactly_as_per_step_rezeroing(tiny_data):
    train, test = tiny_data
    finals = []
    for every_step in (True, None):
        model = tiny_mlp()
        mask = _mask_for(model)
        hp = TrainingHparams(training_steps="2ep", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
        opt = _stale_state(model, mask, "sgd", hp)
        torch.manual_seed(3)
        Trainer(model, train, hp, optimizers=[opt], callbacks=[EnforceMaskCallback(every_step=every_step)],
                progress=False, log=_noop).fit()
        finals.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


class _PruneMoreAt(Callback):
    """Replaces the mask by a sparser one at one iteration (as GMP's pruning events do)."""

    def __init__(self, iteration: int, mask: Mask):
        self.iteration, self.mask = iteration, mask

    def on_step_start(self, trainer):
        if trainer.iteration == self.iteration:
            masking.attach_hard_mask(trainer.model, self.mask)


def test_a_mask_changed_during_training_is_enforced_at_once(tiny_data):
    train, _ = tiny_data
    model = tiny_mlp()
    first = _mask_for(model, keep=0.8)
    second = Mask({n: m & _mask_for(model, seed=5, keep=0.5)[n] for n, m in first.items()})
    masking.attach_hard_mask(model, first)
    hp = TrainingHparams(training_steps="2ep", lr=0.05, momentum=0.9)

    class ZeroUnderCurrentMask(Callback):
        checked = 0

        def on_step_end(self, trainer):
            now = second if trainer.iteration > 4 else first
            params = masking.logical_named_parameters(trainer.model)
            for n, m in now.items():
                assert torch.all(params[n].detach()[~m] == 0), (n, trainer.iteration)
            ZeroUnderCurrentMask.checked += 1

    enforce = EnforceMaskCallback()
    trainer = Trainer(model, train, hp, callbacks=[_PruneMoreAt(4, second), enforce, ZeroUnderCurrentMask()],
                      progress=False, log=_noop)
    trainer.fit()
    assert ZeroUnderCurrentMask.checked == 2 * len(train)
    assert not enforce._per_step
    # the momentum at the newly pruned positions was cleared too, which is what keeps them at 0
    params = masking.logical_named_parameters(model)
    for n, m in second.items():
        buf = trainer.optimizers[0].state[params[n]]["momentum_buffer"]
        assert torch.all(buf[~m] == 0) and buf[m].abs().sum() > 0


class _NoisySGD(torch.optim.SGD):
    """An optimizer the callback does not know: it moves every weight, pruned or not."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)


def test_unknown_optimizers_get_per_step_rezeroing(tiny_data):
    train, _ = tiny_data
    model = tiny_mlp()
    mask = _mask_for(model)
    masking.attach_hard_mask(model, mask)
    hp = TrainingHparams(training_steps="1ep", lr=0.05)
    check = PrunedAreZero(mask)
    enforce = EnforceMaskCallback()
    Trainer(model, train, hp, optimizers=[_NoisySGD(model.parameters(), lr=0.05)], callbacks=[enforce, check],
            progress=False, log=_noop).fit()
    assert enforce._per_step
    assert check.checked == len(train) + 1


def test_pruned_weights_moved_behind_the_callbacks_back_are_caught_at_the_epoch_end(tiny_data):
    train, _ = tiny_data
    model = tiny_mlp()
    mask = _mask_for(model)
    masking.attach_hard_mask(model, mask)

    class Vandal(Callback):
        def on_step_end(self, trainer):
            if trainer.iteration == 2:
                with torch.no_grad():
                    for p in masking.prunable_weights(trainer.model).values():
                        p.add_(1.0)

    enforce = EnforceMaskCallback()
    hp = TrainingHparams(training_steps="2ep", lr=0.05)
    with pytest.warns(RuntimeWarning, match="pruned weights became non-zero"):
        Trainer(model, train, hp, callbacks=[Vandal(), enforce], progress=False, log=_noop).fit()
    assert enforce._per_step
    assert masking.pruned_weights_are_zero(model)
    assert masking.current_mask(model) == mask


# -- 8. the rewind snapshot ---------------------------------------------------------------------------
class StateAt(Callback):
    def __init__(self):
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def _keep(self, trainer):
        sd = masking.to_plain_state_dict(trainer.model.state_dict(), apply_masks=False)
        self.states[trainer.iteration] = {k: v.detach().clone() for k, v in sd.items()}

    def on_fit_start(self, trainer):
        self._keep(trainer)

    def on_step_end(self, trainer):
        self._keep(trainer)


@pytest.mark.parametrize("k", [0, 5, 8])
def test_snapshot_callback_takes_raw_weights_after_k_steps(tiny_data, k):
    train, _ = tiny_data
    hp = CSHparams(lam=1e-3, beta_final=10.0, mask_optimizer="sgd", temperature_schedule="epoch")
    model = tiny_mlp()
    masking.attach_soft_mask(model)
    taken = []
    spy = StateAt()
    trainer = Trainer(model, train, TrainingHparams(training_steps="2ep", lr=0.1, momentum=0.9),
                      optimizers=make_search_optimizers(model, TrainingHparams(lr=0.1, momentum=0.9), hp),
                      callbacks=[*search_round_callbacks(hp, 0), SnapshotCallback(k, taken.append), spy],
                      progress=False, log=_noop)
    trainer.fit()
    assert len(taken) == 1
    snap = taken[0]
    assert list(snap) == list(tiny_mlp().state_dict())  # plain keys: no logits
    for key, v in spy.states[k].items():
        assert torch.equal(snap[key], v), key  # the raw weights (not w * m) after exactly k steps
    assert not torch.equal(snap["0.weight"], spy.states[k + 1]["0.weight"])


# -- 9 / 10. the Python API on a user's own model ---------------------------------------------------
class Block(nn.Module):
    """A user's block: conv + BN + a Linear mixing the channels."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.mix = nn.Linear(c_out, c_out)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.mix(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class UserNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.blocks = nn.ModuleDict({"stem": Block(1, 6), "body": Block(6, 8)})
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        for block in self.blocks.values():
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def _user_data():
    x, y = blobs(n=192, dim=36, classes=3, seed=0)
    return TensorBatches(x.view(-1, 1, 6, 6), y, batch_size=32, seed=0)


def _run_readme_example():
    """What a README shows: the user's own model, optimizer and loop, plus three CS calls."""
    torch.manual_seed(0)
    model = UserNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    before_ids = {n: id(p) for n, p in masking.prunable_weights(model).items()}
    loader = _user_data()
    cs = ContinuousSparsification(model, optimizer, epochs_per_round=2, steps_per_epoch=len(loader), rounds=2,
                                  density=0.3)
    losses = []
    for epoch in range(cs.total_epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + cs.penalty(reuse_forward=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            cs.step()
            losses.append(loss.item())
        cs.epoch_end()
    mask = cs.mask()
    return model, optimizer, cs, mask, losses, before_ids


@pytest.fixture(scope="module")
def readme_run():
    torch.manual_seed(0)
    plain = UserNet()
    names = list(masking.prunable_weights(plain))
    model, optimizer, cs, mask, losses, before_ids = _run_readme_example()
    raw = {n: w.detach().clone() for n, w in _raw_weights(model).items()}
    after_ids = {n: id(p) for n, p in _raw_weights(model).items()}
    hard = masking.to_plain_state_dict(model.state_dict(), apply_masks=True)  # w * 1[s > 0], buffers
    return {"names": names, "model": model, "optimizer": optimizer, "cs": cs, "mask": mask, "losses": losses,
            "raw": raw, "hard_state": hard, "plain_keys": list(plain.state_dict()),
            "before_ids": before_ids, "after_ids": after_ids}


def test_readme_example_custom_nested_model(readme_run):
    model, optimizer, cs, mask, raw = (readme_run[k] for k in ("model", "optimizer", "cs", "mask", "raw"))
    assert readme_run["names"] == [
        "blocks.stem.conv.weight", "blocks.stem.mix.weight", "blocks.body.conv.weight", "blocks.body.mix.weight",
        "head.weight",
    ]
    assert isinstance(mask, Mask)
    assert list(mask) == readme_run["names"]
    assert 0 < mask.density() <= 1
    assert all(0 < d <= 1 for d in mask.layer_densities().values()), mask.layer_densities()
    assert mask.num_kept() == round(0.3 * mask.num_total())  # the density asked for
    assert all(math.isfinite(v) for v in readme_run["losses"])
    # the user's optimizer keeps only the user's parameters; the logits have their own Adam, no weight decay
    groups = optimizer.param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == 5e-4
    assert not {id(p) for p in groups[0]["params"]} & {id(p) for p in cs.logits()}
    assert isinstance(cs.logit_optimizer, torch.optim.Adam)
    assert {id(p) for g in cs.logit_optimizer.param_groups for p in g["params"]} == {id(p) for p in cs.logits()}
    assert all(g["weight_decay"] == 0.0 for g in cs.logit_optimizer.param_groups)
    # and still trains the user's own weight tensors (the soft mask did not replace them)
    assert readme_run["after_ids"] == readme_run["before_ids"]
    assert set(readme_run["before_ids"].values()) <= {id(p) for p in groups[0]["params"]}

    removed = cs.finish()
    assert removed == mask
    sd = model.state_dict()
    assert list(sd) == readme_run["plain_keys"]  # plain keys, no parametrisation, no logits
    assert not any("mask" in k or "parametrizations" in k for k in sd)
    for n, m in mask.items():
        assert torch.all(sd[n][~m] == 0), n
        # kept weights carry the beta -> infinity factor of the scaled soft mask, 1 / sigmoid(s0)
        assert torch.allclose(sd[n][m], raw[n][m] / torch.sigmoid(torch.tensor(0.02)), rtol=1e-6), n
    # a fresh UserNet loads it strictly
    UserNet().load_state_dict(sd)


def test_readme_mask_save_load_roundtrip(readme_run, tmp_path):
    mask = readme_run["mask"]
    report = mask.save(tmp_path / "mask.safetensors")
    loaded = Mask.load(tmp_path / "mask.safetensors")
    assert loaded == mask and list(loaded) == list(mask)
    import json

    assert json.loads(report.read_text())["density"] == pytest.approx(mask.density())


def test_readme_mask_torch_prune_roundtrip(readme_run):
    mask, raw = readme_run["mask"], readme_run["raw"]
    finished = UserNet()
    finished.load_state_dict(readme_run["hard_state"])
    pruned = UserNet()
    pruned.load_state_dict({**finished.state_dict(), **raw})  # raw (unmasked) weights
    mask.to_torch_prune(pruned)
    assert Mask.from_torch_prune(pruned) == mask
    x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(15))
    finished.eval()
    pruned.eval()
    torch.testing.assert_close(pruned(x), finished(x), rtol=0, atol=0)
    assert masking.remove_masks(pruned) == mask
    for k, v in finished.state_dict().items():
        assert torch.equal(pruned.state_dict()[k], v), k
