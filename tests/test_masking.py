"""Tests of lottery.masking: prunable weights, hard masks, CS soft masks, removal and state_dicts."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from lottery import masking as M
from lottery.masking import _common as M_common
from lottery.masking import soft as M_soft
from lottery.errors import CheckpointError, ConfigError
from lottery.masks import Mask

# ------------------------------------------------------------------ a user model with nested custom modules


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv1d(4, 4, 3, padding=1)
        self.proj = nn.Linear(4, 6)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv2(x)))  # B, 4, H, W
        h = torch.tanh(self.conv1(h.flatten(2)))  # B, 4, H*W
        return self.proj(h.mean(-1))  # B, 6


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 6)
        self.stages = nn.ModuleDict({"block": Block(), "head": nn.Sequential(nn.Tanh(), nn.Linear(6, 3))})

    def forward(self, x):
        idx = torch.arange(x.shape[0]) % 5
        return self.stages["head"](self.stages["block"](x) + self.embed(idx))


PRUNABLE = [
    "stages.block.conv2.weight",
    "stages.block.conv1.weight",
    "stages.block.proj.weight",
    "stages.head.1.weight",
]


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(seed: int = 1, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def random_mask(model: nn.Module, density: float = 0.5, seed: int = 7) -> Mask:
    g = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(p.shape, generator=g) < density for n, p in M.prunable_weights(model).items()})


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in M.prunable_weights(model).items()}


def assert_plain(model: nn.Module, reference_keys: list[str]) -> None:
    """No reparametrisation, hooks, or extra buffers/parameters are left."""
    assert list(model.state_dict()) == reference_keys
    for module in model.modules():
        assert not M.has_hard_mask(module) and not M.has_soft_mask(module)
        assert not hasattr(module, "parametrizations")
        assert "weight_mask" not in module._buffers and "weight_orig" not in module._parameters
        assert not module._forward_pre_hooks and not module._state_dict_hooks
        assert not module._load_state_dict_pre_hooks and not module._load_state_dict_post_hooks
        assert not any(k.startswith("_lottery") for k in module.__dict__)
    for p in model.parameters():
        assert not p._backward_hooks and not getattr(p, "_post_accumulate_grad_hooks", None)


# ------------------------------------------------------------------ prunable weights


def test_prunable_discovery_by_type_in_module_order():
    net = make_net()
    pw = M.prunable_weights(net)
    assert list(pw) == PRUNABLE  # Embedding and BatchNorm excluded, biases never included
    assert pw["stages.block.conv1.weight"] is net.stages["block"].conv1.weight
    assert all(isinstance(p, nn.Parameter) for p in pw.values())


def test_ignore_by_name_glob_module_and_prefix():
    net = make_net()
    assert list(M.prunable_weights(net, ignore=["stages.head.1.weight"])) == PRUNABLE[:3]
    assert list(M.prunable_weights(net, ignore=["stages.head.1"])) == PRUNABLE[:3]  # module name
    assert list(M.prunable_weights(net, ignore="stages.head.1")) == PRUNABLE[:3]  # a single string
    assert list(M.prunable_weights(net, ignore=["*.conv*"])) == PRUNABLE[2:]  # glob
    assert list(M.prunable_weights(net, ignore=["stages.block"])) == PRUNABLE[3:]  # module prefix
    assert list(M.prunable_weights(net, ignore=["stages.block.conv?", "*.proj"])) == PRUNABLE[3:]


@pytest.mark.parametrize("pattern", ["stages.hed.1", "stages.block.bn", "fc3", "stages.bl"])
def test_ignore_typo_raises_listing_prunable_names(pattern):
    with pytest.raises(ConfigError) as err:
        M.prunable_weights(make_net(), ignore=["stages.head.1", pattern])
    msg = str(err.value)
    assert pattern in msg and all(n in msg for n in PRUNABLE)


def test_shared_weight_listed_once():
    lin = nn.Linear(3, 3)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    assert list(M.prunable_weights(net)) == ["0.weight"]


# ------------------------------------------------------------------ hard masks


def test_attach_hard_mask_zeroes_and_adds_buffers():
    net = make_net()
    keys = list(net.state_dict())
    mask = random_mask(net)
    assert M.attach_hard_mask(net, mask) is net
    for name, p in M.prunable_weights(net).items():
        assert bool((p[~mask[name]] == 0).all())
        assert bool((p[mask[name]] != 0).all())
        assert isinstance(p, nn.Parameter)
    buf = net.stages["block"].conv2.weight_mask
    assert buf.dtype == torch.bool and torch.equal(buf, mask["stages.block.conv2.weight"])
    sd_keys = list(net.state_dict())
    assert set(sd_keys) == set(keys) | {n + "_mask" for n in PRUNABLE}
    assert [k for k in sd_keys if not k.endswith("weight_mask")] == keys  # original keys, original order
    assert M.current_mask(net) == mask


def _train(model, opt, steps=6, enforce=False):
    for i in range(steps):
        x, y = batch(seed=100 + i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if enforce:
            M.enforce_masks(model)


@pytest.mark.parametrize(
    "make_opt, all_change",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4), True),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4), True),
        (lambda ps: torch.optim.Adam(ps, lr=1e-2), False),
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), True),
    ],
    ids=["sgd-momentum-wd", "nesterov", "adam", "adamw"],
)
def test_hard_mask_survives_optimizers_without_enforce(make_opt, all_change):
    net = make_net()
    mask = random_mask(net, density=0.3)
    M.attach_hard_mask(net, mask)
    before = weights(net)
    _train(net, make_opt(net.parameters()))  # no enforce_masks: the gradient hook alone must suffice
    for name, p in M.prunable_weights(net).items():
        kept = mask[name]
        assert bool((p.detach()[~kept] == 0.0).all()), name
        changed = p.detach()[kept] != before[name][kept]
        assert bool(changed.any()), name
        # every kept weight that gets a gradient moves (a kept weight can be cut off from the loss by
        # pruning around it); with weight decay every kept weight moves
        assert bool(changed[p.grad[kept] != 0].all()), name
        if all_change:
            assert bool(changed.all()), name


def test_gradients_of_pruned_weights_are_zero():
    net = make_net()
    mask = random_mask(net)
    M.attach_hard_mask(net, mask)
    x, y = batch()
    F.cross_entropy(net(x), y).backward()
    for name, p in M.prunable_weights(net).items():
        assert bool((p.grad[~mask[name]] == 0).all()) and bool((p.grad[mask[name]] != 0).any())


def test_attach_again_replaces_mask_without_stacking_hooks():
    net = make_net()
    m1, m2 = random_mask(net, seed=1), random_mask(net, seed=2)
    M.attach_hard_mask(net, m1)
    M.attach_hard_mask(net, m2)
    assert M.current_mask(net) == m2
    for p in M.prunable_weights(net).values():
        assert len(p._post_accumulate_grad_hooks) == 1
    for name, p in M.prunable_weights(net).items():  # pruned by either mask: zero (a pruned weight is lost)
        assert bool((p[~(m1[name] & m2[name])] == 0).all())
    x, y = batch()
    F.cross_entropy(net(x), y).backward()
    for name, p in M.prunable_weights(net).items():
        assert bool((p.grad[~m2[name]] == 0).all())


def test_hard_mask_version_sees_every_mask_change():
    net = make_net()
    names = list(M.prunable_weights(net))
    seen = set()
    for i in range(20):  # remove + attach: the new buffer often reuses the freed one's id
        g = torch.Generator().manual_seed(i)
        M.remove_hard_mask(net)
        M.attach_hard_mask(net, Mask({n: torch.rand(M.prunable_weights(net)[n].shape, generator=g) < 0.5 for n in names}))
        v = M.hard_mask_version(net)
        assert v not in seen, i
        seen.add(v)
    v = M.hard_mask_version(net)
    net.load_state_dict(net.state_dict())
    assert M.hard_mask_version(net) != v  # a load may bring another mask
    v = M.hard_mask_version(net)
    w = M.prunable_weights(net)[names[0]]
    w.requires_grad_(False)
    M.enforce_masks(net)  # frozen: no gradient hook
    v_frozen = M.hard_mask_version(net)
    assert v_frozen != v
    w.requires_grad_(True)  # unfrozen: the gradient hook is missing until enforce_masks
    assert M.hard_mask_version(net) != v_frozen


def test_enforce_masks_rezeroes_in_place():
    net = make_net()
    mask = random_mask(net)
    M.attach_hard_mask(net, mask)
    ids = {n: id(p) for n, p in M.prunable_weights(net).items()}
    with torch.no_grad():
        for p in M.prunable_weights(net).values():
            p.add_(1.0)
    M.enforce_masks(net)
    for name, p in M.prunable_weights(net).items():
        assert id(p) == ids[name] and p.requires_grad and bool((p[~mask[name]] == 0).all())


def test_deepcopy_and_pickle_of_hard_masked_model():
    net = make_net()
    mask = random_mask(net)
    M.attach_hard_mask(net, mask)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert M.current_mask(clone) == mask
        # PyTorch drops tensor hooks when copying parameters; enforce_masks re-installs them
        M.enforce_masks(clone)
        _train(clone, torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9), steps=3)
        for name, p in M.prunable_weights(clone).items():
            assert bool((p.detach()[~mask[name]] == 0).all())
    # the original's hooks still point at the original
    x, y = batch()
    F.cross_entropy(net(x), y).backward()
    assert all(bool((p.grad[~mask[n]] == 0).all()) for n, p in M.prunable_weights(net).items())


def test_hard_mask_after_dtype_conversion():
    net = make_net().double()
    mask = random_mask(net)
    M.attach_hard_mask(net, mask)
    net.float()
    x, y = batch()
    F.cross_entropy(net(x), y).backward()
    assert all(bool((p.grad[~mask[n]] == 0).all()) for n, p in M.prunable_weights(net).items())


def test_hard_state_dict_round_trips():
    net = make_net()
    mask = random_mask(net)
    M.attach_hard_mask(net, mask)
    _train(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), steps=2)
    net.eval()
    sd = net.state_dict()
    x, _ = batch()
    expected = net(x)

    # fresh model + Mask.ones + load_state_dict restores the mask buffers
    fresh = make_net(seed=5)
    M.attach_hard_mask(fresh, Mask.ones(fresh))
    fresh.load_state_dict(sd)
    fresh.eval()
    assert M.current_mask(fresh) == mask and torch.equal(fresh(x), expected)

    # a fresh plain model via load_masked_state_dict
    fresh2 = make_net(seed=6)
    assert M.load_masked_state_dict(fresh2, sd) == mask
    fresh2.eval()
    assert M.current_mask(fresh2) == mask and torch.equal(fresh2(x), expected)

    # a plain model: drop the mask keys
    assert M.mask_from_state_dict(sd) == mask
    plain_sd = M.to_plain_state_dict(sd)
    assert list(plain_sd) == list(make_net().state_dict())
    plain = make_net(seed=7)
    plain.load_state_dict(plain_sd)
    plain.eval()
    assert torch.equal(plain(x), expected)
    with pytest.raises(RuntimeError, match="weight_mask"):
        make_net().load_state_dict(sd)  # strict loading into a plain model names the mask keys


def test_load_state_dict_rezeroes_with_loaded_mask():
    net = make_net()
    M.attach_hard_mask(net, Mask.ones(net))
    donor = make_net(seed=3)
    mask = random_mask(donor)
    sd = donor.state_dict()  # unmasked weights, but a mask to go with them
    sd.update({n + "_mask": m for n, m in mask.items()})
    net.load_state_dict(sd)
    for name, p in M.prunable_weights(net).items():
        assert bool((p[~mask[name]] == 0).all())


def test_hard_mask_errors():
    net = make_net()
    with pytest.raises(CheckpointError, match="nope.weight"):
        M.attach_hard_mask(net, Mask({"nope.weight": torch.ones(2, dtype=torch.bool)}))
    with pytest.raises(CheckpointError, match="expected"):
        M.attach_hard_mask(net, Mask({"stages.head.1.weight": torch.ones(6, 3, dtype=torch.bool)}))
    M.attach_hard_mask(net, random_mask(net))
    with pytest.raises(ConfigError, match="hard and a soft"):
        M.attach_soft_mask(net, ["stages.head.1.weight"])
    net2 = make_net()
    M.attach_soft_mask(net2)
    with pytest.raises(ConfigError, match="hard and a soft"):
        M.attach_hard_mask(net2, Mask.ones(net2))


def test_remove_hard_masks_leaves_plain_model():
    net = make_net()
    keys = list(net.state_dict())
    mask = random_mask(net)
    M.attach_hard_mask(net, mask)
    _train(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), steps=2)
    removed = M.remove_masks(net)
    assert removed == mask and list(removed) == PRUNABLE
    assert_plain(net, keys)
    for name, p in M.prunable_weights(net).items():
        assert bool((p[~mask[name]] == 0).all())


def test_remove_masks_of_torch_pruned_model():
    net = make_net()
    keys = list(net.state_dict())
    mask = random_mask(net)
    mask.to_torch_prune(net)
    assert M.current_mask(net) == mask
    assert M.remove_masks(net) == mask
    assert_plain(net, keys)
    for name, p in M.prunable_weights(net).items():
        assert bool((p[~mask[name]] == 0).all())


# ------------------------------------------------------------------ soft masks (CS)


def test_soft_forward_matches_manual_computation():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    conv = nn.Conv2d(2, 3, 3)
    model = nn.ModuleDict({"lin": lin, "conv": conv})
    s0, beta = 0.1, 3.7
    M.attach_soft_mask(model, ["lin.weight", "conv.weight"], s0=s0)
    with torch.no_grad():
        for s in M.mask_logits(model).values():
            s.normal_()
    M.set_temperature(model, beta)
    assert M.get_temperature(model) == pytest.approx(beta)
    s_lin, s_conv = M.mask_logits(model)["lin.weight"], M.mask_logits(model)["conv.weight"]
    w_lin = lin.parametrizations.weight.original
    w_conv = conv.parametrizations.weight.original
    denom = torch.sigmoid(torch.tensor(s0))
    x = torch.randn(4, 7)
    manual = F.linear(x, w_lin * torch.sigmoid(beta * s_lin) / denom, lin.bias)
    assert torch.allclose(lin(x), manual, rtol=1e-6, atol=1e-7)
    xi = torch.randn(2, 2, 6, 6)
    manual_c = F.conv2d(xi, w_conv * torch.sigmoid(beta * s_conv) / denom, conv.bias)
    assert torch.allclose(conv(xi), manual_c, rtol=1e-6, atol=1e-6)
    # without the scale: m = sigmoid(beta * s)
    lin2 = copy.deepcopy(lin)
    M.remove_soft_mask(lin2, hard=False)
    s = s_lin.detach().clone()
    M.attach_soft_mask(lin2, {"weight": s}, s0=s0, scale_by_s0=False, beta=beta)
    assert torch.allclose(lin2(x), F.linear(x, w_lin * torch.sigmoid(beta * s), lin.bias), rtol=1e-6, atol=1e-7)


def test_soft_mask_at_init_is_exactly_identity():
    net = make_net()
    ref = make_net()
    net.eval(), ref.eval()
    logits = M.attach_soft_mask(net)  # s0 = 0, beta = 1, scale on: m == 1 exactly
    assert list(logits) == PRUNABLE
    assert all(bool((s == 0).all()) for s in logits.values())
    x, _ = batch()
    assert torch.equal(net(x), ref(x))
    for m in M.soft_mask_values(net).values():
        assert bool((m == 1).all())
    n_masked = sum(p.numel() for p in M.prunable_weights(net).values())
    assert M.soft_mask_penalty(net).item() == n_masked
    assert M.soft_mask_penalty(net, normalize=True).item() == 1.0
    # nonzero s0: the scale keeps the mask at 1 up to rounding
    net2, x2 = make_net(), batch()[0]
    M.attach_soft_mask(net2, s0=-0.3)
    net2.eval()
    assert torch.allclose(net2(x2), ref(x2), rtol=1e-5, atol=1e-6)


def test_soft_gradients_reach_weights_and_logits():
    net = make_net()
    M.attach_soft_mask(net, s0=0.05)
    x, y = batch()
    loss = F.cross_entropy(net(x), y) + 1e-3 * M.soft_mask_penalty(net)
    loss.backward()
    for name, s in M.mask_logits(net).items():
        assert s.grad is not None and bool((s.grad != 0).any()), name
    for name, w in M.prunable_weights(net).items():
        assert w.grad is not None and bool((w.grad != 0).any()), name
    logit_ids = {id(s) for s in M.mask_logits(net).values()}
    others = M.non_mask_parameters(net)
    assert len(others) == len(list(net.parameters())) - len(logit_ids)
    assert not any(id(p) in logit_ids for p in others)
    assert {id(p) for p in M.prunable_weights(net).values()} <= {id(p) for p in others}


def _cached(net) -> list:
    """The forward-pass masks this model's soft masks have cached for reuse."""
    return [M_soft._SHARED_MASKS[sm] for _, sm in M_soft._soft_masks(net) if sm in M_soft._SHARED_MASKS]


