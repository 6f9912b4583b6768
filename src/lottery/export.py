"""Export a ticket as a network that is actually smaller or sparser: channel surgery, dense blocks, CSR
(docs/methods.md, "Structured tickets").

A supported model (the registered ``conv2/4/6``, ``vgg11/16/19``, CIFAR ``resnet20/32/56``,
``lenet_300_100``) is first *described* as a small JSON program: a list of ops (``conv`` with its
BatchNorm, ``linear``, ``relu``, ``maxpool``, ``avgpool``, ``flatten``, and ``residual`` with a ``body``
and a ``shortcut`` list, whose outputs are added and passed through a ReLU). Every op carries its layer
shapes. The exported network is rebuilt from that description alone and its tensors are loaded from
safetensors: loading never unpickles anything.

Three exports (``export_model(model, mask, to=...)``):

* ``dense`` (channel surgery): an output channel (or neuron) is removed when its output is exactly zero
  for every input: its weight row is all zero, its bias is zero and its BatchNorm gives zero for a zero
  input (``gamma = beta = 0``, or ``beta = 0`` and ``running_mean = bias``). The next layer's input
  channels go with it (after a ``flatten``, the channel's ``H x W`` features). Channels that are *added*
  in a residual network (a stage's stem or projection shortcut and the last conv of each of its blocks)
  form one group that keeps the union of their live channels, so the additions stay valid: a residual
  stage shrinks only as a whole, the inner conv of a block (``conv1``'s outputs, ``conv2``'s inputs)
  freely. Structured tickets get such exactly-dead channels because the pipeline trains them with
  :func:`dead_channel_params` (the bias and BatchNorm of a channel the mask removes are pruned too).
  The network's outputs are always kept.
* ``blocks``: after the surgery, each masked layer runs as one matrix product per dense block; blocks are
  the groups of rows with identical kept columns (for a regroup ticket, exactly its blocks). A conv layer
  does im2col (``unfold``) once, then ``W_block @ patches[:, cols]`` per block; when every block of a
  conv is made of whole input channels (regroup with ``columns='channel'``), each block is instead a
  small dense conv over its input channels (no im2col: the CPU's conv kernels do the product).
* ``csr``: after the surgery, each masked Linear layer keeps its weights as a ``torch.sparse_csr`` matrix.

Every export is checked against the masked network on random inputs: the largest absolute difference of
the outputs must stay within ``1e-4 x max(1, max |reference output|)`` (float32; the orders of summation
differ). The check's result is stored in the JSON description.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lottery.errors import CheckpointError, ConfigError, LotteryError
from lottery.io import load_tensors, read_json, save_tensors, write_json
from lottery.masks import Mask

__all__ = [
    "EXPORT_KINDS",
    "BlockConv2d",
    "BlockLinear",
    "CSRLinear",
    "ExportError",
    "Exported",
    "blocks_from_mask",
    "build_network",
    "coupled_layers",
    "dead_channel_params",
    "describe",
    "export_model",
    "load_export",
    "max_output_difference",
    "save_export",
]

EXPORT_KINDS = ("dense", "blocks", "csr")
FORMAT = "lottery.export"
FORMAT_VERSION = 1
RTOL = 1e-4  # the check's tolerance, relative to max(1, max |reference output|)


class ExportError(LotteryError):
    """A model cannot be exported, or the exported network does not compute what the masked one does."""


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


@dataclass
class _Surgery:
    state: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    groups: _Groups
    kept: dict[int, torch.Tensor]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self, ops, cur: torch.Tensor, n_orig: int) -> tuple[list[dict[str, Any]], torch.Tensor, int]:
        out = []
        for i, op in enumerate(ops):
            kind = op["op"]
            if kind in ("conv", "linear"):
                op, cur, n_orig = self._layer(op, cur, n_orig)
            elif kind == "flatten":
                s = _flatten_size(ops, i, n_orig)
                cur = (cur.unsqueeze(1) * s + torch.arange(s)).reshape(-1)
                n_orig *= s
                op = dict(op)
            elif kind == "residual":
                body, b_cur, b_n = self.run(op["body"], cur, n_orig)
                short, s_cur, s_n = self.run(op["shortcut"], cur, n_orig) if op["shortcut"] else ([], cur, n_orig)
                if not torch.equal(b_cur, s_cur) or b_n != s_n:  # internal invariant of the groups
                    raise ExportError(f"{op['name']}: the residual addition's channels do not match")
                op = {**op, "body": body, "shortcut": short}
                cur, n_orig = b_cur, b_n
            else:
                op = dict(op)
            out.append(op)
        return out, cur, n_orig

    def _layer(self, op, cur: torch.Tensor, n_orig: int):
        name = op["name"]
        if op["in"] != n_orig:
            raise ExportError(f"{name}: expects {op['in']} inputs, the network gives it {n_orig}")
        keep = self.kept[self.groups.group(name)]
        w = self.state[f"{name}.weight"]
        self.state[f"{name}.weight"] = w[keep][:, cur].contiguous()
        if f"{name}.weight" in self.masks:
            self.masks[f"{name}.weight"] = self.masks[f"{name}.weight"][keep][:, cur].contiguous()
        if op.get("bias"):
            self.state[f"{name}.bias"] = self.state[f"{name}.bias"][keep].contiguous()
        new = {**op, "in": int(len(cur)), "out": int(len(keep))}
        if op.get("bn"):
            bn = op["bn"]["name"]
            for t in ("weight", "bias", "running_mean", "running_var"):
                self.state[f"{bn}.{t}"] = self.state[f"{bn}.{t}"][keep].contiguous()
        self.layers[name] = {"in": int(len(cur)), "in_original": op["in"], "out": int(len(keep)),
                             "out_original": op["out"], "kept_out": keep.tolist()}
        return new, keep, op["out"]


def _shrink(ops, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], in_channels: int):
    groups = _Groups(ops)
    by_name = {op["name"]: op for op in _layer_ops(ops)}
    kept: dict[int, torch.Tensor] = {}
    for g, names in groups.members().items():
        rows = by_name[names[0]]["out"]
        if groups.pinned(g):
            kept[g] = torch.arange(rows)
            continue
        alive = torch.zeros(rows, dtype=torch.bool)
        for n in names:
            alive |= ~_dead_rows(by_name[n], state)
        if not alive.any():
            alive[0] = True  # a zero-width layer is not a valid module; one zero channel is exact
        kept[g] = alive.nonzero().flatten()
    surgery = _Surgery(state, masks, groups, kept)
    new_ops, _, _ = surgery.run(ops, torch.arange(in_channels), in_channels)
    return new_ops, surgery.layers


# ============================================================================ blocks and CSR


def blocks_from_mask(m2: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """The dense blocks of a ``rows x cols`` bool matrix: rows grouped by identical kept columns (rows
    without any are left out), in order of their first row. The union of the blocks is the matrix."""
    groups: dict[bytes, list[int]] = {}
    m2 = m2.cpu()
    for r in range(m2.shape[0]):
        row = m2[r]
        if not bool(row.any()):
            continue
        groups.setdefault(row.numpy().tobytes(), []).append(r)
    return [(rows, m2[rows[0]].nonzero().flatten().tolist()) for rows in groups.values()]


def _channel_aligned(blocks, kernel: int) -> bool:
    """Whether every block's columns are whole input channels (all ``kernel`` weights of each)."""
    for _, cols in blocks:
        if len(cols) % kernel:
            return False
        chans = {c // kernel for c in cols}
        if len(chans) * kernel != len(cols):
            return False
    return True


def _to_blocks(ops, state, masks) -> list[dict[str, Any]]:
    out = []
    for op in ops:
        if op["op"] == "residual":
            op = {**op, "body": _to_blocks(op["body"], state, masks), "shortcut": _to_blocks(op["shortcut"], state, masks)}
        elif op["op"] in ("conv", "linear") and f"{op['name']}.weight" in masks:
            name = op["name"]
            m = masks[f"{name}.weight"]
            m2 = m.reshape(m.shape[0], -1)
            if bool(m2.all()):
                out.append(op)
                continue
            w = state.pop(f"{name}.weight")
            w2 = w.reshape(m.shape[0], -1)
            blocks = blocks_from_mask(m2)
            kernel = int(m2.shape[1] // m.shape[1]) if op["op"] == "conv" else 1
            unit = "channel" if op["op"] == "conv" and _channel_aligned(blocks, kernel) else "element"
            shapes = []
            for i, (rows, cols) in enumerate(blocks):
                r = torch.tensor(rows)
                if unit == "channel":  # a small dense conv: these rows x these whole input channels
                    chans = torch.tensor(sorted({c // kernel for c in cols}))
                    state[f"{name}.block{i}.weight"] = w[r][:, chans].contiguous()
                    state[f"{name}.block{i}.cols"] = chans
                else:
                    c = torch.tensor(cols)
                    state[f"{name}.block{i}.weight"] = w2[r][:, c].contiguous()
                    state[f"{name}.block{i}.cols"] = c
                state[f"{name}.block{i}.rows"] = r
                shapes.append([len(rows), int(state[f"{name}.block{i}.cols"].numel())])
            op = {**op, "op": op["op"] + "_blocks", "blocks": shapes}
            if op["op"] == "conv_blocks":
                op["unit"] = unit
        out.append(op)
    return out


def _to_csr(ops, state, masks) -> list[dict[str, Any]]:
    out = []
    for op in ops:
        if op["op"] == "residual":
            op = {**op, "body": _to_csr(op["body"], state, masks), "shortcut": _to_csr(op["shortcut"], state, masks)}
        elif op["op"] == "linear" and f"{op['name']}.weight" in masks:
            name = op["name"]
            w = state.pop(f"{name}.weight") * masks[f"{name}.weight"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                csr = w.to_sparse_csr()
            # Masked entries are dropped; a kept weight that trained to exactly zero is kept as an explicit
            # zero only if the mask says so (to_sparse_csr drops every zero: the products are the same).
            state[f"{name}.crow_indices"] = csr.crow_indices().to(torch.int64)
            state[f"{name}.col_indices"] = csr.col_indices().to(torch.int64)
            state[f"{name}.values"] = csr.values()
            op = {**op, "op": "linear_csr", "nnz": int(csr.values().numel())}
        out.append(op)
    return out


# ============================================================================ modules


class _ConvBN(nn.Module):
    """A conv (dense or blocks) with its optional BatchNorm."""

    def __init__(self, conv: nn.Module, bn: nn.Module | None):
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x


class _Residual(nn.Module):
    def __init__(self, body: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.body = body
        self.shortcut = shortcut  # an empty Sequential is the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class _BlockBase(nn.Module):
    def __init__(self, out_features: int, blocks: list[list[int]], bias: bool, kernel: tuple[int, ...] = ()):
        super().__init__()
        self.out_features = out_features
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(r, c, *kernel)) for r, c in blocks])
        for i, (r, c) in enumerate(blocks):
            self.register_buffer(f"rows_{i}", torch.zeros(r, dtype=torch.int64))
            self.register_buffer(f"cols_{i}", torch.zeros(c, dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _index(self, kind: str) -> list[torch.Tensor]:
        return [getattr(self, f"{kind}_{i}") for i in range(len(self.weights))]

    def weights_per_position(self) -> int:
        """Multiply-accumulates per output position (lottery.cost): the blocks' weights."""
        return int(sum(w.numel() for w in self.weights))

    def _scatter(self, parts: list[torch.Tensor], like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Output rows of the blocks into an output of ``shape`` (rows on dim 1); rows of no block are 0."""
        y = like.new_zeros(shape)
        if parts:
            y.index_copy_(1, torch.cat(self._index("rows")), torch.cat(parts, 1))
        return y


class BlockLinear(_BlockBase):
    """A Linear layer as dense blocks: ``y[:, rows_b] = x[:, cols_b] @ W_b^T`` (+ bias)."""

    def __init__(self, in_features: int, out_features: int, blocks: list[list[int]], bias: bool = True):
        super().__init__(out_features, blocks, bias)
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x.index_select(1, c) @ w.t() for w, c in zip(self.weights, self._index("cols"))]
        y = self._scatter(parts, x, (x.shape[0], self.out_features))
        return y + self.bias if self.bias is not None else y


class BlockConv2d(_BlockBase):
    """A conv as dense blocks. ``unit='element'``: blocks of its im2col matrix; one ``unfold``, then
    ``W_b @ patches[:, cols_b]`` per block (columns index ``C_in x kh x kw`` in the order of
    ``weight.reshape(C_out, -1)``). ``unit='channel'``: each block is a small dense conv of its rows over
    its input channels ``cols_b`` (weights ``r x c x kh x kw``), run with the ordinary conv kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel, stride, padding, dilation,
                 blocks: list[list[int]], bias: bool = True, unit: str = "element"):
        kernel = tuple(_pair(kernel))
        super().__init__(out_channels, blocks, bias, kernel if unit == "channel" else ())
        if unit not in ("element", "channel"):
            raise CheckpointError(f"unknown block unit {unit!r}")
        self.unit = unit
        self.in_channels = in_channels
        self.kernel, self.stride, self.padding, self.dilation = (tuple(_pair(v)) for v in (kernel, stride, padding, dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        if self.unit == "channel":
            parts = [F.conv2d(x.index_select(1, c), wt, None, self.stride, self.padding, self.dilation)
                     for wt, c in zip(self.weights, self._index("cols"))]
            y = self._scatter(parts, x, (n, self.out_features, ho, wo))
            return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y
        patches = F.unfold(x, self.kernel, self.dilation, self.padding, self.stride)  # n x K x L
        parts = [torch.matmul(wt, patches.index_select(1, c)) for wt, c in zip(self.weights, self._index("cols"))]
        y = self._scatter(parts, x, (n, self.out_features, ho * wo))
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        return y.view(n, self.out_features, ho, wo)


class CSRLinear(nn.Module):
    """A Linear layer whose weight is a ``torch.sparse_csr`` matrix: ``y = (W_csr @ x^T)^T + b``."""

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=torch.int64))
        self.register_buffer("col_indices", torch.zeros(nnz, dtype=torch.int64))
        self.values = nn.Parameter(torch.zeros(nnz))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def weights_per_position(self) -> int:
        """Multiply-accumulates per example (lottery.cost): the stored non-zeros."""
        return int(self.values.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                        (self.out_features, self.in_features))
        y = (w @ x.t()).t()
        return y + self.bias if self.bias is not None else y


def _module(op: dict[str, Any]) -> nn.Module:
    kind = op["op"]
    if kind in ("conv", "conv_blocks"):
        if kind == "conv":
            conv: nn.Module = nn.Conv2d(op["in"], op["out"], op["kernel"], op["stride"], op["padding"],
                                        op["dilation"], bias=op["bias"])
        else:
            conv = BlockConv2d(op["in"], op["out"], op["kernel"], op["stride"], op["padding"], op["dilation"],
                               op["blocks"], bias=op["bias"], unit=op.get("unit", "element"))
        bn = None
        if op.get("bn"):
            bn = nn.BatchNorm2d(op["out"], eps=op["bn"]["eps"], momentum=op["bn"]["momentum"])
        return _ConvBN(conv, bn)
    if kind == "linear":
        return nn.Linear(op["in"], op["out"], bias=op["bias"])
    if kind == "linear_blocks":
        return BlockLinear(op["in"], op["out"], op["blocks"], bias=op["bias"])
    if kind == "linear_csr":
        return CSRLinear(op["in"], op["out"], op["nnz"], bias=op["bias"])
    if kind == "relu":
        return nn.ReLU()
    if kind == "maxpool":
        return nn.MaxPool2d(op["kernel"], op["stride"], op["padding"], op["dilation"], ceil_mode=op["ceil_mode"])
    if kind == "avgpool":
        return nn.AdaptiveAvgPool2d(tuple(op["output_size"]))
    if kind == "flatten":
        return nn.Flatten()
    if kind == "residual":
        return _Residual(build_network(op["body"]), build_network(op["shortcut"]))
    raise CheckpointError(f"unknown op {kind!r} in an export description")


def build_network(ops: list[dict[str, Any]]) -> nn.Sequential:
    """The network an op list describes, with zero-initialised tensors (load them afterwards)."""
    return nn.Sequential(*[_module(op) for op in ops])


@torch.no_grad()
def _fill(net: nn.Sequential, ops: list[dict[str, Any]], state: Mapping[str, torch.Tensor]) -> None:
    """Copy the (sliced, original-named) tensors of ``state`` into the modules built from ``ops``."""
    for module, op in zip(net, ops):
        kind, name = op["op"], op.get("name")
        if kind == "residual":
            _fill(module.body, op["body"], state)
            _fill(module.shortcut, op["shortcut"], state)
            continue
        if kind in ("conv", "conv_blocks"):
            target = module.conv
            if op.get("bn"):
                bn = op["bn"]["name"]
                for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    getattr(module.bn, t).copy_(state[f"{bn}.{t}"])
        elif kind in ("linear", "linear_blocks", "linear_csr"):
            target = module
        else:
            continue
        if kind in ("conv", "linear"):
            target.weight.copy_(state[f"{name}.weight"])
        elif kind.endswith("_blocks"):
            for i in range(len(op["blocks"])):
                target.weights[i].copy_(state[f"{name}.block{i}.weight"])
                getattr(target, f"rows_{i}").copy_(state[f"{name}.block{i}.rows"])
                getattr(target, f"cols_{i}").copy_(state[f"{name}.block{i}.cols"])
        else:
            target.crow_indices.copy_(state[f"{name}.crow_indices"])
            target.col_indices.copy_(state[f"{name}.col_indices"])
            target.values.copy_(state[f"{name}.values"])
        if op.get("bias"):
            target.bias.copy_(state[f"{name}.bias"])


# ============================================================================ export, check, files


@dataclass
class Exported:
    """An exported network and its JSON description (``ops`` plus shapes, sizes and the check)."""

    module: nn.Module
    description: dict[str, Any]


@torch.no_grad()
def max_output_difference(reference: nn.Module, exported: nn.Module, input_shape, n: int = 8, seed: int = 0) -> dict[str, float]:
    """Largest |reference(x) - exported(x)| over ``n`` random normal inputs (both in eval mode), with the
    largest |reference(x)| for scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *input_shape, generator=g)
    was = reference.training, exported.training
    reference.eval()
    exported.eval()
    try:
        ref, got = reference(x), exported(x)
    finally:
        reference.train(was[0])
        exported.train(was[1])
    return {"max_abs_diff": float((ref - got).abs().max()), "max_abs_reference": float(ref.abs().max()), "inputs": n}


def _count(module: nn.Module) -> dict[str, int]:
    total = nonzero = 0
    for name, t in module.state_dict().items():
        if not t.is_floating_point() or name.endswith(("running_mean", "running_var")):
            continue
        total += t.numel()
        nonzero += int(t.ne(0).sum())
    return {"parameters": total, "nonzero_parameters": nonzero}


def export_model(model: nn.Module, mask: Mask | None = None, to: str = "dense", *, check_inputs: int = 8,
                 seed: int = 0) -> Exported:
    """Export ``model`` (plain or hard-masked, with its trained weights) under ``mask`` (default: the
    model's own hard masks, else no mask). Raises :class:`ExportError` if the exported network's outputs
    differ from the masked network's beyond the tolerance."""
    from lottery import masking

    if to not in EXPORT_KINDS:
        raise ConfigError(f"export kind must be one of {', '.join(EXPORT_KINDS)}, got {to!r}")
    ops = describe(model)
    state = masking.to_plain_state_dict(model.state_dict())
    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    if mask is None:
        mask = masking.current_mask(model)
    masks = {k: v.cpu() for k, v in mask.items() if k.endswith(".weight") and k in state}
    for k, m in mask.items():
        if k not in state:
            raise ExportError(f"the mask names {k}, which the model does not have")
        state[k] = state[k].masked_fill(~m.cpu(), 0)
    input_shape = tuple(int(s) for s in getattr(model, "input_shape"))
    new_ops, layers = _shrink(ops, state, masks, input_shape[0])
    if to == "blocks":
        new_ops = _to_blocks(new_ops, state, masks)
    elif to == "csr":
        new_ops = _to_csr(new_ops, state, masks)
    net = build_network(new_ops)
    _fill(net, new_ops, state)
    net.eval()

    reference = _masked_reference(model, mask)  # a plain masked copy; the caller's model is untouched
    check = max_output_difference(reference, net, input_shape, n=check_inputs, seed=seed)
    check["tolerance"] = RTOL * max(1.0, check["max_abs_reference"])
    check["ok"] = check["max_abs_diff"] <= check["tolerance"]
    if not check["ok"]:
        raise ExportError(f"the exported ({to}) network differs from the masked one by {check['max_abs_diff']:.3g} "
                          f"(tolerance {check['tolerance']:.3g})")
    original = _count(reference)
    description = {
        "format": FORMAT, "version": FORMAT_VERSION, "kind": to, "family": type(model).__name__,
        "input_shape": list(input_shape), "num_classes": int(new_ops[-1]["out"]) if new_ops else None,
        "ops": new_ops, "layers": layers, "check": check,
        "size": {"original_parameters": original["parameters"],
                 "original_nonzero_parameters": original["nonzero_parameters"], **_count(net)},
    }
    return Exported(net, description)


@torch.no_grad()
def _masked_reference(model: nn.Module, mask: Mask) -> nn.Module:
    import copy

    from lottery import masking

    ref = copy.deepcopy(model)
    masking.remove_masks(ref)
    params = dict(ref.named_parameters())
    for k, m in mask.items():
        params[k].masked_fill_(~m.to(params[k].device), 0)
    return ref.cpu().eval()


def save_export(folder: str | Path, exported: Exported, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (the exported module's tensors) and ``model.json`` (its description
    plus ``extra``) into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "model.safetensors", exported.module.state_dict(), metadata={"format": FORMAT})
    write_json(folder / "model.json", {**exported.description, **(extra or {})})
    return folder


def load_export(folder: str | Path) -> Exported:
    """Rebuild an exported network from ``model.json`` and load ``model.safetensors`` (no unpickling)."""
    folder = Path(folder)
    desc_path, tensors_path = folder / "model.json", folder / "model.safetensors"
    if not desc_path.exists() or not tensors_path.exists():
        raise CheckpointError(f"{folder} is not an export folder (model.json and model.safetensors expected)")
    desc = read_json(desc_path)
    if desc.get("format") != FORMAT:
        raise CheckpointError(f"{desc_path} is not a lottery export description (format {desc.get('format')!r})")
    if int(desc.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{desc_path} has format version {desc['version']}; this lottery reads up to {FORMAT_VERSION}")
    net = build_network(desc["ops"])
    try:
        net.load_state_dict(load_tensors(tensors_path), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{tensors_path} does not fit {desc_path}: {exc}") from None
    net.eval()
    return Exported(net, desc)
