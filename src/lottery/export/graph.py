"""Reading a supported model as a list of ops (convs, BatchNorms, linears, residual stages) and finding the
layers whose output channels must shrink together."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from lottery.masks import Mask
from lottery.export._base import ExportError


# ============================================================================ describing a model


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _conv_op(name: str, conv: nn.Conv2d) -> dict[str, Any]:
    if conv.groups != 1 or not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
        raise ExportError(f"{name}: only plain Conv2d (groups=1, numeric zero padding) can be exported")
    return {"op": "conv", "name": name, "in": conv.in_channels, "out": conv.out_channels,
            "kernel": _pair(conv.kernel_size), "stride": _pair(conv.stride), "padding": _pair(conv.padding),
            "dilation": _pair(conv.dilation), "bias": conv.bias is not None, "bn": None}


def _bn_entry(name: str, bn: nn.BatchNorm2d) -> dict[str, Any]:
    if not bn.affine or not bn.track_running_stats:
        raise ExportError(f"{name}: BatchNorm without affine parameters or running statistics is not supported")
    return {"name": name, "eps": float(bn.eps), "momentum": bn.momentum}


def _walk(module: nn.Module, prefix: str) -> list[dict[str, Any]]:
    """Ops of a module whose children run in registration order (checked by the export's output test)."""
    from lottery.models.resnet_cifar import BasicBlock

    ops: list[dict[str, Any]] = []
    children = list(module.named_children())
    i = 0
    while i < len(children):
        name, child = children[i]
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Conv2d):
            op = _conv_op(full, child)
            if i + 1 < len(children) and isinstance(children[i + 1][1], nn.BatchNorm2d):
                bn_name, bn = children[i + 1]
                op["bn"] = _bn_entry(f"{prefix}.{bn_name}" if prefix else bn_name, bn)
                i += 1
            ops.append(op)
        elif isinstance(child, nn.Linear):
            ops.append({"op": "linear", "name": full, "in": child.in_features, "out": child.out_features,
                        "bias": child.bias is not None})
        elif isinstance(child, nn.ReLU):
            ops.append({"op": "relu"})
        elif isinstance(child, nn.MaxPool2d):
            if child.return_indices:
                raise ExportError(f"{full}: MaxPool2d with return_indices is not supported")
            ops.append({"op": "maxpool", "kernel": _pair(child.kernel_size), "stride": _pair(child.stride),
                        "padding": _pair(child.padding), "dilation": _pair(child.dilation),
                        "ceil_mode": bool(child.ceil_mode)})
        elif isinstance(child, nn.AdaptiveAvgPool2d):
            ops.append({"op": "avgpool", "output_size": _pair(child.output_size)})
        elif isinstance(child, nn.Flatten):
            if child.start_dim != 1 or child.end_dim != -1:
                raise ExportError(f"{full}: only Flatten(1, -1) is supported")
            ops.append({"op": "flatten"})
        elif isinstance(child, (nn.Dropout, nn.Identity)):
            pass  # identities at inference
        elif isinstance(child, BasicBlock):
            body = [_conv_op(f"{full}.conv1", child.conv1), {"op": "relu"}, _conv_op(f"{full}.conv2", child.conv2)]
            body[0]["bn"] = _bn_entry(f"{full}.bn1", child.bn1)
            body[2]["bn"] = _bn_entry(f"{full}.bn2", child.bn2)
            shortcut = _walk(child.shortcut, f"{full}.shortcut") if isinstance(child.shortcut, nn.Sequential) else []
            ops.append({"op": "residual", "name": full, "body": body, "shortcut": shortcut})
        elif isinstance(child, nn.Sequential):
            ops += _walk(child, full)
        else:
            raise ExportError(f"{full}: {type(child).__name__} is not supported by the export")
        i += 1
    return ops


def _supported() -> tuple[type, ...]:
    from lottery.models.convnets import ConvNet
    from lottery.models.lenet import LeNet
    from lottery.models.resnet_cifar import CifarResNet
    from lottery.models.vgg import VGG

    return (ConvNet, VGG, LeNet, CifarResNet)


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """The op list of a supported model (names are the model's module names)."""
    if not isinstance(model, _supported()):
        names = ", ".join(t.__name__ for t in _supported())
        raise ExportError(f"cannot export {type(model).__name__}: supported families are {names} "
                          "(conv2/4/6, vgg11/16/19, CIFAR resnet20/32/56, lenet_300_100)")
    return _walk(model, "")