def _cs_loss_grads(net, x, y, lam: float, share: bool) -> dict[str, torch.Tensor]:
    for q in net.parameters():
        q.grad = None
    out = net(x)
    loss = F.cross_entropy(out, y) + lam * M.soft_mask_penalty(net, reuse_forward=share)
    loss.backward()
    return {n: q.grad.clone() for n, q in net.named_parameters()}


def _soft_net_with_random_logits(s0: float, beta: float):
    """A test net with soft masks, random logits and temperature ``beta``, and one batch."""
    net = make_net()
    M.attach_soft_mask(net, s0=s0)
    with torch.no_grad():
        for logits in M.mask_logits(net).values():
            logits.normal_()
    M.set_temperature(net, beta)
    return net, batch()


def test_penalty_reusing_the_forward_mask_gets_the_same_gradients():
    net, (x, y) = _soft_net_with_random_logits(0.1, 2.5)
    net(x)
    cached = [M_soft._SHARED_MASKS[sm][0] for _, sm in M_soft._soft_masks(net)]
    assert all(v is c for v, c in zip(M.soft_mask_values(net, reuse_forward=True).values(), cached))
    assert not _cached(net)  # used once
    net(x)
    assert all(v is not c for v, c in zip(M.soft_mask_values(net).values(), cached))  # default: fresh
    a = _cs_loss_grads(net, x, y, 1e-2, share=True)
    b = _cs_loss_grads(net, x, y, 1e-2, share=False)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7), n


