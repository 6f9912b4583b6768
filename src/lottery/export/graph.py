"""Reading a model as a list of ops (convs with their BatchNorms, linears, pooling, flattens, residual stages)
from its traced graph, and finding the layers whose output channels must shrink together."""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from lottery.masks import Mask
from lottery.export._base import ExportError


# ============================================================================ describing a model


SUPPORTED = ("Conv2d (groups=1, zero padding) with an optional BatchNorm2d, BatchNorm2d, Linear, ReLU, "
             "max/avg pooling, adaptive average pooling, flatten/view/reshape to (N, -1), residual additions "
             "of two branches, Dropout and Identity")


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _conv_op(name: str, conv: nn.Conv2d) -> dict[str, Any]:
    if conv.groups != 1 or not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
        raise ExportError(f"cannot export: Conv2d {name!r} has groups={conv.groups}, padding={conv.padding!r}, "
                          f"padding_mode={conv.padding_mode!r}; only plain convs (groups=1, numeric zero padding) "
                          "can be exported")
    return {"op": "conv", "name": name, "in": conv.in_channels, "out": conv.out_channels,
            "kernel": _pair(conv.kernel_size), "stride": _pair(conv.stride), "padding": _pair(conv.padding),
            "dilation": _pair(conv.dilation), "bias": conv.bias is not None, "bn": None}


def _bn_entry(name: str, bn: nn.BatchNorm2d) -> dict[str, Any]:
    if not bn.affine or not bn.track_running_stats:
        raise ExportError(f"cannot export: BatchNorm2d {name!r} has no affine parameters or no running statistics")
    return {"name": name, "eps": float(bn.eps), "momentum": bn.momentum}


# Modules the tracer keeps whole (their internals, hard-mask hooks included, are not traced).
_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
           nn.Flatten, nn.Identity, nn.modules.dropout._DropoutNd)
_RELU_FNS = (F.relu, torch.relu, torch.relu_)
_DROPOUT_FNS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout)
_ADD_FNS = (operator.add, operator.iadd, torch.add)
_FLATTEN_FNS = (torch.flatten, torch.reshape)
_FLATTEN_METHODS = ("flatten", "view", "reshape")


