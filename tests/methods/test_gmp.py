"""Gradual magnitude pruning: the cubic schedule as a pure function, its translation from hparams to
iterations, and the pruning callback inside a real Trainer (no pruning before t0, exactly the target at
t0 + n*dt, pruned weights exactly 0 and never back, optimizer state of pruned weights zeroed)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import tiny_mlp
from lottery import masking
from lottery.engine import Callback, Trainer
from lottery.errors import ConfigError
from lottery.hparams import TrainingHparams
from lottery.masks import Mask
from lottery.methods.gmp import (
    GMPHparams, GMPPruningCallback, GMPSchedule, attach_gmp_masks, gmp_density, gmp_schedule, prune_to_density,
)
from lottery.methods.imp import kept_count

NAMES = ["0.weight", "3.weight"]  # tiny_mlp: 32x20 and 4x32 -> 768 prunable weights
TOTAL = 32 * 20 + 4 * 32


# -- the schedule ----------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(t0=st.integers(0, 50), n=st.integers(1, 20), dt=st.integers(1, 30),
       final=st.floats(0.001, 1.0), initial=st.floats(0.0, 1.0))
def test_schedule_endpoints_and_monotone(t0, n, dt, final, initial):
    initial = final + (1 - final) * initial  # final <= initial <= 1
    end = t0 + n * dt
    for t in range(0, t0):
        assert gmp_density(t, t0, n, dt, final, initial) == initial  # nothing before t0
    assert gmp_density(t0, t0, n, dt, final, initial) == pytest.approx(initial)
    assert gmp_density(end, t0, n, dt, final, initial) == final  # exactly the target at t0 + n*dt
    assert gmp_density(end + 7, t0, n, dt, final, initial) == final
    values = [gmp_density(t, t0, n, dt, final, initial) for t in range(t0, end + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_schedule_is_zhu_gupta_cubic_in_sparsity():
    t0, n, dt, d_f = 10, 8, 5, 0.2
    for t in range(t0, t0 + n * dt + 1):
        s_i, s_f = 0.0, 1 - d_f
        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert gmp_density(t, t0, n, dt, d_f) == pytest.approx(1 - s_t, abs=1e-12)
    assert gmp_density(t0 + n * dt // 2, t0, n, dt, d_f) == pytest.approx(d_f + (1 - d_f) * 0.125)


def test_schedule_steps_and_zero_n():
    s = GMPSchedule(t0=4, n=3, dt=5, final_density=0.1)
    assert s.steps() == [4, 9, 14, 19] and s.end == 19
    assert [t for t in range(30) if s.is_pruning_step(t)] == s.steps()
    one_shot = GMPSchedule(t0=4, n=0, dt=5, final_density=0.1)
    assert one_shot.steps() == [4] and one_shot.density(3) == 1.0 and one_shot.density(4) == 0.1


def test_schedule_from_hparams_defaults_to_three_quarters():
    training = TrainingHparams(training_steps="10ep")
    s = gmp_schedule(GMPHparams(density=0.05), training, iterations_per_epoch=40)  # 400 iterations
    assert (s.t0, s.dt, s.final_density) == (80, 100, 0.05)  # '2ep', '100it'
    assert s.n == (300 - 80) // 100 and s.end == 280  # rounded down to a multiple of dt before 75%
    s = gmp_schedule(GMPHparams(prune_start="10it", prune_end="4ep", prune_every="19it"), training, 40)
    assert (s.t0, s.n, s.dt, s.end) == (10, 7, 19, 143)  # (160 - 10) // 19 = 7
    s = gmp_schedule(GMPHparams(prune_start="1ep", prune_end="1ep"), training, 40)
    assert s.n == 0 and s.steps() == [40]
    with pytest.raises(ConfigError, match="before prune_start"):
        gmp_schedule(GMPHparams(prune_start="5ep", prune_end="2ep"), training, 40)
    with pytest.raises(ConfigError, match="after the end of training"):
        gmp_schedule(GMPHparams(prune_start="1ep", prune_end="11ep"), training, 40)
    with pytest.raises(ConfigError, match="after the end of training"):
        gmp_schedule(GMPHparams(prune_start="11ep"), training, 40)


@pytest.mark.parametrize("bad", [dict(density=0.0), dict(density=1.5), dict(density=0.5, initial_density=0.4),
                                 dict(prune_every="0it"), dict(prune_start="x"), dict(scope="rows"),
                                 dict(prune_end="2 epochs")])
def test_hparams_validation(bad):
    with pytest.raises(ConfigError):
        GMPHparams(**bad)


def test_prune_to_density_is_idempotent_and_keeps_pruned_pruned():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(10, 10, generator=g), "b": torch.randn(5, 4, generator=g)}
    ones = Mask.ones(weights)
    half = prune_to_density(weights, ones, 0.5)
    assert half.num_kept() == 60
    assert prune_to_density(weights, half, 0.5) is half
    assert prune_to_density(weights, half, 0.7) is half  # never grows back
    quarter = prune_to_density(weights, half, 0.25)
    assert quarter.num_kept() == 30 and all(not (quarter[n] & ~half[n]).any() for n in half)
    layer = prune_to_density(weights, ones, 0.25, "layerwise")
    assert int(layer["a"].sum()) == 25 and int(layer["b"].sum()) == 5


# -- the callback in a real Trainer ---------------------------------------------------------------------------
class Recorder(Callback):
    """The mask and the pruned weights after every step (after the GMP and enforce callbacks)."""

    def __init__(self):
        self.masks: dict[int, Mask] = {}

    def on_fit_start(self, trainer):
        self.masks[trainer.iteration] = masking.current_mask(trainer.model)

    def on_step_end(self, trainer):
        mask = masking.current_mask(trainer.model)
        params = masking.logical_named_parameters(trainer.model)
        for n, m in mask.items():
            assert torch.all(params[n].detach()[~m] == 0), (trainer.iteration, n)
        self.masks[trainer.iteration] = mask


def _run(tiny_data, hp: GMPHparams, steps: str = "4ep", momentum: float = 0.9, enforce: bool = False,
         optimizer: str = "sgd"):
    train, test = tiny_data  # 8 iterations per epoch
    model = tiny_mlp()
    attach_gmp_masks(model, NAMES)
    training = TrainingHparams(training_steps=steps, lr=0.05, momentum=momentum, optimizer=optimizer)
    schedule = gmp_schedule(hp, training, len(train))
    cb = GMPPruningCallback(schedule, NAMES, hp.scope)
    rec = Recorder()
    callbacks = [cb, rec]
    if enforce:
        from lottery.methods.cs import EnforceMaskCallback

        callbacks.insert(1, EnforceMaskCallback())
    trainer = Trainer(model, train, training, eval_loaders={"test": test}, callbacks=callbacks, progress=False,
                      log=lambda m: None)
    rows = trainer.fit()
    return model, schedule, cb, rec, rows, trainer


def test_never_prunes_before_t0_and_hits_target_exactly(tiny_data):
    hp = GMPHparams(density=0.1, prune_start="5it", prune_end="3ep", prune_every="3it")
    model, schedule, cb, rec, rows, _ = _run(tiny_data, hp)
    assert (schedule.t0, schedule.n, schedule.dt, schedule.end) == (5, 6, 3, 23)
    for t, mask in rec.masks.items():
        if t <= schedule.t0:  # before t0, and at t0 where the schedule still asks for density 1
            assert mask.num_kept() == TOTAL, t
    target = kept_count(0.1, TOTAL)
    for t, mask in rec.masks.items():
        if t >= schedule.end:
            assert mask.num_kept() == target, t
    assert rec.masks[schedule.end - 1].num_kept() > target
    # the mask changes only at scheduled steps, shrinks monotonically, and follows the cubic curve
    ts = sorted(rec.masks)
    for a, b in zip(ts, ts[1:]):
        ma, mb = rec.masks[a], rec.masks[b]
        assert all(not (mb[n] & ~ma[n]).any() for n in ma)
        if mb != ma:
            assert schedule.is_pruning_step(b)
        if schedule.is_pruning_step(b):
            assert mb.num_kept() == kept_count(schedule.density(b), TOTAL)
    assert [e[0] for e in cb.events] == schedule.steps()
    assert rows[-1]["density"] == target / TOTAL and rows[-1]["target_density"] == 0.1


def test_layerwise_scope_hits_each_layer(tiny_data):
    hp = GMPHparams(density=0.25, prune_start="0it", prune_end="2ep", prune_every="4it", scope="layerwise")
    model, schedule, *_ = _run(tiny_data, hp, steps="3ep")
    mask = masking.current_mask(model)
    assert int(mask["0.weight"].sum()) == kept_count(0.25, 640) and int(mask["3.weight"].sum()) == kept_count(0.25, 128)


def test_pruned_weights_get_zero_momentum_and_stay_zero_without_enforcing(tiny_data):
    """Momentum buffers of newly pruned entries are zeroed: the gradient hook alone keeps them at 0."""
    hp = GMPHparams(density=0.3, prune_start="3it", prune_end="2ep", prune_every="2it")
    model, schedule, cb, rec, rows, trainer = _run(tiny_data, hp, steps="3ep", momentum=0.9, enforce=False)
    mask = masking.current_mask(model)
    params = masking.logical_named_parameters(model)
    opt = trainer.optimizers[0]
    for n in NAMES:
        buf = opt.state[params[n]]["momentum_buffer"]
        assert torch.all(buf[~mask[n]] == 0)
        assert torch.all(params[n].detach()[~mask[n]] == 0)


def test_adam_moments_zeroed(tiny_data):
    hp = GMPHparams(density=0.3, prune_start="3it", prune_end="2ep", prune_every="2it")
    model, *_, trainer = _run(tiny_data, hp, steps="3ep", optimizer="adam", momentum=0.0)
    mask = masking.current_mask(model)
    params = masking.logical_named_parameters(model)
    state = trainer.optimizers[0].state[params["0.weight"]]
    assert torch.all(state["exp_avg"][~mask["0.weight"]] == 0) and torch.all(state["exp_avg_sq"][~mask["0.weight"]] == 0)


def test_start_at_zero_with_initial_density_prunes_before_the_first_step(tiny_data):
    hp = GMPHparams(density=0.2, initial_density=0.6, prune_start="0it", prune_end="1ep", prune_every="4it")
    _, schedule, cb, rec, *_ = _run(tiny_data, hp, steps="2ep")
    assert rec.masks[0].num_kept() == kept_count(0.6, TOTAL)
    assert cb.events[0][0] == 0


def test_missing_masks_are_reported(tiny_data):
    train, _ = tiny_data
    model = tiny_mlp()
    cb = GMPPruningCallback(GMPSchedule(0, 1, 2, 0.5), NAMES)
    trainer = Trainer(model, train, TrainingHparams(training_steps="1ep"), callbacks=[cb], progress=False,
                      log=lambda m: None)
    with pytest.raises(ConfigError, match="attach_gmp_masks"):
        trainer.fit()