def test_a_penalty_backpropagated_on_its_own_first_still_works():
    net = make_net()
    M.attach_soft_mask(net, s0=0.0)
    x, y = batch()
    out = net(x)
    pen = M.soft_mask_penalty(net)  # the default: a graph of its own
    pen.backward()
    F.cross_entropy(out, y).backward()
    out = net(x)
    torch.autograd.grad(M.soft_mask_penalty(net), list(M.mask_logits(net).values()))
    F.cross_entropy(out, y).backward()


def test_a_reused_forward_mask_is_never_stale_or_consumed():
    net = make_net()
    M.attach_soft_mask(net, s0=0.0)
    opt = torch.optim.SGD(M.mask_logits(net).values(), lr=1.0)
    x, y = batch()

    def fresh_penalty():
        return sum((torch.sigmoid(sm.beta * sm.logits) * sm.reciprocal).sum() for _, sm in M_soft._soft_masks(net))

    def reused():
        return M.soft_mask_penalty(net, reuse_forward=True)

    F.cross_entropy(net(x), y).backward()  # backward consumed the forward's graph: not reused
    assert not _cached(net)
    reused().backward()  # a fresh graph, no "backward through the graph a second time"
    net(x)
    opt.step()  # the logits changed after the forward: the penalty must see the new values
    assert torch.allclose(reused(), fresh_penalty())
    net(x)
    M.set_temperature(net, 3.0)  # so does a new temperature
    assert torch.allclose(reused(), fresh_penalty())
    with torch.no_grad():
        net(x)  # evaluation does not leave a graph-less mask for the next training step
    assert not _cached(net)
    net(x)
    net.double()  # new storage and dtype for the logits: not the forward pass's mask
    pen = reused()
    assert pen.dtype == torch.float64 and torch.allclose(pen, fresh_penalty())
    net.float()
    net(x)
    copy.deepcopy(net)  # the shared mask (a non-leaf tensor) is not on the module
    # gradient accumulation: forward/backward twice, each with its own penalty
    for _ in range(2):
        (F.cross_entropy(net(x), y) + 1e-3 * reused()).backward()


