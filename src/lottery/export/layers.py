"""The layers an exported network is built from (dense blocks, CSR linears, conv+BN, residual stages) and
building that network from its ops."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lottery.errors import CheckpointError
from lottery.export.graph import _pair


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
    """``body(x) + shortcut(x)``, then a ReLU when ``relu`` (every residual op of a version-1 export has one)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module, relu: bool = True):
        super().__init__()
        self.body = body
        self.shortcut = shortcut  # an empty Sequential is the identity
        self.relu = bool(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x) + self.shortcut(x)
        return F.relu(y) if self.relu else y


class Normalize(nn.Module):
    """The data set's normalisation as the exported network's first layer: ``(x - mean) / std`` per
    channel, for inputs that are float pixels in [0, 1] (uint8 images divided by 255). Its constants come
    from the description (not stored with the weights)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


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
    if kind == "batchnorm":
        return nn.BatchNorm2d(op["channels"], eps=op["bn"]["eps"], momentum=op["bn"]["momentum"])
    if kind == "normalize":
        return Normalize(op["mean"], op["std"])
    if kind == "avgpool2d":
        return nn.AvgPool2d(op["kernel"], op["stride"], op["padding"], ceil_mode=op["ceil_mode"],
                            count_include_pad=op["count_include_pad"], divisor_override=op["divisor_override"])
    if kind == "maxpool":
        return nn.MaxPool2d(op["kernel"], op["stride"], op["padding"], op["dilation"], ceil_mode=op["ceil_mode"])
    if kind == "avgpool":
        return nn.AdaptiveAvgPool2d(tuple(op["output_size"]))
    if kind == "flatten":
        return nn.Flatten()
    if kind == "residual":
        return _Residual(build_network(op["body"]), build_network(op["shortcut"]), op.get("relu", True))
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
        if kind == "batchnorm":
            for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                getattr(module, t).copy_(state[f"{op['bn']['name']}.{t}"])
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