def _layer_ops(ops: list[dict[str, Any]]):
    for op in ops:
        if op["op"] == "residual":
            yield from _layer_ops(op["body"])
            yield from _layer_ops(op["shortcut"])
        elif op["op"] in ("conv", "linear", "conv_blocks", "linear_blocks", "linear_csr"):
            yield op


# ============================================================================ channel groups


class _Groups:
    """Which layers write into the same tensor (residual additions): a union-find over output slots."""

    INPUT = 0

    def __init__(self, ops: list[dict[str, Any]]):
        self.parent: list[int] = [0]
        self.slot_of: dict[str, int] = {}
        self.output = self._flow(ops, self.INPUT)

    def _new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def _flow(self, ops, cur: int) -> int:
        for op in ops:
            if op["op"] in ("conv", "linear", "conv_blocks", "linear_blocks", "linear_csr"):
                cur = self._new()
                self.slot_of[op["name"]] = cur
            elif op["op"] == "residual":
                body = self._flow(op["body"], cur)
                short = self._flow(op["shortcut"], cur) if op["shortcut"] else cur
                a, b = self.find(body), self.find(short)
                self.parent[max(a, b)] = min(a, b)
                cur = min(a, b)
        return cur

    def group(self, name: str) -> int:
        return self.find(self.slot_of[name])

    def members(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for name in self.slot_of:
            out.setdefault(self.group(name), []).append(name)
        return out

    def pinned(self, g: int) -> bool:
        """The network's input and output keep every channel."""
        return g in (self.find(self.INPUT), self.find(self.output))


def coupled_layers(model: nn.Module) -> list[list[str]]:
    """Weight names of the layers whose outputs are added together (one list per residual stage): refill
    must give them the same channels for the stage to shrink. Empty for networks without residuals."""
    groups = _Groups(describe(model))
    return [[f"{n}.weight" for n in names] for names in groups.members().values() if len(names) > 1]


def dead_channel_params(model: nn.Module, mask: Mask) -> Mask:
    """Mask entries for the bias and BatchNorm weight/bias of every output channel whose weight row the
    mask removes entirely (kept = False there), so that such a channel outputs exactly zero and the dense
    export can drop it. The network's output layer keeps its biases."""
    ops = describe(model)
    groups = _Groups(ops)
    out: dict[str, torch.Tensor] = {}
    for op in _layer_ops(ops):
        key = f"{op['name']}.weight"
        if key not in mask or groups.pinned(groups.group(op["name"])):
            continue
        alive = mask[key].reshape(mask[key].shape[0], -1).any(1).cpu()
        if bool(alive.all()):
            continue
        if op.get("bias"):
            out[f"{op['name']}.bias"] = alive.clone()
        if op.get("bn"):
            out[f"{op['bn']['name']}.weight"] = alive.clone()
            out[f"{op['bn']['name']}.bias"] = alive.clone()
    return Mask(out)


# ============================================================================ surgery


def _dead_rows(op: dict[str, Any], state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    w = state[f"{op['name']}.weight"]
    dead = ~w.reshape(w.shape[0], -1).ne(0).any(1)
    b = state[f"{op['name']}.bias"] if op.get("bias") else torch.zeros(w.shape[0], dtype=w.dtype)
    if op.get("bn"):
        bn = op["bn"]["name"]
        gamma, beta, mean = state[f"{bn}.weight"], state[f"{bn}.bias"], state[f"{bn}.running_mean"]
        const_zero = (beta == 0) & ((gamma == 0) | (mean == b))
    else:
        const_zero = b == 0
    return dead & const_zero


def _flatten_size(ops: list[dict[str, Any]], i: int, channels: int) -> int:
    for op in ops[i + 1:]:
        if op["op"] in ("linear",):
            if op["in"] % channels:
                raise ExportError(f"{op['name']}: {op['in']} inputs is not a multiple of {channels} channels")
            return op["in"] // channels
        if op["op"] not in ("relu",):
            break
    raise ExportError("a flatten must be followed by a Linear layer")