def test_soft_masked_layer_gradients_equal_the_plain_formula():
    net, (x, y) = _soft_net_with_random_logits(0.3, 4.0)
    loss = F.cross_entropy(net(x), y) + 1e-2 * M.soft_mask_penalty(net, reuse_forward=True)
    loss.backward()
    # the same network computed with plain autograd operations
    plain = make_net()
    raw = {n: w.detach() for n, w in M.logical_named_parameters(net).items()}
    logits = {n: s.detach().clone().requires_grad_(True) for n, s in M.mask_logits(net).items()}
    weights = {n: raw[n].clone().requires_grad_(True) for n in logits}
    denom = torch.sigmoid(torch.tensor(0.3))
    masks = {n: torch.sigmoid(4.0 * logits[n]) / denom for n in logits}
    params = {n: (weights[n] * masks[n] if n in masks else raw[n]) for n in raw}
    out = torch.func.functional_call(plain, params, (x,))
    ref = F.cross_entropy(out, y) + 1e-2 * sum(m.sum() for m in masks.values())
    ref.backward()
    for n in logits:
        assert torch.allclose(logits[n].grad, M.mask_logits(net)[n].grad, rtol=1e-4, atol=1e-7), n
        module, tensor_name = M_common._resolve(net, n)
        w_grad = getattr(module.parametrizations, tensor_name).original.grad
        assert torch.allclose(weights[n].grad, w_grad, rtol=1e-4, atol=1e-7), n


