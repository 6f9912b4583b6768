"""The layers an exported network is built from (dense blocks, CSR linears, conv+BN, residual stages) and
building that network from its ops."""

from __future__ import annotations

import time
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


def _repack(module: "_BlockBase", _keys) -> None:
    module.pack()


class _BlockBase(nn.Module):
    """The blocks of a layer: ``weights[b]`` (``r x c``, or ``r x c x kh x kw`` for channel blocks of a conv)
    with the output rows ``rows_b`` and input columns ``cols_b`` it connects. These per-block tensors are
    what is stored and loaded. The forward pass can run a *packed* copy of them (:meth:`pack`): blocks of
    similar width are grouped into a few buckets and zero-padded to one shape per bucket (``PAD_RATIO``),
    so that a layer runs as one gather of its input, one batched matrix product (or one grouped
    convolution) per bucket, bias included, and one gather of its output rows, which :func:`link_blocks`
    removes when the next layer is a block layer too (it reads the rows where the products wrote them).
    Padding is exact: a padded column reads an input column with a zero weight, a padded row is dropped
    or never read (rows of no block read constant rows: their bias, or 0). The
    packed copy is rebuilt on the first forward pass, after ``load_state_dict`` and by ``_fill``; call
    :meth:`pack` after changing the block tensors in place. Channel blocks of a conv run in
    ``channels_last`` (oneDNN's grouped convolutions and the max-pool after them were several times faster
    so), their gathers as column gathers of ``(n h w) x C`` matrices. ``path`` chooses: ``'packed'`` (the
    default), ``'loop'`` (the old path, one product per block in a Python loop: the reference, and the
    only path when a row is in two blocks) or ``'auto'``, which times both on the first input of each shape
    and keeps the faster per layer; per layer only, so it misses what a layout costs the next ops (on
    Conv-4 it measured sometimes faster, sometimes slower than ``'packed'``: benchmarks/RESULTS.md)."""

    PAD_RATIO = 1.25  # a bucket's blocks are at least 1/PAD_RATIO as wide as its widest one
    AUTOTUNE_CALLS = 3  # path='auto': timed calls of each path on a new input shape

    def __init__(self, out_features: int, blocks: list[list[int]], bias: bool, kernel: tuple[int, ...] = ()):
        super().__init__()
        self.out_features = out_features
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(r, c, *kernel)) for r, c in blocks])
        for i, (r, c) in enumerate(blocks):
            self.register_buffer(f"rows_{i}", torch.zeros(r, dtype=torch.int64))
            self.register_buffer(f"cols_{i}", torch.zeros(c, dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.path = "packed"
        self._choice: dict[tuple, bool] = {}  # input (shape, device, dtype) -> packed path faster (path='auto')
        self._forced: bool | None = None  # set while timing one path
        self._packable = True  # False when a row is in two blocks (only the loop path sums them)
        self._packed = False
        self._buckets: list[tuple[int, int, int]] = []  # (blocks, rows, columns) of each bucket
        self._zero_row = False  # some output rows are in no block (they output their bias, or 0)
        self._packed_rows = 0  # width of the packed output: the buckets' rows (padding included), then the rows of no block
        # link_blocks: the block layer whose packed output this one reads, and the one that reads this one's
        # (kept out of the module tree: plain references, so state_dict and named_modules do not see them)
        self.__dict__["_prev"] = None
        self.__dict__["_next"] = None
        self._spatial = 1  # input columns per output row of _prev (H*W when a flatten sits between them)
        self.register_load_state_dict_post_hook(_repack)

    def _index(self, kind: str) -> list[torch.Tensor]:
        return [getattr(self, f"{kind}_{i}") for i in range(len(self.weights))]

    def weights_per_position(self) -> int:
        """Multiply-accumulates per output position (lottery.cost): the blocks' weights (not the padding)."""
        return int(sum(w.numel() for w in self.weights))

    def padded_weights_per_position(self) -> int:
        """Multiply-accumulates per output position that the packed layout computes (padding included)."""
        if not self._packed:
            self.pack()
        return int(sum(b * r * c for b, r, c in self._buckets)) * self._kernel_size()

    def _kernel_size(self) -> int:
        return 1

    def _set(self, name: str, t: torch.Tensor) -> None:
        if name in self._buffers:
            self._buffers[name] = t
        else:
            self.register_buffer(name, t, persistent=False)

    @torch.no_grad()
    def pack(self) -> None:
        """Build the packed layout from the per-block tensors (see the class): per bucket the padded weights
        ``_pk_w``, the input columns ``_pk_in`` (and ``_pk_lin``, the same columns in the packed output of
        the linked layer before, :func:`link_blocks`) and the bias of its rows ``_pk_b`` (zero on padding);
        ``_pk_const``, the bias of rows of no block; ``_pk_out``, each output row's place in the packed
        output. Everything a forward pass needs is computed here, once."""
        prev = self._prev
        if prev is not None and not prev._packed:
            prev.pack()
        for name in [n for n in self._buffers if n.startswith("_pk_")]:
            del self._buffers[name]
        self._buckets, self._zero_row, self._packed, self._packable = [], False, True, True
        self._choice = {}
        rows, cols = self._index("rows"), self._index("cols")
        out_index = torch.full((self.out_features,), -1, dtype=torch.int64)
        bias = self.bias.detach().cpu() if self.bias is not None else None
        pmap = prev._pk_out.cpu() if prev is not None else None
        order = sorted(range(len(self.weights)), key=lambda b: (-int(cols[b].numel()), b))
        buckets: list[list[int]] = []
        for b in order:
            if buckets and cols[b].numel() * self.PAD_RATIO >= cols[buckets[-1][0]].numel():
                buckets[-1].append(b)
            else:
                buckets.append([b])
        pos = 0
        for j, members in enumerate(buckets):
            r_max = max(int(rows[b].numel()) for b in members)
            c_max = max(int(cols[b].numel()) for b in members)
            like = self.weights[members[0]]
            w = like.new_zeros(len(members), r_max, c_max, *like.shape[2:])
            idx = torch.zeros(len(members), c_max, dtype=torch.int64)
            bucket_bias = torch.zeros(len(members), r_max, dtype=like.dtype)
            for i, b in enumerate(members):
                r, c = int(rows[b].numel()), int(cols[b].numel())
                w[i, :r, :c] = self.weights[b].detach()
                idx[i, :c] = cols[b].cpu()
                idx[i, c:] = int(cols[b][0]) if c else 0
                where = rows[b].cpu()
                if bias is not None:
                    bucket_bias[i, :r] = bias[where]
                if bool((out_index[where] >= 0).any()):  # a row in two blocks: only the loop path sums them
                    self._packable = False
                out_index[where] = pos + i * r_max + torch.arange(r)
            pos += len(members) * r_max
            self._set(f"_pk_w{j}", self._packed_weight(w))
            self._set(f"_pk_in{j}", idx.reshape(-1).to(like.device))
            if pmap is not None:  # the same input columns in the packed output of the layer before
                unit, flat = self._link_unit(), idx.reshape(-1)
                self._set(f"_pk_lin{j}", (pmap[flat // unit] * unit + flat % unit).to(like.device))
            if bias is not None:
                self._set(f"_pk_b{j}", self._packed_bias(bucket_bias).to(like.device))
            self._buckets.append((len(members), r_max, c_max))
        missing = out_index < 0
        if bool(missing.any()):  # rows of no block: constant rows (their bias, or 0) after the buckets' rows
            k = int(missing.sum())
            out_index[missing] = pos + torch.arange(k)
            like = self.weights[0] if len(self.weights) else torch.zeros(())
            self._set("_pk_const", (bias[missing] if bias is not None else torch.zeros(k)).to(like.device, like.dtype))
            self._zero_row = True
            pos += k
        self._packed_rows = pos
        device = self.bias.device if self.bias is not None else (self.weights[0].device if len(self.weights) else None)
        self._set("_pk_out", out_index.to(device) if device is not None else out_index)
        if self._next is not None:  # its _pk_lin indices read this layout: rebuild them too
            self._next._packed = False

    def _packed_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w  # blocks x rows x columns: one bmm per bucket

    def _packed_bias(self, b: torch.Tensor) -> torch.Tensor:
        return b.unsqueeze(2)  # blocks x rows x 1: baddbmm(bias, W, columns)

    def _link_unit(self) -> int:
        """Input columns per row of the layer before (what one of its output rows becomes in this input)."""
        return self._spatial

    def _emits_packed(self) -> bool:
        """Whether this call leaves its output in packed order (no gather of the output rows) because the
        linked next layer reads it so: both run the packed path."""
        nxt = self._next
        if nxt is None or self.path != "packed" or nxt.path != "packed":
            return False
        if not self._packed:
            self.pack()
        if not nxt._packed:
            nxt.pack()
        return self._packable and nxt._packable and len(self.weights) > 0 and len(nxt.weights) > 0

    def _reads_packed(self) -> bool:
        """Whether this call's input is the packed output of the linked layer before."""
        return self._prev is not None and self._prev._emits_packed()

    def _run_packed(self, cols_first: torch.Tensor, linked: bool) -> torch.Tensor:
        """``cols_first``: the input with its columns on dim 0 (``columns x ...``, any strides: the gather
        copies); returns the output rows as ``out_features x M`` (M: the other dims' product), bias
        included: per bucket one gather and one bmm, then one gather of the rows."""
        m = cols_first[0].numel()
        parts = []
        for j, (b, r, c) in enumerate(self._buckets):
            g = cols_first.index_select(0, getattr(self, f"_pk_lin{j}" if linked else f"_pk_in{j}")).reshape(b, c, m)
            w = getattr(self, f"_pk_w{j}")
            y = torch.bmm(w, g) if self.bias is None else torch.baddbmm(getattr(self, f"_pk_b{j}"), w, g)
            parts.append(y.view(b * r, m))
        if self._zero_row:
            parts.append(self._pk_const.view(-1, 1).expand(-1, m))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return y.index_select(0, self._pk_out)

    def _scatter(self, parts: list[torch.Tensor], like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Output rows of the blocks into an output of ``shape`` (rows on dim 1); rows of no block are 0."""
        y = like.new_zeros(shape)
        if parts:
            y.index_copy_(1, torch.cat(self._index("rows")), torch.cat(parts, 1))
        return y

    def _use_packed(self, x: torch.Tensor) -> bool:
        """Whether this call runs the packed layout: ``path`` ``'packed'`` or ``'loop'`` decides; ``'auto'``
        times both (one untimed and ``AUTOTUNE_CALLS`` timed calls each) on the first input of each
        shape, device and dtype, and keeps the faster one for that shape (as ``cudnn.benchmark`` does);
        while tracing (TorchScript, ONNX) the kept choice or the packed path is used."""
        if not self._packed:
            self.pack()
        if not self._packable or len(self.weights) == 0 or self.path == "loop":
            return False
        if self.path == "packed":
            return True
        key = (tuple(x.shape), str(x.device), x.dtype)
        choice = self._choice.get(key)
        if choice is None:
            if torch.jit.is_tracing() or torch.jit.is_scripting():
                return True
            times = {}
            try:
                with torch.no_grad():
                    for packed in (True, False):
                        self._forced = packed
                        self(x)
                        runs = []
                        for _ in range(self.AUTOTUNE_CALLS):
                            if x.is_cuda:
                                torch.cuda.synchronize(x.device)
                            t0 = time.perf_counter()
                            self(x)
                            if x.is_cuda:
                                torch.cuda.synchronize(x.device)
                            runs.append(time.perf_counter() - t0)
                        times[packed] = sorted(runs)[len(runs) // 2]
            finally:
                self._forced = None
            choice = self._choice[key] = times[True] <= times[False]
        return choice


class BlockLinear(_BlockBase):
    """A Linear layer as dense blocks: ``y[:, rows_b] = x[:, cols_b] @ W_b^T`` (+ bias)."""

    def __init__(self, in_features: int, out_features: int, blocks: list[list[int]], bias: bool = True):
        super().__init__(out_features, blocks, bias)
        self.in_features = in_features

    def _packed_bias(self, b: torch.Tensor) -> torch.Tensor:
        return b.unsqueeze(1)  # blocks x 1 x rows: baddbmm(bias, (blocks, n, c), W^T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._forced if self._forced is not None else self._use_packed(x):
            # examples in the middle: bmm((blocks, n, c), W^T) was 10x faster at n = 1 than bmm(W, (blocks, c, n))
            n = x.shape[0]
            linked = self._reads_packed()
            parts = []
            for j, (b, r, c) in enumerate(self._buckets):
                g = x.index_select(1, getattr(self, f"_pk_lin{j}" if linked else f"_pk_in{j}")).view(n, b, c).transpose(0, 1)
                wt = getattr(self, f"_pk_w{j}").transpose(1, 2)
                y = torch.bmm(g, wt) if self.bias is None else torch.baddbmm(getattr(self, f"_pk_b{j}"), g, wt)
                parts.append(y.transpose(0, 1).reshape(n, b * r))
            if self._zero_row:
                parts.append(self._pk_const.expand(n, -1))
            y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            return y if self._emits_packed() else y.index_select(1, self._pk_out)
        parts = [x.index_select(1, c) @ w.t() for w, c in zip(self.weights, self._index("cols"))]
        y = self._scatter(parts, x, (x.shape[0], self.out_features))
        return y + self.bias if self.bias is not None else y


class BlockConv2d(_BlockBase):
    """A conv as dense blocks. ``unit='element'``: blocks of its im2col matrix (columns index
    ``C_in x kh x kw`` in the order of ``weight.reshape(C_out, -1)``): one ``unfold``, then per bucket one
    gather of the patch rows and one ``bmm`` (the loop path: ``W_b @ patches[:, cols_b]`` per block).
    ``unit='channel'``: each block is a small dense conv of its rows over its input channels ``cols_b``
    (weights ``r x c x kh x kw``); a bucket of such blocks runs as one grouped convolution (one group per
    block) over the gathered input channels, with the ordinary conv kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel, stride, padding, dilation,
                 blocks: list[list[int]], bias: bool = True, unit: str = "element"):
        kernel = tuple(_pair(kernel))
        super().__init__(out_channels, blocks, bias, kernel if unit == "channel" else ())
        if unit not in ("element", "channel"):
            raise CheckpointError(f"unknown block unit {unit!r}")
        self.unit = unit
        self.in_channels = in_channels
        self.kernel, self.stride, self.padding, self.dilation = (tuple(_pair(v)) for v in (kernel, stride, padding, dilation))

    def _kernel_size(self) -> int:
        return self.kernel[0] * self.kernel[1] if self.unit == "channel" else 1

    def _link_unit(self) -> int:
        return 1 if self.unit == "channel" else self.kernel[0] * self.kernel[1]  # element columns: C_in x kh x kw

    def _packed_weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.unit == "channel":  # blocks x rows x channels x kh x kw -> (blocks * rows) x channels x kh x kw
            # channels_last: oneDNN's grouped convolutions were 1.3-2x faster so (benchmarks/block_speed.py)
            return w.reshape(w.shape[0] * w.shape[1], *w.shape[2:]).contiguous(memory_format=torch.channels_last)
        return w

    def _packed_bias(self, b: torch.Tensor) -> torch.Tensor:
        return b.reshape(-1) if self.unit == "channel" else b.unsqueeze(2)  # the grouped conv's bias / baddbmm's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        fast = self._forced if self._forced is not None else self._use_packed(x)
        if self.unit == "channel":
            if fast:  # in channels_last (NHWC memory), the gathers as column gathers of (n h w) x C matrices
                if not x.is_contiguous(memory_format=torch.channels_last):
                    # one layout conversion (3x cheaper than the copy that permute().reshape() of NCHW makes)
                    x = x.contiguous(memory_format=torch.channels_last)
                xl = x.permute(0, 2, 3, 1).reshape(n * h * w, x.shape[1])  # a view
                linked = self._reads_packed()
                parts = []
                for j, (b, _, c) in enumerate(self._buckets):
                    g = xl.index_select(1, getattr(self, f"_pk_lin{j}" if linked else f"_pk_in{j}"))
                    y = F.conv2d(g.view(n, h, w, b * c).permute(0, 3, 1, 2), getattr(self, f"_pk_w{j}"),
                                 getattr(self, f"_pk_b{j}") if self.bias is not None else None,
                                 self.stride, self.padding, self.dilation, b)
                    parts.append(y.permute(0, 2, 3, 1).reshape(n * ho * wo, -1))  # a view: y is channels_last
                if self._zero_row:
                    parts.append(self._pk_const.expand(n * ho * wo, -1))
                y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
                if not self._emits_packed():
                    y = y.index_select(1, self._pk_out)
                return y.view(n, ho, wo, y.shape[1]).permute(0, 3, 1, 2)
            parts = [F.conv2d(x.index_select(1, c), wt, None, self.stride, self.padding, self.dilation)
                     for wt, c in zip(self.weights, self._index("cols"))]
            y = self._scatter(parts, x, (n, self.out_features, ho, wo))
            return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y
        patches = F.unfold(x, self.kernel, self.dilation, self.padding, self.stride)  # n x K x L
        if fast:  # gathered as K x n x L, so that each bucket is one large bmm over every example and position
            y = self._run_packed(patches.transpose(0, 1), self._reads_packed())
            return y.view(self.out_features, n, ho * wo).transpose(0, 1).reshape(n, self.out_features, ho, wo)
        parts = [torch.matmul(wt, patches.index_select(1, c)) for wt, c in zip(self.weights, self._index("cols"))]
        y = self._scatter(parts, x, (n, self.out_features, ho * wo))
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        return y.reshape(n, self.out_features, ho, wo)


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
    """The network an op list describes, with zero-initialised tensors (load them afterwards); consecutive
    block layers are linked (:func:`link_blocks`)."""
    net = nn.Sequential(*[_module(op) for op in ops])
    link_blocks(net)
    return net


# ops that act on each channel (feature) alone: a permutation of the channels passes through them unchanged
_CHANNELWISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout)


def _block_of(module: nn.Module, producer: bool) -> _BlockBase | None:
    if isinstance(module, BlockLinear):
        return module
    if isinstance(module, _ConvBN) and isinstance(module.conv, BlockConv2d):
        if producer and (module.bn is not None or module.conv.unit != "channel"):
            return None  # a BatchNorm reads the rows in their order; element blocks end in a transposing copy anyway
        return module.conv
    return None


def link_blocks(net: nn.Sequential) -> list[tuple[int, int]]:
    """Let consecutive block layers of ``net`` skip the gather of the first one's output rows: when a block
    layer (a Linear, or a conv of channel blocks without a BatchNorm) is followed, through channel-wise ops
    only (ReLU, pooling, a flatten, Dropout, Identity), by another block layer, the first leaves its output
    in its packed order (each bucket's rows as its grouped convolution or bmm wrote them, padding rows
    included, then the constant rows of no block) and the second reads its input columns from there: its
    gather indices are composed with the first one's row positions once, in :meth:`pack`. Why: that output
    gather was a full copy of every activation of the layer (about 1.4 ms of a 12 ms conv at batch 64 on
    Conv-4), and the permutation can be folded into the next gather for free. The composition holds only
    while both layers run the packed path (``path == 'packed'``, the default); with any other path both
    fall back to the original order, so results never depend on it. A linked layer called on its own
    returns its rows in packed order: call the whole network. Returns the linked (producer, consumer)
    positions in ``net``."""
    mods = list(net)
    links = []
    for i, m in enumerate(mods):
        prod = _block_of(m, producer=True)
        if prod is None:
            continue
        j, flat = i + 1, False
        while j < len(mods) and (isinstance(mods[j], _CHANNELWISE) or (
                isinstance(mods[j], nn.Flatten) and not flat and mods[j].start_dim == 1 and mods[j].end_dim == -1)):
            flat = flat or isinstance(mods[j], nn.Flatten)
            j += 1
        cons = _block_of(mods[j], producer=False) if j < len(mods) else None
        if cons is None:
            continue
        if isinstance(prod, BlockConv2d):
            if flat and isinstance(cons, BlockLinear) and cons.in_features % prod.out_features == 0:
                spatial = cons.in_features // prod.out_features  # the flattened input is channel x H x W
            elif not flat and isinstance(cons, BlockConv2d) and cons.in_channels == prod.out_features:
                spatial = 1
            else:
                continue
        elif isinstance(cons, BlockLinear) and cons.in_features == prod.out_features and all(
                isinstance(x, (nn.ReLU, nn.Identity, nn.Dropout, nn.Flatten)) for x in mods[i + 1:j]):
            spatial = 1  # Linear -> (ReLU, Dropout) -> Linear
        else:
            continue
        prod.__dict__["_next"], cons.__dict__["_prev"] = cons, prod
        cons._spatial = spatial
        prod._packed = cons._packed = False
        links.append((i, j))
    return links


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
        if kind.endswith("_blocks"):
            target.pack()