def _max_pool_args(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return locals()


def _avg_pool_args(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                   divisor_override=None):
    return locals()


def _adaptive_args(input, output_size):
    return locals()


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


class _Reader:
    """Turns a traced graph into the op list: a chain of single-input ops, where a node read by two
    branches that meet again in an addition becomes a ``residual`` op (``body`` and ``shortcut`` lists)."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int]):
        self.model_name = type(model).__name__
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:  # torch.fx reports data-dependent control flow and the like this way
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"cannot export {self.model_name}: torch.fx cannot trace it ({first}); the channel "
                              f"export reads a network's graph and supports {SUPPORTED}") from None
        self.gm = fx.GraphModule(model, graph)
        self.modules = dict(self.gm.named_modules())
        self._propagate_shapes(model, input_shape)
        self.nodes = list(graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ExportError(f"cannot export {self.model_name}: its forward takes {len(inputs)} inputs; "
                              "the export needs networks of one input tensor")
        self.input = inputs[0]
        self.output = next(n for n in self.nodes if n.op == "output")
        result = self.output.args[0]
        if not isinstance(result, fx.Node) or not self._is_tensor(result):
            raise ExportError(f"cannot export {self.model_name}: its forward must return one tensor")
        self.result = result
        self.layers: set[str] = set()

    def _propagate_shapes(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(torch.zeros(2, *input_shape, device=device, dtype=dtype))
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"cannot export {self.model_name}: running it on an input of shape "
                              f"{tuple(input_shape)} failed ({first_line}); pass the network's input_shape") from None
        finally:
            model.train(was)

    # -- nodes

    @staticmethod
    def _is_tensor(node: fx.Node) -> bool:
        return isinstance(node.meta.get("tensor_meta"), TensorMetadata)

    @staticmethod
    def _shape(node: fx.Node) -> tuple[int, ...]:
        return tuple(node.meta["tensor_meta"].shape)

    def _users(self, node: fx.Node) -> list[fx.Node]:
        """The nodes that read ``node`` as a tensor (shape queries such as ``x.size(0)`` are not)."""
        return [u for u in node.users if u.op == "output" or self._is_tensor(u)]

    def _tensor_args(self, node: fx.Node) -> list[fx.Node]:
        args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and self._is_tensor(a)]
        return list(dict.fromkeys(args))

    def _where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path = list(stack.values())[-1][0]
            return str(path) if path else "the top module"
        return "the top module"

    def _op_name(self, node: fx.Node) -> str:
        if node.op == "call_module":
            m = self.modules[node.target]
            prefix = "nn." if type(m).__module__.startswith("torch.nn") else ""
            return f"{prefix}{type(m).__name__}"
        if node.op == "call_method":
            return f"Tensor.{node.target}"
        if node.op == "call_function":
            fn = node.target
            name = getattr(fn, "__name__", str(fn))
            mod = getattr(fn, "__module__", None) or ""
            if fn in (operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv,
                      operator.getitem, operator.matmul) or mod == "_operator":
                return f"operator.{name}"
            if mod.startswith("torch.nn.functional"):
                return f"F.{name}"
            return f"torch.{name}" if (mod.startswith("torch") or hasattr(torch, name)) else f"{mod}.{name}"
        if node.op == "get_attr":
            return f"the tensor attribute {node.target}"
        if node.op == "placeholder":
            return "the network's input"
        return node.op

    def refuse(self, node: fx.Node, why: str = "") -> ExportError:
        return ExportError(
            f"cannot export {self.model_name}: {self._op_name(node)} at node {node.name!r} (in {self._where(node)}) "
            f"{why or 'is not supported by the channel export'}; the export handles {SUPPORTED} "
            "(rewrite that part of the network with these, or keep using the masked network)")

    # -- the op of one node

    def _bound(self, node: fx.Node, sig: Callable) -> dict[str, Any]:
        try:
            bound = inspect.signature(sig).bind(*node.args, **node.kwargs)
        except TypeError:
            raise self.refuse(node, "has arguments the export does not understand") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def _kind(self, node: fx.Node) -> str:
        """What a node does to its tensor input: conv, linear, bn, relu, maxpool, avgpool2d, avgpool,
        flatten, skip, add or '' (not supported)."""
        if node.op == "call_module":
            m = self.modules[node.target]
            for cls, kind in ((nn.Conv2d, "conv"), (nn.Linear, "linear"), (nn.BatchNorm2d, "bn"), (nn.ReLU, "relu"),
                              (nn.MaxPool2d, "maxpool"), (nn.AvgPool2d, "avgpool2d"), (nn.AdaptiveAvgPool2d, "avgpool"),
                              (nn.Flatten, "flatten"), (nn.Identity, "skip"), (nn.modules.dropout._DropoutNd, "skip")):
                if isinstance(m, cls):
                    return kind
            return ""
        if node.op == "call_function":
            fn = node.target
            if fn in _RELU_FNS:
                return "relu"
            if fn in _DROPOUT_FNS:
                return "skip"
            if fn in _ADD_FNS:
                return "add"
            if fn in (F.max_pool2d, torch.max_pool2d):
                return "maxpool"
            if fn in (F.avg_pool2d, torch._C._nn.avg_pool2d):
                return "avgpool2d"
            if fn is F.adaptive_avg_pool2d:
                return "avgpool"
            if fn in _FLATTEN_FNS:
                return "flatten"
            return ""
        if node.op == "call_method":
            t = node.target
            if t in ("relu", "relu_"):
                return "relu"
            if t in ("add", "add_"):
                return "add"
            if t in _FLATTEN_METHODS:
                return "flatten"
            if t == "contiguous":
                return "skip"
        return ""

    def _single_op(self, node: fx.Node, kind: str) -> dict[str, Any] | None:
        """The op of a single-input node (None for an identity)."""
        x = self._tensor_args(node)
        if len(x) != 1:
            raise self.refuse(node, f"reads {len(x)} tensors")
        in_shape, out_shape = self._shape(x[0]), self._shape(node)
        m = self.modules.get(node.target) if node.op == "call_module" else None
        if kind == "skip":
            return None
        if kind == "relu":
            return {"op": "relu"}
        if kind in ("conv", "linear", "bn"):
            name = str(node.target)
            if name in self.layers:
                raise self.refuse(node, "is called a second time (shared weights)")
            self.layers.add(name)
            if kind == "conv":
                if len(in_shape) != 4:
                    raise self.refuse(node, f"gets a tensor of shape {list(in_shape)}")
                return _conv_op(name, m)
            if kind == "bn":
                return {"op": "batchnorm", "bn": _bn_entry(name, m), "name": name, "channels": int(m.num_features)}
            if len(in_shape) != 2:
                raise self.refuse(node, f"gets a tensor of shape {list(in_shape)} (flatten it to (N, features) first)")
            return {"op": "linear", "name": name, "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
        if kind == "flatten":
            if len(in_shape) == 2 and out_shape == in_shape:
                return None
            if len(out_shape) != 2 or out_shape[0] != in_shape[0] or out_shape[1] != math.prod(in_shape[1:]):
                raise self.refuse(node, f"turns shape {list(in_shape)} into {list(out_shape)}, not into (N, -1)")
            return {"op": "flatten"}
        if len(in_shape) != 4:
            raise self.refuse(node, f"gets a tensor of shape {list(in_shape)}")
        if kind == "maxpool":
            a = ({"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "dilation": m.dilation,
                  "ceil_mode": m.ceil_mode, "return_indices": m.return_indices} if m is not None
                 else self._bound(node, _max_pool_args))
            if a["return_indices"]:
                raise self.refuse(node, "returns indices")
            return {"op": "maxpool", "kernel": _pair(a["kernel_size"]), "stride": _pair(a["stride"] or a["kernel_size"]),
                    "padding": _pair(a["padding"]), "dilation": _pair(a["dilation"]), "ceil_mode": bool(a["ceil_mode"])}
        if kind == "avgpool2d":
            a = ({"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "ceil_mode": m.ceil_mode,
                  "count_include_pad": m.count_include_pad, "divisor_override": m.divisor_override} if m is not None
                 else self._bound(node, _avg_pool_args))
            return {"op": "avgpool2d", "kernel": _pair(a["kernel_size"]), "stride": _pair(a["stride"] or a["kernel_size"]),
                    "padding": _pair(a["padding"]), "ceil_mode": bool(a["ceil_mode"]),
                    "count_include_pad": bool(a["count_include_pad"]), "divisor_override": a["divisor_override"]}
        if kind == "avgpool":
            size = m.output_size if m is not None else self._bound(node, _adaptive_args)["output_size"]
            size = [size, size] if not isinstance(size, (tuple, list)) else list(size)
            if any(s is None for s in size):
                raise self.refuse(node, "has an output size of None")
            return {"op": "avgpool", "output_size": _pair(size)}
        raise self.refuse(node)

    # -- the chain of ops from one value to another

    def _reaches(self, start: fx.Node, target: fx.Node) -> bool:
        limit = self.order[target]
        todo, seen = [start], set()
        while todo:
            n = todo.pop()
            if n is target:
                return True
            if n in seen or self.order[n] > limit:
                continue
            seen.add(n)
            todo += self._users(n)
        return False

    def _join(self, fork: fx.Node) -> fx.Node:
        """The first node that every path from ``fork`` to the output passes through."""
        for cand in self.nodes[self.order[fork] + 1:]:
            if cand.op == "output" or not self._reaches(fork, cand):
                continue
            todo, seen, bypass = [fork], set(), False
            while todo and not bypass:
                n = todo.pop()
                if n in seen or n is cand:
                    continue
                seen.add(n)
                if n.op == "output":
                    bypass = True
                todo += self._users(n)
            if not bypass:
                return cand
        raise self.refuse(fork, "feeds branches that never meet again")

    def chain(self, cur: fx.Node, stop: fx.Node, first: fx.Node | None = None) -> list[dict[str, Any]]:
        """The ops that turn the value of node ``cur`` into the value of node ``stop`` (``first``: the
        user of ``cur`` to follow, when ``cur`` feeds two branches)."""
        ops: list[dict[str, Any]] = []
        while cur is not stop:
            users = [first] if first is not None else self._users(cur)
            first = None
            if len(users) == 1:
                node = users[0]
                kind = self._kind(node)
                if node.op == "output":
                    raise self.refuse(stop, "is not reached along one path of single-input operations")
                if not kind:
                    raise self.refuse(node)
                if kind == "add":
                    raise self.refuse(node, "adds tensors that are not the two branches of a residual connection"
                                      if len(self._tensor_args(node)) == 2 else "adds a constant")
                op = self._single_op(node, kind)
                if op is not None and op["op"] == "conv":
                    after = self._users(node)
                    if node is not stop and len(after) == 1 and self._kind(after[0]) == "bn":
                        bn_node = after[0]
                        if str(bn_node.target) in self.layers:
                            raise self.refuse(bn_node, "is called a second time (shared weights)")
                        self.layers.add(str(bn_node.target))
                        op["bn"] = _bn_entry(str(bn_node.target), self.modules[bn_node.target])
                        node = bn_node
                if op is not None:
                    ops.append(op)
                cur = node
            elif len(users) == 2:
                join = self._join(cur)
                if self.order[join] > self.order[stop]:
                    raise self.refuse(cur, "feeds a tensor past the end of the residual block it is in")
                args = self._tensor_args(join)
                if self._kind(join) != "add" or len(args) != 2:
                    raise self.refuse(join)
                if any(a is not cur and not self._reaches(cur, a) for a in args):
                    raise self.refuse(join, "adds a tensor from outside the residual block")
                branches = []
                for a in args:
                    if a is cur:
                        branches.append([])
                        continue
                    starts = [u for u in users if u is a or self._reaches(u, a)]
                    if len(starts) != 1:
                        raise self.refuse(join, "joins branches that share layers")
                    branches.append(self.chain(cur, a, first=starts[0]))
                body, shortcut = branches if branches[0] else branches[::-1]  # an identity branch is the shortcut
                where = self._where(join)
                op = {"op": "residual", "name": join.name if where == "the top module" else where, "body": body,
                      "shortcut": shortcut, "relu": False}
                cur = join
                after = self._users(join)
                if join is not stop and len(after) == 1 and self._kind(after[0]) == "relu":
                    op["relu"] = True
                    cur = after[0]
                ops.append(op)
            else:
                raise self.refuse(cur, f"feeds {len(users)} branches (the export handles two-branch residual "
                                  "additions only)")
        return ops


def describe(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The op list of ``model`` read from its torch.fx graph (names are the model's module names).
    ``input_shape`` (C, H, W) defaults to ``model.input_shape``. Raises :class:`ExportError` naming the
    first operation that the channel export cannot handle."""
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        raise ExportError(f"cannot export {type(model).__name__}: its input shape is unknown; pass "
                          "input_shape=(channels, height, width) (or give the model an input_shape attribute)")
    reader = _Reader(model, tuple(int(s) for s in input_shape))
    return reader.chain(reader.input, reader.result)


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
        self.fixed: list[int] = []  # slots read by a BatchNorm of its own: their channels are all kept
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
            elif op["op"] == "batchnorm":  # a zero channel would come out as a constant: keep every channel
                self.fixed.append(cur)
        return cur

    def group(self, name: str) -> int:
        return self.find(self.slot_of[name])

    def members(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for name in self.slot_of:
            out.setdefault(self.group(name), []).append(name)
        return out

    def pinned(self, g: int) -> bool:
        """The network's input and output, and what a lone BatchNorm reads, keep every channel."""
        return g in {self.find(s) for s in (self.INPUT, self.output, *self.fixed)}


def coupled_layers(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[list[str]]:
    """Weight names of the layers whose outputs are added together (one list per residual stage): refill
    must give them the same channels for the stage to shrink. Empty for networks without residuals."""
    groups = _Groups(describe(model, input_shape))
    return [[f"{n}.weight" for n in names] for names in groups.members().values() if len(names) > 1]


def dead_channel_params(model: nn.Module, mask: Mask, input_shape: Sequence[int] | None = None) -> Mask:
    """Mask entries for the bias and BatchNorm weight/bias of every output channel whose weight row the
    mask removes entirely (kept = False there), so that such a channel outputs exactly zero and the dense
    export can drop it. The network's output layer keeps its biases."""
    ops = describe(model, input_shape)
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