def test_a_fresh_soft_mask_is_one_for_every_usual_s0():
    exact = 0
    for s0 in (0.0, 0.05, -0.02, -0.03, -0.05, -0.1, 0.3, -0.2, 1.0, -2.0):
        sm = M.SoftMask(torch.full((1000,), s0), s0=s0)
        m = sm.mask()
        exact += bool((m == 1).all())
        assert torch.allclose(m, torch.ones(1000), rtol=2e-7, atol=0), s0
    assert exact >= 8  # the scale is chosen to make it exact where one unit in the last place allows
    assert M.SoftMask(torch.zeros(3), s0=0.0).reciprocal == 2.0


def test_soft_mask_from_mask_init_keeps_pruned_at_zero():
    net = make_net()
    mask = random_mask(net, density=0.5)
    M.attach_soft_mask(net, mask, s0=0.0)
    values = M.soft_mask_values(net)
    for name in mask:
        assert bool((values[name][~mask[name]] == 0).all()) and bool((values[name][mask[name]] == 1).all())
    x, y = batch()
    F.cross_entropy(net(x), y).backward()
    for name, s in M.mask_logits(net).items():
        assert bool((s.grad[~mask[name]] == 0).all())
    # s0 == 0 is not > 0: with the default s0 even the kept entries are pruned by the strict hard mask
    assert M.hard_mask_from_logits(net).num_kept() == 0
    net2 = make_net()
    M.attach_soft_mask(net2, mask, s0=0.1)
    assert M.hard_mask_from_logits(net2) == mask


