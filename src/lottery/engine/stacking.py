"""K networks of one architecture as one stacked network, trained in one process (issue 23).

Layout ("channel groups"): the stacked network is a copy of member 0 whose layers carry all K members
side by side, member-major along the channel (feature) dimension:

- ``Conv2d(C -> O, groups=g)`` becomes ``Conv2d(K*C -> K*O, groups=K*g)``: member k's filters see only
  member k's channels;
- ``BatchNorm1d/2d(C)`` becomes ``BatchNorm(K*C)``: batch statistics are per channel, so each member
  gets exactly its own statistics, running mean and variance included;
- ``Linear(F -> O)`` becomes :class:`StackedLinear`: weights ``(K, O, F)``, the input viewed
  ``(B, K, F)``, one batched matrix product, the output ``(B, K*O)``;
- element-wise layers, pooling, ``Flatten`` and residual additions work unchanged on ``(B, K*C, H, W)``:
  flattening keeps member k's features together, in the member's own order.

The input is repeated K times along the channels and the output ``(B, K*classes)`` is viewed
``(B, K, classes)``. Why this layout and not ``torch.func.functional_call`` + ``vmap``: the stacked
network is an ordinary module with ordinary parameters, so one optimizer over them is K optimizers
(SGD and Adam are element-wise), BatchNorm updates its running statistics as usual (under ``vmap`` it
cannot update them in place), checkpoints are plain state dicts, and each member's state is a slice.

:func:`stack` refuses, with one line (:class:`StackingError`), a network with a layer it does not know,
and checks numerically that the stacked network computes every member's output (a ``forward`` that
mixes channels by itself would not); callers then run the members one by one.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lottery.engine.checkpoint import load_checkpoint, save_checkpoint
from lottery.engine.trainer import Trainer, make_optimizer
from lottery.errors import CheckpointError, ConfigError, NumericalError
from lottery.hparams import TrainingHparams
from lottery.io import FAULT_STEP_ENV, fault_step


class StackingError(ConfigError):
    """A network or option that the stacked path does not support; the message is one line."""


# How member k's tensor is cut out of a stacked tensor.
INDEX = "index"    # stacked = torch.stack(members): member k is stacked[k]
CHUNK = "chunk"    # stacked = torch.cat(members): member k is the k-th of K equal chunks along dim 0
SHARED = "shared"  # every member has the same value (BatchNorm's num_batches_tracked)

# Layers without state that act per channel (or element), so they work unchanged on stacked channels.
_PASS_THROUGH = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)


class StackedLinear(nn.Module):
    """K ``Linear(F -> O)`` layers side by side: input ``(B, K*F)`` (or more dims, flattened member-major),
    output ``(B, K*O)``; member k's weight is ``weight[k]``."""

    def __init__(self, k: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.k, self.in_features, self.out_features = k, in_features, out_features
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(k, out_features)) if bias else None
        # Layouts that stack() switches on where its numerical check passes (see _fast_layouts):
        self.shared_input = False  # the network's first layer: its input (B, F) is every member's, not repeated
        self.keep_members = False  # output (B, K, O), a view of the product (no copy), read as is by the next layer

    @classmethod
    def from_members(cls, layers: Sequence[nn.Linear]) -> "StackedLinear":
        first = layers[0]
        out = cls(len(layers), first.in_features, first.out_features, first.bias is not None)
        with torch.no_grad():
            out.weight.copy_(torch.stack([m.weight.detach() for m in layers]))
            if out.bias is not None:
                out.bias.copy_(torch.stack([m.bias.detach() for m in layers]))
        return out.to(first.weight.device, first.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.shared_input:  # one product (B, F) x (F, K*O): every member's output, member-major
            w = self.weight.reshape(self.k * self.out_features, self.in_features)
            y = F.linear(x.reshape(b, self.in_features), w, None if self.bias is None else self.bias.reshape(-1))
            return y.view(b, self.k, self.out_features) if self.keep_members else y
        h = x.reshape(b, self.k, self.in_features).transpose(0, 1)  # (K, B, F)
        if self.bias is not None:
            y = torch.baddbmm(self.bias.unsqueeze(1), h, self.weight.transpose(1, 2))  # (K, B, O)
        else:
            y = torch.bmm(h, self.weight.transpose(1, 2))
        y = y.transpose(0, 1)  # (B, K, O)
        return y if self.keep_members else y.reshape(b, self.k * self.out_features)

    def extra_repr(self) -> str:
        return (f"k={self.k}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, shared_input={self.shared_input}, keep_members={self.keep_members}")


class StackedModel(nn.Module):
    """K members in one network (built by :func:`stack`): input ``(B, ...)`` shared by every member,
    output ``(B, K, classes)``. ``body`` is the stacked copy of the members' network; ``layout`` says
    how each of its state-dict entries splits into the members' (:data:`INDEX`, :data:`CHUNK`, :data:`SHARED`)."""

    def __init__(self, body: nn.Module, k: int, layout: dict[str, str], member_keys: list[str]):
        super().__init__()
        self.body = body
        self.k = k
        self.layout = dict(layout)
        self.member_keys = list(member_keys)
        self.shared_input = False  # the first layer reads the input once for all members (see _fast_layouts)
        shape = getattr(body, "input_shape", None)
        if shape is not None:
            self.input_shape = tuple(shape)
        if hasattr(body, "num_classes"):
            self.num_classes = body.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if not self.shared_input:
            x = x.repeat(1, self.k, *([1] * (x.dim() - 2)))  # member-major: [member 0's channels, member 1's, ...]
        return self.body(x).reshape(b, self.k, -1)


# -- building --------------------------------------------------------------------------------------
def _refuse(msg: str) -> StackingError:
    return StackingError(f"cannot stack: {msg}")


def _stack_module(name: str, layers: list[nn.Module]) -> tuple[nn.Module, dict[str, str]]:
    """The stacked replacement of the members' layer ``name`` and the layout of its state entries."""
    first = layers[0]
    k = len(layers)
    kind = type(first)
    if any(type(m) is not kind for m in layers):
        raise _refuse(f"the members' layer {name} differs in type")
    if first.__dict__.get("_forward_hooks") or first.__dict__.get("_forward_pre_hooks"):
        raise _refuse(f"layer {name} has forward hooks (a mask?); stacked masks are not supported yet")
    if hasattr(first, "parametrizations"):
        raise _refuse(f"layer {name} has parametrizations (a soft mask?); stacked masks are not supported yet")
    if kind is nn.Linear:
        return StackedLinear.from_members(layers), {"weight": INDEX, "bias": INDEX}
    if kind is nn.Conv2d or kind is nn.Conv1d:
        c = first  # padding of any mode is per channel
        new = kind(k * c.in_channels, k * c.out_channels, c.kernel_size, stride=c.stride, padding=c.padding,
                   dilation=c.dilation, groups=k * c.groups, bias=c.bias is not None, padding_mode=c.padding_mode,
                   device=c.weight.device, dtype=c.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(torch.cat([m.weight.detach() for m in layers]))
            if new.bias is not None:
                new.bias.copy_(torch.cat([m.bias.detach() for m in layers]))
        return new, {"weight": CHUNK, "bias": CHUNK}
    if kind is nn.BatchNorm2d or kind is nn.BatchNorm1d:
        b = first
        if any((m.eps, m.momentum, m.affine, m.track_running_stats) != (b.eps, b.momentum, b.affine, b.track_running_stats)
               for m in layers):
            raise _refuse(f"the members' BatchNorm {name} differ in settings")
        new = kind(k * b.num_features, eps=b.eps, momentum=b.momentum, affine=b.affine,
                   track_running_stats=b.track_running_stats)
        new.to(next(iter(b.buffers()), torch.zeros(())).device)
        with torch.no_grad():
            if b.affine:
                new.weight.copy_(torch.cat([m.weight.detach() for m in layers]))
                new.bias.copy_(torch.cat([m.bias.detach() for m in layers]))
            if b.track_running_stats:
                new.running_mean.copy_(torch.cat([m.running_mean for m in layers]))
                new.running_var.copy_(torch.cat([m.running_var for m in layers]))
                counts = {int(m.num_batches_tracked) for m in layers}
                if len(counts) != 1:
                    raise _refuse(f"the members' BatchNorm {name} have tracked different numbers of batches")
                new.num_batches_tracked.copy_(b.num_batches_tracked)
        return new, {"weight": CHUNK, "bias": CHUNK, "running_mean": CHUNK, "running_var": CHUNK,
                     "num_batches_tracked": SHARED}
    if isinstance(first, nn.Flatten):
        if (first.start_dim, first.end_dim) != (1, -1):
            raise _refuse(f"layer {name} flattens dims {first.start_dim}..{first.end_dim}, not 1..-1")
        return copy.deepcopy(first), {}
    if isinstance(first, nn.Dropout):
        if first.p > 0:
            raise _refuse(f"layer {name} is Dropout(p={first.p}): its random masks would differ from unstacked runs")
        return copy.deepcopy(first), {}
    if isinstance(first, _PASS_THROUGH):
        return copy.deepcopy(first), {}
    raise _refuse(f"layer {name} ({kind.__name__}) is not supported by the stacked path")


def stack(models: Sequence[nn.Module], *, check: bool = True) -> StackedModel:
    """One :class:`StackedModel` computing every one of ``models`` (same architecture, any weights).

    The members are not changed. ``check``: run one random batch (eval mode, its own generator: the
    global RNG is untouched) through both and refuse when the stacked output differs from a member's.
    """
    models = list(models)
    if not models:
        raise _refuse("no members")
    first = models[0]
    keys = list(first.state_dict().keys())
    shapes = {n: tuple(t.shape) for n, t in first.state_dict().items()}
    for m in models[1:]:
        if type(m) is not type(first) or {n: tuple(t.shape) for n, t in m.state_dict().items()} != shapes:
            raise _refuse("the members differ in architecture")
    k = len(models)
    body = copy.deepcopy(first)
    layout: dict[str, str] = {}
    # Own parameters of non-leaf modules, or of containers, cannot be placed.
    for name, module in first.named_modules():
        children = list(module.children())
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if children and own:
            raise _refuse(f"module {name or type(first).__name__} holds tensors of its own beside its layers")
        if children:  # a container or a block (a residual block, say): its forward is checked numerically below
            continue
        if module is first:
            raise _refuse(f"{type(first).__name__} has no layers")
        new, lay = _stack_module(name, [m.get_submodule(name) for m in models])
        parent_name, _, child = name.rpartition(".")
        parent = body.get_submodule(parent_name) if parent_name else body
        setattr(parent, child, new)
        for tensor_name, rule in lay.items():
            if getattr(new, tensor_name, None) is not None:
                layout[f"{name}.{tensor_name}"] = rule
    stacked = StackedModel(body, k, layout, keys)
    missing = [n for n in stacked.body.state_dict() if n not in layout]
    if missing:
        raise _refuse(f"no layout for {', '.join(missing[:3])}")
    stacked.train(first.training)
    if check:
        _check_outputs(stacked, models)
        _fast_layouts(stacked, models)
    return stacked


def _first_layer(stacked: StackedModel) -> nn.Module | None:
    """The first layer with parameters that a forward pass calls (hooks on one eval-mode batch)."""
    calls: list[nn.Module] = []
    leaves = [m for m in stacked.body.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    handles = [m.register_forward_pre_hook(lambda mod, args: calls.append(mod)) for m in leaves]
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(2, *stacked.input_shape, generator=gen).to(next(stacked.parameters()).device)
        was = stacked.training
        stacked.eval()
        with torch.no_grad():
            stacked(x)
        stacked.train(was)
    finally:
        for h in handles:
            h.remove()
    return calls[0] if calls else None


def _fast_layouts(stacked: StackedModel, models: list[nn.Module]) -> None:
    """Switch on the layouts that skip copies, each only where the numerical check still passes:

    - the first layer reads the input once for all members (no K-fold repeat): a StackedLinear does one
      product with all members' weights side by side, a convolution runs with the member's own groups
      (its weights ``(K*O, C/g, kh, kw)`` are then K filter banks over the same input channels);
    - StackedLinear layers hand ``(B, K, O)`` views on (element-wise layers keep them), so chains of
      linear layers (LeNet, the heads of conv nets) transpose nothing. A layer that needs ``(B, K*O)``
      (BatchNorm1d, say) fails the check and the switch is undone.
    Why: LeNet-sized steps are short, and those copies cost as much as the products (benchmarks/stacked_cs_speed.py)."""
    first = _first_layer(stacked)
    if isinstance(first, StackedLinear) or (isinstance(first, (nn.Conv1d, nn.Conv2d)) and first.groups % stacked.k == 0):
        groups = getattr(first, "groups", None)
        if isinstance(first, StackedLinear):
            first.shared_input = True
        else:
            first.groups = groups // stacked.k
        stacked.shared_input = True
        if not _passes(stacked, models):
            stacked.shared_input = False
            if isinstance(first, StackedLinear):
                first.shared_input = False
            else:
                first.groups = groups
    linears = [m for m in stacked.body.modules() if isinstance(m, StackedLinear)]
    for m in linears:
        m.keep_members = True
    if linears and not _passes(stacked, models):
        for m in linears:
            m.keep_members = False


def _passes(stacked: StackedModel, models: list[nn.Module]) -> bool:
    try:
        _check_outputs(stacked, models)
    except (StackingError, RuntimeError, ValueError):
        return False
    return True


@torch.no_grad()
def _check_outputs(stacked: StackedModel, models: list[nn.Module]) -> None:
    shape = getattr(models[0], "input_shape", None)
    if shape is None:
        raise _refuse(f"{type(models[0]).__name__} has no input_shape to check the stacked network with")
    device = next(models[0].parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, *shape, generator=gen).to(device)
    modes = [m.training for m in models]
    was = stacked.training
    try:
        for m in models:
            m.eval()
        stacked.eval()
        got = stacked(x)
        for i, m in enumerate(models):
            want = m(x)
            if got.shape[2:] != want.shape[1:] or not torch.allclose(got[:, i], want, rtol=1e-4,
                                                                       atol=1e-5 * max(1.0, float(want.abs().max()))):
                raise _refuse(f"the stacked {type(m).__name__} does not compute member {i}'s output "
                              "(its forward mixes channels)")
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
        stacked.train(was)


# -- members' state --------------------------------------------------------------------------------
def _member_slice(t: torch.Tensor, rule: str, k: int, K: int) -> torch.Tensor:
    if rule == INDEX:
        return t[k]
    if rule == CHUNK:
        return t.chunk(K, dim=0)[k]
    return t


def _stack_tensors(ts: Sequence[torch.Tensor], rule: str) -> torch.Tensor:
    if rule == INDEX:
        return torch.stack(list(ts))
    if rule == CHUNK:
        return torch.cat(list(ts))
    return ts[0]


def unstack_state(stacked: StackedModel, k: int) -> dict[str, torch.Tensor]:
    """Member ``k``'s plain state dict (the keys of the member network), as copies."""
    if not 0 <= k < stacked.k:
        raise IndexError(f"member {k} of a stack of {stacked.k}")
    state = stacked.body.state_dict()
    return {n: _member_slice(state[n], stacked.layout[n], k, stacked.k).detach().clone() for n in stacked.member_keys}


def load_member_states(stacked: StackedModel, states: Sequence[dict[str, torch.Tensor]]) -> None:
    """Set every member's weights (and buffers) from its own plain state dict."""
    if len(states) != stacked.k:
        raise ValueError(f"{len(states)} states for a stack of {stacked.k}")
    full = {n: _stack_tensors([s[n] for s in states], stacked.layout[n]) for n in stacked.member_keys}
    stacked.body.load_state_dict(full)


def _param_rules(stacked: StackedModel) -> list[str]:
    return [stacked.layout[n] for n, _ in stacked.body.named_parameters()]


def unstack_optimizer_state(stacked: StackedModel, state: dict, k: int) -> dict:
    """Member ``k``'s share of the state dict of an optimizer over ``stacked.parameters()``: the state
    dict of the same optimizer over member k's parameters (SGD's momentum, Adam's moments are per element)."""
    rules = _param_rules(stacked)
    params = list(stacked.parameters())
    out: dict[int, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        out[pid] = {key: (_member_slice(v, rules[pid], k, stacked.k).clone()
                          if isinstance(v, torch.Tensor) and v.shape == params[pid].shape else
                          (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)))
                    for key, v in pstate.items()}
    return {"state": out, "param_groups": copy.deepcopy(state["param_groups"])}


def stack_optimizer_states(stacked: StackedModel, states: Sequence[dict]) -> dict:
    """The inverse of :func:`unstack_optimizer_state`: the members' optimizer states as one."""
    rules = _param_rules(stacked)
    params = list(stacked.parameters())
    out: dict[int, dict[str, Any]] = {}
    for pid, pstate in states[0]["state"].items():
        member_shape = _member_slice(params[int(pid)], rules[int(pid)], 0, stacked.k).shape
        entry = {}
        for key, v in pstate.items():
            if isinstance(v, torch.Tensor) and v.shape == member_shape:
                entry[key] = _stack_tensors([s["state"][pid][key] for s in states], rules[int(pid)])
            else:
                entry[key] = v
        out[int(pid)] = entry
    return {"state": out, "param_groups": copy.deepcopy(states[0]["param_groups"])}


# -- training --------------------------------------------------------------------------------------
def stacked_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy, shape ``(K,)``, from logits ``(B, K, classes)``."""
    b, k, c = logits.shape
    per = F.cross_entropy(logits.reshape(b * k, c), y.repeat_interleave(k), reduction="none")
    return per.view(b, k).mean(0)


@torch.no_grad()
def evaluate_stacked(model: StackedModel, loader, device: str | torch.device = "cpu") -> list[dict[str, float]]:
    """:func:`lottery.engine.evaluate` for every member at once: one dict per member."""
    was = model.training
    model.eval()
    device = torch.device(device)
    loss_sum = torch.zeros(model.k, dtype=torch.float64, device=device)
    top1 = torch.zeros(model.k, dtype=torch.int64, device=device)
    top5 = torch.zeros(model.k, dtype=torch.int64, device=device)
    count = 0
    try:
        for x, y in loader:
            if FAULT_STEP_ENV in os.environ:  # crash tests (lottery.io): SIGKILL in the Nth evaluation batch
                fault_step("eval")
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()  # (B, K, C)
            b, k, c = logits.shape
            loss_sum += F.cross_entropy(logits.reshape(b * k, c), y.repeat_interleave(k),
                                        reduction="none").view(b, k).double().sum(0)
            idx = logits.topk(min(5, c), dim=2).indices  # (B, K, 5)
            hits = idx.eq(y[:, None, None])
            top1 += hits[..., 0].sum(0)
            top5 += hits.any(dim=2).sum(0)
            count += b
    finally:
        model.train(was)
    if count == 0:
        return [{"loss": math.nan, "top1": math.nan, "top5": math.nan, "count": 0} for _ in range(model.k)]
    return [{"loss": loss_sum[i].item() / count, "top1": top1[i].item() / count, "top5": top5[i].item() / count,
             "count": count} for i in range(model.k)]


#: Optimizers :func:`fused` rebuilds with ``fused=True``.
_FUSABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def fused(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``opt`` rebuilt over the same parameter groups (their own keys kept: base_lr, follow_schedule) with
    PyTorch's fused kernel, when it is SGD, Adam or AdamW without state yet; else ``opt`` itself.

    Why: the default step of these optimizers on the CPU is a loop of element-wise operations per
    parameter, each a pass over memory; a stack's parameters are K times larger, and the fused kernel
    does one pass (measured on LeNet's stacked weights, K = 8: Adam 30 -> 5 ms, SGD 24 -> 2.4 ms per
    step, loaded 2-core machine). The update is the same up to rounding."""
    if type(opt) not in _FUSABLE or opt.state or any(g.get("differentiable") for g in opt.param_groups):
        return opt
    devices = {p.device.type for g in opt.param_groups for p in g["params"]}
    if not devices <= {"cpu", "cuda"}:
        return opt
    groups = [{**g, "fused": True, "foreach": None} for g in opt.param_groups]
    return type(opt)(groups, **{**opt.defaults, "fused": True, "foreach": None})


class StackedTrainer(Trainer):
    """:class:`Trainer` for a :class:`StackedModel`: one optimizer over the stacked parameters, the loss the
    sum over members of each member's mean loss (so each member's gradient is its own), one metrics
    history per member (``member_histories``), and checkpoints written per member, in the format of an
    unstacked run's (``checkpoint_paths``: one per member), so a member can resume stacked or alone.

    ``history`` holds, per evaluation, ``{"step": ..., "members": [row, ...]}``. Callbacks see the
    stacked trainer; ``extra_loss`` may return a scalar or one value per member.
    """

    def __init__(self, model: StackedModel, train_loader, hp: TrainingHparams, *,
                 checkpoint_paths: Sequence[str | Path] | None = None, optimizers=None, **kwargs: Any):
        from lottery.distributed import is_distributed

        if is_distributed():
            raise StackingError("cannot stack: stacked training under torchrun (data-parallel) is not supported")
        if kwargs.get("checkpoint_path"):
            raise ValueError("StackedTrainer takes checkpoint_paths (one per member), not checkpoint_path")
        if optimizers is None:
            optimizers = [make_optimizer(model.parameters(), hp)]
        super().__init__(model, train_loader, hp, optimizers=[fused(opt) for opt in optimizers], **kwargs)
        self.k = model.k
        if checkpoint_paths is not None and len(checkpoint_paths) != self.k:
            raise ValueError(f"{len(checkpoint_paths)} checkpoint paths for a stack of {self.k}")
        self.checkpoint_paths = [Path(p) for p in checkpoint_paths] if checkpoint_paths else None
        self._train_loss_sum = torch.zeros(self.k, device=self.device)
        self.member_histories: list[list[dict[str, Any]]] = [[] for _ in range(self.k)]

    def evaluate_now(self) -> dict[str, Any]:
        base: dict[str, Any] = {"step": self.iteration, "epoch": round(self.step.epochs, 4), "lr": self.lr()}
        rows = [dict(base) for _ in range(self.k)]
        if self._train_loss_count:
            losses = (self._train_loss_sum / self._train_loss_count).tolist()
            for row, v in zip(rows, losses):
                row["train_loss"] = v
        for split, loader in self.eval_loaders.items():
            for row, m in zip(rows, evaluate_stacked(self.model, loader, self.device)):
                row[f"{split}_loss"] = m["loss"]
                row[f"{split}_accuracy"] = m["top1"]
                row[f"{split}_top5"] = m["top5"]
        summary = {**base, "members": rows}
        for cb in self.callbacks:
            cb.on_evaluate(self, summary)
        for hist, row in zip(self.member_histories, rows):
            hist.append(row)
        self.history.append(summary)
        return summary

    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Each member's mean loss, summed: the gradient of member k's parameters is member k's own.
        task_losses = stacked_cross_entropy(self.train_module(x), y)  # (K,)
        loss = task_losses.sum()
        for cb in self.callbacks:
            extra = cb.extra_loss(self)
            if extra is not None:
                loss = loss + extra.sum()
        return loss, task_losses

    def _non_finite(self, loss: torch.Tensor, task_loss: torch.Tensor) -> NumericalError:
        bad = [i for i, v in enumerate(task_loss.tolist()) if not math.isfinite(v)]
        return NumericalError(
            f"the loss became {loss.item()} at step {self.step} (iteration {self.iteration}; stacked members "
            f"{bad or 'all'}); the last good checkpoint is kept. Try a smaller learning rate (now {self.lr():g})"
        )

    def _log_row(self, row: dict[str, Any], seconds: float) -> None:
        members = row["members"]
        parts = [f"{self.desc} x{self.k} {self._progress_text(row['step'])}"]
        if "train_loss" in members[0]:
            parts.append("loss " + "/".join(f"{r['train_loss']:.4f}" for r in members))
        for split in self.eval_loaders:
            parts.append(f"{split} " + "/".join(f"{100 * r[f'{split}_accuracy']:.2f}" for r in members) + "%")
        parts.append(f"lr {row['lr']:.3g}")
        parts.append(f"{seconds:.1f}s")
        self.log("  ".join(parts))

    # -- checkpoints: one per member, in the unstacked format --------------------------------------
    def _save(self) -> None:
        if self.checkpoint_paths is None:
            return
        opt_states = [opt.state_dict() for opt in self.optimizers]
        for k, path in enumerate(self.checkpoint_paths):
            save_checkpoint(
                path,
                model_state=unstack_state(self.model, k),
                optimizer_states=[unstack_optimizer_state(self.model, s, k) for s in opt_states],
                info={
                    "iteration": self.iteration,
                    "iterations_per_epoch": self.iterations_per_epoch,
                    "history": self.member_histories[k],
                    "wall_seconds": self.wall_seconds,
                    "callbacks": [cb.state_dict() for cb in self.callbacks],
                    "hparams": self.hp.to_dict(),
                    "stack_size": self.k,
                },
            )

    def _maybe_resume(self) -> None:
        if self.checkpoint_paths is None:
            return
        present = [p.exists() for p in self.checkpoint_paths]
        if not any(present):
            return
        if not all(present):
            raise CheckpointError("some members of the stack have a checkpoint and some not: resume them apart "
                                  "(members_resume_groups) or delete the checkpoints")
        ckpts = [load_checkpoint(p) for p in self.checkpoint_paths]
        hp = self.hp.to_dict()
        for p, c in zip(self.checkpoint_paths, ckpts):
            if c.info.get("iterations_per_epoch") != self.iterations_per_epoch:
                raise CheckpointError(f"{p} was written with {c.info.get('iterations_per_epoch')} iterations per epoch, "
                                      f"this run has {self.iterations_per_epoch}: it belongs to another configuration")
            if (c.info.get("hparams") or {}) != hp:
                raise CheckpointError(f"{p} was written with other training hparams; use another output folder or "
                                      "delete the checkpoint")
        iterations = {int(c.info["iteration"]) for c in ckpts}
        if len(iterations) != 1:
            raise CheckpointError(f"the stack's members were checkpointed at different steps ({sorted(iterations)}): "
                                  "resume them apart")
        try:
            load_member_states(self.model, [c.model_state for c in ckpts])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"{self.checkpoint_paths[0]} does not fit this model: {e}") from None
        for i, opt in enumerate(self.optimizers):
            opt.load_state_dict(stack_optimizer_states(self.model, [c.optimizer_states[i] for c in ckpts]))
        for cb, state in zip(self.callbacks, ckpts[0].info.get("callbacks", [])):
            cb.load_state_dict(state)
        ckpts[0].restore_rng()
        self.iteration = iterations.pop()
        self.member_histories = [list(c.info.get("history", [])) for c in ckpts]
        self.history = [{"step": rows[0]["step"], "epoch": rows[0]["epoch"], "lr": rows[0]["lr"], "members": list(rows)}
                        for rows in zip(*self.member_histories)]
        self.wall_seconds = max(float(c.info.get("wall_seconds", 0.0)) for c in ckpts)
        self.log(f"{self.desc} x{self.k}: resumed from {len(ckpts)} member checkpoints at step {self.step}")


def checkpoint_iteration(path: Path) -> int | None:
    """The iteration a checkpoint was written at, or None when there is none (or it is unreadable)."""
    if not Path(path).exists():
        return None
    try:
        return int(load_checkpoint(path).info["iteration"])
    except Exception:
        return None


__all__ = [
    "StackedLinear", "StackedModel", "StackedTrainer", "StackingError", "checkpoint_iteration", "evaluate_stacked",
    "load_member_states", "stack", "stack_optimizer_states", "stacked_cross_entropy", "unstack_optimizer_state",
    "unstack_state",
]
