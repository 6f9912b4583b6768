"""The ``semi`` export (issue 22): an N:M ticket as its full-size dense masked network, whose N:M Linear
layers run with ``torch.sparse.to_sparse_semi_structured`` (NVIDIA's 2:4 sparse tensor cores) where the
device supports it, and as the dense masked layers elsewhere (:func:`lottery.export.semi_structured`).

Why a kind of its own rather than a flag on ``dense``: the N:M pattern is defined on groups of ``M``
consecutive inputs, so this export keeps every channel (the channel surgery of ``dense`` would remove input
columns and shift the groups), and model.json records the pattern and which Linear layers keep it. The
stored tensors are the dense masked weights: whether a layer can run sparse depends on the device it is
loaded onto, so the conversion happens when the export is loaded (``load_export(folder, device=...)``), not
when it is written. Portable copies (TorchScript ``model.pt``, ONNX ``model.onnx``) keep the dense masked
weights.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from lottery.errors import ConfigError
from lottery.export.graph import _layer_ops
from lottery.methods.nm import DEFAULT_NM, parse_nm, satisfies_nm

__all__ = ["KERNEL_NM", "KERNEL_MULTIPLE", "nm_record"]

KERNEL_NM = (2, 4)  # the pattern torch.sparse.to_sparse_semi_structured runs
KERNEL_MULTIPLE = 64  # both sides of a weight must be multiples of it (lottery.export.semi_structured)


def nm_record(ops: list[dict[str, Any]], masks: Mapping[str, torch.Tensor], nm: str | tuple[int, int] | None) -> dict[str, Any]:
    """The ``nm`` entry of a ``semi`` export's model.json: the ``pattern`` (``"N:M"``, default 2:4), the
    masked Linear ``layers`` whose mask keeps it, and of those the ``kernel_layers`` that the 2:4 kernels
    take (the mask is 2:4 and both sides are multiples of 64: these convert on a supporting GPU).

    Raises a one-line :class:`ConfigError` when no masked Linear layer keeps the pattern (an unstructured
    ticket): such an export could never run a layer sparse, so nothing is written."""
    n, m = parse_nm(nm if nm is not None else DEFAULT_NM)
    linears = [op for op in _layer_ops(ops) if op["op"] == "linear"]

    def keeps(op: dict[str, Any], pattern: tuple[int, int]) -> bool:
        mask = masks.get(f"{op['name']}.weight")
        return mask is not None and satisfies_nm({"w": mask}, *pattern)

    layers = [op["name"] for op in linears if keeps(op, (n, m))]
    if not layers:
        raise ConfigError(f"export --to semi needs an N:M ticket, but no masked Linear layer keeps at most {n} of "
                          f"every {m} consecutive input weights (an unstructured ticket?); make one with "
                          f"'lottery structure nm RUN_DIR --nm {n}:{m}' and export that run")
    kernel = [op["name"] for op in linears if op["name"] in layers and keeps(op, KERNEL_NM)
              and op["in"] % KERNEL_MULTIPLE == 0 and op["out"] % KERNEL_MULTIPLE == 0]
    return {"pattern": f"{n}:{m}", "layers": layers, "kernel_layers": kernel,
            "runs": "torch.sparse.to_sparse_semi_structured for kernel_layers on a CUDA GPU of compute capability "
                    ">= 8.0 when loaded there; dense masked layers elsewhere and in the portable copies"}