def test_cs_reset_logits():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    M.attach_soft_mask(lin, ["weight"], s0=0.1)
    s = M.mask_logits(lin)["weight"]
    values = torch.tensor([[-2.0, -1e-3, 0.0, 1e-4], [1e-3, 0.5, 3.0, -0.2], [0.2, -5.0, 4e-4, 1.0]])
    with torch.no_grad():
        s.copy_(values)
    M.set_temperature(lin, 200.0)
    M.cs_reset_logits_(lin, beta_final=200.0)
    after = s.detach()
    neg = values < 0
    assert bool((after[neg] < 0).all()) and torch.equal(after[neg], 200.0 * values[neg])
    assert torch.equal(after, torch.clamp(200.0 * values, max=0.1))
    assert bool((after[values > 0.1 / 200] == 0.1).all())  # positive ones restart at s0
    assert M.get_temperature(lin) == 1.0
    assert s is M.mask_logits(lin)["weight"]  # in place: optimizers keep their parameter
    # generic reset and an explicit s0
    M.reset_logits_(lin, lambda t: torch.full_like(t, -1.0))
    assert bool((s == -1).all())
    with torch.no_grad():
        s.copy_(values)
    M.cs_reset_logits_(lin, beta_final=10.0, s0=0.0)
    assert torch.equal(s.detach(), torch.clamp(10.0 * values, max=0.0))


def test_hard_mask_from_logits_is_strict():
    lin = nn.Linear(3, 2)
    M.attach_soft_mask(lin, ["weight"])
    with torch.no_grad():
        M.mask_logits(lin)["weight"].copy_(torch.tensor([[0.0, 1e-30, -1e-30], [-0.0, 2.0, -3.0]]))
    hard = M.hard_mask_from_logits(lin)
    assert torch.equal(hard["weight"], torch.tensor([[False, True, False], [False, True, False]]))
    assert M.current_mask(lin) == hard


