"""Turning a masked network's ops into smaller ones: channel surgery, dense blocks, CSR matrices."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from lottery.export._base import ExportError
from lottery.export.graph import _dead_rows, _flatten_size, _Groups, _layer_ops


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
            elif kind == "batchnorm":  # its channels are kept whole (_Groups.fixed): cur selects them all
                bn = op["bn"]["name"]
                for t in ("weight", "bias", "running_mean", "running_var"):
                    self.state[f"{bn}.{t}"] = self.state[f"{bn}.{t}"][cur].contiguous()
                op = {**op, "channels": int(len(cur))}
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


def _shrink(ops, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], in_channels: int,
            keep_all: bool = False):
    """Channel surgery (``keep_all``: none, every channel kept; the ``semi`` export keeps the layers' full
    shapes, because removing a dead channel shifts the next layer's groups of 4 inputs and breaks the
    2:4 pattern and the multiples of 16 or 64 the sparse kernels need)."""
    groups = _Groups(ops)
    by_name = {op["name"]: op for op in _layer_ops(ops)}
    kept: dict[int, torch.Tensor] = {}
    for g, names in groups.members().items():
        rows = by_name[names[0]]["out"]
        if keep_all or groups.pinned(g):
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
