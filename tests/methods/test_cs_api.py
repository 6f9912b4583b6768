"""The in-loop API's traps (issue 18): what ``ContinuousSparsification`` does when wrapped twice, finished
twice, given nothing to mask, asked for a density before training, and what it leaves in the user's
optimizer and state dicts; and the helpers of a user's own loop (rewind point, ticket, round start)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import blobs, tiny_mlp
from lottery import masking
from lottery.errors import ConfigError
from lottery.masks import Mask
from lottery.methods.cs import (
    ContinuousSparsification,
    RewindPoint,
    reset_optimizer_state,
    restart_lr_schedule,
    save_rewind_point,
    ticket_from,
)


def _wrap(model, optimizer=None, **kw):
    kw.setdefault("epochs_per_round", 2)
    kw.setdefault("rounds", 1)
    if kw.get("mask_optimizer") != "sgd":
        kw.setdefault("steps_per_epoch", 4)
    return ContinuousSparsification(model, optimizer, **kw)


def _batches(n_batches: int = 4, seed: int = 0):
    x, y = blobs(n=16 * n_batches, seed=seed)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(y), 16)]


def _train(model, optimizer, cs, epochs: int, on_step=None):
    batches = _batches()
    for _ in range(epochs):
        for x, y in batches:
            loss = F.cross_entropy(model(x), y) + (cs.penalty() if cs is not None else 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if cs is not None:
                cs.step()
            if on_step is not None:
                on_step()
        if cs is not None:
            cs.epoch_end()


def _search(model, optimizer, **kw):
    """A short search that ends with a non-trivial mask."""
    cs = _wrap(model, optimizer, density=0.4, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a short search need not be binary
        _train(model, optimizer, cs, cs.total_epochs)
    return cs


# -- wrapping twice -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_optimizer", ["adam", "sgd"])
def test_wrapping_a_wrapped_model_again_is_refused(mask_optimizer):
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cs = _wrap(model, opt, mask_optimizer=mask_optimizer, s0=0.1)
    with torch.no_grad():
        cs.logits()[0].fill_(-3.0)
    groups = len(opt.param_groups)
    with pytest.raises(ConfigError, match="already wrapped.*finish()"):
        _wrap(model, opt, mask_optimizer=mask_optimizer, s0=0.1)
    # nothing changed: the first wrapper's logits are still the model's, no group was added
    assert len(opt.param_groups) == groups
    assert torch.all(cs.logits()[0] == -3.0)
    cs.finish()
    _wrap(model, opt, mask_optimizer=mask_optimizer, s0=0.1)  # a finished model may be wrapped again


def test_wrapping_a_hard_masked_model_is_refused():
    model = tiny_mlp()
    masking.attach_hard_mask(model, Mask.ones(model, list(masking.prunable_weights(model))))
    with pytest.raises(ConfigError, match="hard mask"):
        _wrap(model)


# -- finish twice, and calls after finish ------------------------------------------------------------
def test_finish_twice_returns_the_same_mask_and_rescales_once():
    model = tiny_mlp()
    cs = _search(model, torch.optim.SGD(model.parameters(), lr=0.1))
    first = cs.finish()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert 0 < first.density() < 1
    second = cs.finish()
    assert second == first
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # not multiplied by 1 / sigmoid(s0) a second time
    with pytest.raises(ConfigError, match="already finished"):
        cs.finish(rescale=False)


@pytest.mark.parametrize("call", ["step", "penalty", "epoch_end", "state_dict", "logits"])
def test_search_calls_after_finish_are_refused(call):
    model = tiny_mlp()
    cs = _search(model, torch.optim.SGD(model.parameters(), lr=0.1))
    cs.finish()
    with pytest.raises(ConfigError, match=rf"cs\.{call}\(\) after cs\.finish\(\)"):
        getattr(cs, call)()


def test_mask_and_density_after_finish_are_the_final_mask():
    model = tiny_mlp()
    cs = _search(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = cs.mask()
    final = cs.finish()
    assert final == before and cs.mask() == final
    assert cs.density() == pytest.approx(final.density()) and 0 < cs.density() < 1


def test_soft_masks_removed_behind_the_wrapper_are_an_error_not_an_empty_mask():
    model = tiny_mlp()
    cs = _wrap(model, s0=0.1)
    masking.remove_soft_mask(model)
    with pytest.raises(ConfigError, match="removed outside this wrapper"):
        cs.mask()


# -- nothing to mask ---------------------------------------------------------------------------------
class _NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(20)
        self.scale = nn.Parameter(torch.ones(20))

    def forward(self, x):
        return self.norm(x) * self.scale


@pytest.mark.parametrize("mask_optimizer", ["adam", "sgd"])
def test_a_model_with_nothing_to_mask_is_refused_at_construction(mask_optimizer):
    with pytest.raises(ConfigError, match="nothing to mask.*no Conv"):
        _wrap(_NoLayers(), mask_optimizer=mask_optimizer)
    with pytest.raises(ConfigError, match="nothing to mask.*ignore="):
        _wrap(tiny_mlp(), mask_optimizer=mask_optimizer, ignore=["0", "3"])


# -- density before any training ---------------------------------------------------------------------
@pytest.mark.parametrize("kw, expected", [({"s0": 0.5}, 1.0), ({"density": 0.3}, 1.0), ({"s0": 0.0}, 0.0),
                                          ({"s0": -0.1}, 0.0), ({}, 0.0)])
def test_density_before_training_is_what_the_initial_logits_say(kw, expected):
    cs = _wrap(tiny_mlp(), **kw)
    assert cs.density() == expected
    assert cs.mask().num_total() == 20 * 32 + 32 * 4


def test_finishing_a_mask_that_keeps_nothing_is_refused_and_changes_nothing():
    model = tiny_mlp()
    cs = _wrap(model)  # s0 = 0: before training the hard mask keeps nothing
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="keeps none of the weights"):
        cs.finish()
    with pytest.raises(ConfigError, match="keeps none of the weights"):
        cs.plain_state_dict()
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    assert masking.mask_logits(model)  # still wrapped, the search can go on


# -- the logits' parameter group in the user's optimizer ---------------------------------------------
def test_finish_removes_the_logits_group_from_the_users_optimizer():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    cs = _search(model, opt, mask_optimizer="sgd", steps_per_epoch=4)
    logits = {id(p) for p in cs.logits()}
    assert len(opt.param_groups) == 2 and any(id(p) in logits for p in opt.state)
    cs.finish()
    assert len(opt.param_groups) == 1
    params = {id(p) for p in model.parameters()}
    assert {id(p) for p in opt.param_groups[0]["params"]} == params
    assert {id(p) for p in opt.state} <= params  # the logits' momentum went with them
    # the optimizer's state now fits a fresh optimizer over a fresh plain model
    fresh = tiny_mlp()
    twin = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    twin.load_state_dict(opt.state_dict())


def test_a_scheduler_built_before_an_sgd_wrap_is_warned_about():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(opt, 5)
    with pytest.warns(RuntimeWarning, match="build the scheduler after"):
        _wrap(model, opt, mask_optimizer="sgd")


# -- state dicts of a wrapped model ------------------------------------------------------------------
def test_wrapped_state_dict_has_plain_keys_plus_logits():
    model = tiny_mlp()
    _wrap(model, s0=0.1)
    keys = list(model.state_dict())
    plain = list(tiny_mlp().state_dict())
    assert [k for k in keys if not k.endswith("_mask_logits")] == plain
    assert [k for k in keys if k.endswith("_mask_logits")] == ["0.weight_mask_logits", "3.weight_mask_logits"]
    raw = masking.to_plain_state_dict(model.state_dict(), apply_masks=False)
    tiny_mlp(seed=1).load_state_dict(raw)  # strict


def test_plain_state_dict_loads_into_a_fresh_model_and_is_what_finish_leaves():
    model = tiny_mlp()
    cs = _search(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model.eval()
    x = blobs(n=8)[0]
    with torch.no_grad(), masking.hardened_soft_masks(model):
        limit = model(x)  # the trained network as beta -> infinity
    state = cs.plain_state_dict()
    fresh = tiny_mlp(seed=3).eval()
    fresh.load_state_dict(state)  # strict: plain keys only
    with torch.no_grad():
        assert torch.allclose(fresh(x), limit, atol=1e-5)
    assert masking.mask_logits(model)  # the model is still wrapped
    cs.finish()
    finished = model.state_dict()
    assert list(finished) == list(state)
    assert all(torch.equal(finished[k], state[k]) for k in state)
    again = cs.plain_state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)


# -- helpers: rewind point and ticket ----------------------------------------------------------------
def test_rewind_point_is_a_copy_with_plain_keys(tmp_path):
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cs = _wrap(model, opt, density=0.4)
    rewind = save_rewind_point(model, iteration=0)
    before = {k: v.clone() for k, v in rewind.state.items()}
    _train(model, opt, cs, 1)
    assert list(rewind.state) == list(tiny_mlp().state_dict())
    assert all(torch.equal(rewind.state[k], before[k]) for k in before)  # training did not change it
    raw = masking.to_plain_state_dict(model.state_dict(), apply_masks=False)
    assert not torch.equal(raw["0.weight"], rewind.state["0.weight"])
    rewind.save(tmp_path / "rewind.safetensors")
    loaded = RewindPoint.load(tmp_path / "rewind.safetensors")
    assert loaded.iteration == 0 and all(torch.equal(loaded.state[k], before[k]) for k in before)
    tiny_mlp(seed=2).load_state_dict(loaded.state)


def test_ticket_from_rewind_point_retrains_with_pruned_weights_held_at_zero():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    k = 3
    state = {"it": 0, "rewind": None}

    def on_step():
        state["it"] += 1
        if state["it"] == k:
            state["rewind"] = save_rewind_point(model, iteration=k)

    cs = _wrap(model, opt, density=0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _train(model, opt, cs, cs.total_epochs, on_step)
    rewind = state["rewind"]
    mask = cs.finish()
    assert any(opt.state[p].get("momentum_buffer") is not None for p in model.parameters())
    assert ticket_from(model, rewind, mask, opt) is model
    assert not opt.state  # momentum dropped: the ticket trains with a fresh optimizer state
    params = masking.logical_named_parameters(model)
    for n, m in mask.items():
        assert torch.equal(params[n].detach()[m], rewind.state[n][m])  # kept: the rewind weights
        assert torch.all(params[n].detach()[~m] == 0)
    start = {n: params[n].detach().clone() for n in mask}
    _train(model, opt, None, 2)
    assert masking.current_mask(model) == mask
    for n, m in mask.items():
        assert torch.all(params[n].detach()[~m] == 0), n  # held at 0 through momentum and weight decay
        assert not torch.equal(params[n].detach()[m], start[n][m])  # and the kept ones trained


def test_a_ticket_without_the_optimizer_reset_would_move_pruned_weights():
    """Why ticket_from resets the optimizer: left-over momentum moves weights whose gradient is masked."""
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, None, 1)
    mask = Mask({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) > 0.5
                 for n, p in masking.prunable_weights(model).items()})
    masking.attach_hard_mask(model, mask)  # by hand, momentum kept
    _train(model, opt, None, 1)
    assert not masking.pruned_weights_are_zero(model)


def test_ticket_from_refuses_a_wrapped_model_an_empty_mask_and_a_foreign_rewind_point():
    model = tiny_mlp()
    rewind = save_rewind_point(model)
    cs = _wrap(model, s0=0.1)
    mask = cs.mask()
    with pytest.raises(ConfigError, match="still carries CS soft masks.*finish"):
        ticket_from(model, rewind, mask)
    cs.finish()
    with pytest.raises(ConfigError, match="keeps none of the weights"):
        ticket_from(model, rewind, Mask({n: torch.zeros_like(m) for n, m in mask.items()}))
    other = save_rewind_point(tiny_mlp(classes=5))
    with pytest.raises(ConfigError, match="does not fit"):
        ticket_from(model, other, mask)
    del rewind.state["0.bias"]
    with pytest.raises(ConfigError, match="missing keys 0.bias"):
        ticket_from(model, rewind, mask)


# -- helpers: the round start ------------------------------------------------------------------------
def test_epoch_end_says_when_a_round_starts_and_calls_on_round_start():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    cs = _wrap(model, opt, rounds=3, s0=0.1, on_round_start=lambda r: calls.append((r, cs.epoch)))
    flags = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(cs.total_epochs):
            flags.append(cs.epoch_end()["new_round"])
    assert flags == [False, True, False, True, False, False]
    assert calls == [(1, 2), (2, 4)]  # after the logits reset of rounds 2 and 3, not after the last round


def test_round_start_helpers_restart_the_lr_schedule_and_momentum():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def new_round(r):
        reset_optimizer_state(opt)
        restart_lr_schedule(scheduler)
        seen["state_at_start"].append(len(opt.state))

    seen = {"lr": [], "state_at_start": []}
    cs = _wrap(model, opt, rounds=2, epochs_per_round=3, density=0.4, on_round_start=new_round)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 2], gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(cs.total_epochs):
            seen["lr"].append(opt.param_groups[0]["lr"])
            _train(model, opt, None, 1, on_step=cs.step)
            scheduler.step()
            cs.epoch_end()
    assert seen["lr"] == pytest.approx([0.1, 0.05, 0.025] * 2)  # each round runs the schedule from its start
    assert seen["state_at_start"] == [0]


def test_reset_optimizer_state_makes_the_next_step_a_fresh_optimizers():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    opt = torch.optim.Adam(a.parameters(), lr=0.01)
    for _ in range(3):
        a(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    b.load_state_dict(a.state_dict())
    fresh = torch.optim.Adam(b.parameters(), lr=0.01)
    assert reset_optimizer_state(opt) == 2
    x = torch.randn(5, 4)
    for model, o in ((a, opt), (b, fresh)):
        model(x).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("make, per", [
    (lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 4], 0.1), 6),
    (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 5), 6),
    (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9 ** e), 6),
    (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 1.0, total_steps=8), 8),
])
def test_restart_lr_schedule_repeats_the_same_learning_rates(make, per):
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.3, momentum=0.9)
    scheduler = make(opt)
    runs = []
    for _ in range(2):
        lrs = []
        for _ in range(per):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        runs.append(lrs)
        restart_lr_schedule(scheduler)
    assert runs[0] == pytest.approx(runs[1])
    assert len(set(runs[0])) > 1


def test_restart_lr_schedule_refuses_what_it_cannot_rewind():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seq = torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.ConstantLR(opt), torch.optim.lr_scheduler.StepLR(opt, 2)], milestones=[2])
    with pytest.raises(ConfigError, match="SequentialLR"):
        restart_lr_schedule(seq)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 2)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ConfigError, match="2 parameter groups"):
        restart_lr_schedule(scheduler)


def test_reset_optimizer_state_refuses_what_is_not_an_optimizer():
    with pytest.raises(ConfigError, match="takes a torch.optim.Optimizer, got NoneType"):
        reset_optimizer_state(None)