def test_soft_state_dict_keys_and_round_trip():
    net = make_net()
    keys = list(net.state_dict())
    M.attach_soft_mask(net, s0=0.2)
    with torch.no_grad():
        for s in M.mask_logits(net).values():
            s.normal_()
    M.set_temperature(net, 5.0)
    net.eval()
    sd = net.state_dict()
    assert set(sd) == set(keys) | {n + "_mask_logits" for n in PRUNABLE}
    assert [k for k in sd if not k.endswith("_mask_logits")] == keys
    assert torch.equal(sd["stages.block.proj.weight"], net.stages["block"].proj.parametrizations.weight.original)

    x, _ = batch()
    expected = net(x)
    fresh = make_net(seed=9)
    M.attach_soft_mask(fresh, s0=0.2)
    fresh.load_state_dict(sd)
    M.set_temperature(fresh, 5.0)
    fresh.eval()
    for name, s in M.mask_logits(fresh).items():
        assert torch.equal(s, sd[name + "_mask_logits"])
    assert torch.equal(fresh(x), expected)

    fresh2 = make_net(seed=10)
    assert M.load_masked_state_dict(fresh2, sd, s0=0.2) == M.hard_mask_from_logits(net)
    M.set_temperature(fresh2, 5.0)
    fresh2.eval()
    assert torch.equal(fresh2(x), expected)

    # to a plain model: w * 1[s > 0]
    plain = make_net(seed=11)
    plain.load_state_dict(M.to_plain_state_dict(sd))
    hard = M.hard_mask_from_logits(net)
    for name, p in M.prunable_weights(plain).items():
        raw = sd[name]
        assert torch.equal(p.detach(), raw.masked_fill(~hard[name], 0))


def test_soft_strict_load_errors_use_public_key_names():
    net = make_net()
    M.attach_soft_mask(net)
    with pytest.raises(RuntimeError) as err:
        net.load_state_dict(make_net().state_dict())  # a plain state_dict has no logits
    assert "stages.head.1.weight_mask_logits" in str(err.value) and "parametrizations" not in str(err.value)
    result = net.load_state_dict(make_net(seed=4).state_dict(), strict=False)
    assert set(result.missing_keys) == {n + "_mask_logits" for n in PRUNABLE} and not result.unexpected_keys
    assert torch.equal(M.prunable_weights(net)["stages.head.1.weight"], make_net(seed=4).stages["head"][1].weight)


def test_soft_deepcopy_is_independent():
    net = make_net()
    M.attach_soft_mask(net)
    with torch.no_grad():
        for s in M.mask_logits(net).values():
            s.normal_()
    net.eval()
    clone = copy.deepcopy(net)
    x, _ = batch()
    assert torch.equal(clone(x), net(x))
    assert list(clone.state_dict()) == list(net.state_dict())
    before = {n: s.detach().clone() for n, s in M.mask_logits(net).items()}
    with torch.no_grad():
        for s in M.mask_logits(clone).values():
            s.add_(1.0)
    M.set_temperature(clone, 3.0)
    assert all(torch.equal(s, before[n]) for n, s in M.mask_logits(net).items())
    assert M.get_temperature(net) == 1.0
    # the clone's state_dict hooks act on the clone: loading into it and removing from it work
    clone.load_state_dict(net.state_dict())
    assert all(torch.equal(s, before[n]) for n, s in M.mask_logits(clone).items())
    M.remove_soft_mask(clone)
    assert M.mask_logits(net) and list(net.state_dict())[-1].endswith("_mask_logits")


def test_remove_soft_mask_hard_and_raw():
    ref_keys = list(make_net().state_dict())
    for hard in (True, False):
        net = make_net()
        M.attach_soft_mask(net)
        with torch.no_grad():
            for s in M.mask_logits(net).values():
                s.normal_()
        raw = {n: p.detach().clone() for n, p in M.prunable_weights(net).items()}
        expected_mask = M.hard_mask_from_logits(net)
        ids = {n: id(p) for n, p in M.prunable_weights(net).items()}
        removed = M.remove_soft_mask(net, hard=hard)
        assert removed == expected_mask and list(removed) == PRUNABLE
        assert_plain(net, ref_keys)
        assert type(net.stages["block"].proj) is nn.Linear
        for name, p in M.prunable_weights(net).items():
            assert id(p) == ids[name]  # the same Parameter object: optimizers stay valid
            want = raw[name].masked_fill(~removed[name], 0) if hard else raw[name]
            assert torch.equal(p.detach(), want)


def test_remove_masks_on_soft_model_gives_plain_model_with_exact_zeros():
    net = make_net()
    M.attach_soft_mask(net)
    with torch.no_grad():
        for s in M.mask_logits(net).values():
            s.normal_()
    mask = M.hard_mask_from_logits(net)
    assert M.remove_masks(net) == mask
    assert_plain(net, list(make_net().state_dict()))
    for name, p in M.prunable_weights(net).items():
        assert bool((p[~mask[name]] == 0).all())


def test_attach_soft_twice_replaces_and_errors():
    net = make_net()
    M.attach_soft_mask(net, s0=0.3)
    new = M.attach_soft_mask(net, ["stages.head.1.weight"], s0=-0.1)
    assert list(new) == ["stages.head.1.weight"] and bool((new["stages.head.1.weight"] == -0.1).all())
    assert list(M.mask_logits(net)) == PRUNABLE
    with pytest.raises(ConfigError, match="nope"):
        M.attach_soft_mask(make_net(), ["nope.weight"])
    with pytest.raises(ConfigError, match="positive"):
        M.set_temperature(net, 0.0)
    pruned = make_net()
    prune.random_unstructured(pruned.stages["head"][1], "weight", amount=0.5)
    with pytest.raises(ConfigError, match="torch.nn.utils.prune"):
        M.attach_soft_mask(pruned, ["stages.head.1.weight"])


def test_prunable_and_mask_validation_on_masked_models():
    soft = make_net()
    M.attach_soft_mask(soft)
    assert list(M.prunable_weights(soft)) == PRUNABLE
    assert M.prunable_weights(soft)["stages.head.1.weight"] is soft.stages["head"][1].parametrizations.weight.original
    Mask.ones(soft).validate(soft, expected_names=PRUNABLE)
    tp = make_net()
    Mask.ones(tp).to_torch_prune(tp)
    assert list(M.prunable_weights(tp)) == PRUNABLE
    assert M.prunable_weights(tp)["stages.head.1.weight"] is tp.stages["head"][1].weight_orig


# ------------------------------------------------------------------ torch.compile (small, skippable)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch's compiler stack
@pytest.mark.skipif(os.environ.get("LOTTERY_SKIP_COMPILE") == "1", reason="LOTTERY_SKIP_COMPILE=1")
def test_torch_compile_soft_and_hard():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    M.attach_soft_mask(net, s0=0.1)
    with torch.no_grad():
        for s in M.mask_logits(net).values():
            s.normal_()
    compiled = torch.compile(net)
    x = torch.randn(4, 2, 6, 6)
    out = compiled(x)
    assert torch.allclose(out, net(x), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(s.grad is not None and bool((s.grad != 0).any()) for s in M.mask_logits(net).values())
    M.set_temperature(net, 7.0)  # a buffer changed in place: same graph, new value
    assert torch.allclose(compiled(x), net(x), rtol=1e-5, atol=1e-6)

    M.remove_masks(net)
    mask = Mask({n: torch.rand(p.shape) > 0.5 for n, p in M.prunable_weights(net).items()})
    M.attach_hard_mask(net, mask)
    compiled_hard = torch.compile(net, backend="aot_eager")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(3):
        opt.zero_grad()
        compiled_hard(x).pow(2).sum().backward()
        opt.step()
    assert all(bool((p[~mask[n]] == 0).all()) for n, p in M.prunable_weights(net).items())


def test_gradient_masking_follows_a_mask_changed_in_place_replaced_or_recast():
    """The hook multiplies by a cached float copy of the bool mask (the CPU fast path): every way of
    changing the mask must reach the gradients."""
    from lottery.masking import attach_hard_mask, enforce_masks

    g = torch.Generator().manual_seed(0)
    model = nn.Linear(6, 4)
    x = torch.randn(3, 6, generator=g)

    def check(mask: torch.Tensor, dtype=torch.float32) -> None:
        model.zero_grad()
        model(x.to(dtype)).sum().backward()
        grad = model.weight.grad
        assert grad.dtype == dtype
        assert bool((grad[~mask] == 0).all()), "pruned gradient entries are zero"
        assert bool((grad[mask] != 0).all()), "kept gradient entries are untouched"

    masks = [torch.rand(4, 6, generator=g) < 0.5 for _ in range(3)]
    attach_hard_mask(model, {"weight": masks[0]})
    check(masks[0])
    sd = model.state_dict()  # in place: load_state_dict copies into the existing buffer
    sd["weight_mask"] = masks[1].clone()
    sd["weight"] = torch.randn(4, 6, generator=g)
    model.load_state_dict(sd)
    check(masks[1])
    assert bool((model.weight[~masks[1]] == 0).all())
    model.double()  # recast: a new buffer tensor and another gradient dtype
    check(masks[1], torch.float64)
    attach_hard_mask(model, {"weight": masks[2]})  # replaced
    check(masks[2], torch.float64)
    with torch.no_grad():
        model.weight.fill_(float("inf"))
    enforce_masks(model)  # non-finite pruned entries become exactly 0, not NaN
    assert bool((model.weight[~masks[2]] == 0).all()) and bool(torch.isinf(model.weight[masks[2]]).all())
