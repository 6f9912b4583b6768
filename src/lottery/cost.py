"""What a (sparse) network costs: parameters and multiply-accumulates (FLOPs) per example (docs/methods.md).

Why this module and not fvcore, thop or ``torch.utils.flop_counter``: those count the operations of the
dense tensors they see, so a masked network costs the same as the dense one there. Here the count of a
Conv or Linear layer is its *kept* weights times the positions its kernel is applied at:

* a Linear layer: one position per example (per token for inputs with extra leading dimensions), so
  its cost is its number of kept weights;
* a Conv layer: every output position (``H_out * W_out`` for 2-d), so kept weights times that.

The positions come from one forward pass of a single zero example of the data set's input shape, with
hooks on the Conv and Linear layers (it works for any ``nn.Module`` whose layers are torch's own).
Exported layers of other kinds (lottery.export's block and CSR layers) say what they compute per
output position with a ``weights_per_position()`` method and are counted the same way.
Counted: the multiply-accumulates of Conv and Linear weights, one FLOP each, in the convention of
ShrinkBench and RigL. Not counted: biases, BatchNorm, activations, pooling, residual additions and
softmax (together a few percent of a dense CNN's cost and not changed by weight pruning). The
theoretical speed-up is ``flops_dense / flops_sparse``; a measured one is ``lottery bench-latency``'s.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lottery.io import read_json, write_json
from lottery.masking import logical_named_parameters

__all__ = ["layer_positions", "network_cost", "cost_fields", "requested_density_fields", "add_cost"]

_COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _counted(module: nn.Module) -> bool:
    return isinstance(module, _COUNTED) or callable(getattr(module, "weights_per_position", None))


@torch.no_grad()
def layer_positions(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """For each Conv / Linear module (by name), how many times per example its kernel is applied."""
    positions: dict[str, int] = {}
    hooks = []

    def hook(name: str, module: nn.Module):
        def record(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(module, nn.Linear) or (not isinstance(module, _COUNTED) and out.dim() == 2):
                positions[name] = int(math.prod(out.shape[1:-1]))  # tokens per example; 1 for (N, features)
            else:
                positions[name] = int(math.prod(out.shape[2:]))  # spatial output positions
        return record

    for name, module in model.named_modules():
        if _counted(module):
            hooks.append(module.register_forward_hook(hook(name, module)))
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu",
                        dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
        model.eval()
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return positions


def network_cost(model: nn.Module, mask: Mapping[str, torch.Tensor] | None, input_shape: Sequence[int]) -> dict[str, Any]:
    """Parameters and FLOPs of ``model`` under ``mask`` (``None``: dense), totals and per counted layer.

    ``params_total`` counts every parameter; ``params_nonzero`` subtracts the mask's pruned entries.
    Layers are keyed by their weight's parameter name (the mask's keys)."""
    mask = mask or {}
    positions = layer_positions(model, input_shape)
    layers: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if name not in positions:
            continue  # a counted module that the forward pass did not use
        key = f"{name}.weight" if name else "weight"
        total = int(module.weight.numel()) if isinstance(module, _COUNTED) else int(module.weights_per_position())
        kept = int(mask[key].sum()) if key in mask else total
        layers[key] = {"positions": positions[name], "weights": total, "kept": kept,
                       "flops_dense": total * positions[name], "flops_sparse": kept * positions[name]}
    flops_dense = sum(v["flops_dense"] for v in layers.values())
    flops_sparse = sum(v["flops_sparse"] for v in layers.values())
    for v in layers.values():
        v["flops_share"] = v["flops_dense"] / flops_dense if flops_dense else 0.0
    params_total = int(sum(p.numel() for p in logical_named_parameters(model).values()))  # no mask logits
    pruned = int(sum(int(m.numel() - m.sum()) for m in mask.values()))
    return {
        "params_total": params_total,
        "params_nonzero": params_total - pruned,
        "flops_dense": flops_dense,
        "flops_sparse": flops_sparse,
        "theoretical_speedup": flops_dense / flops_sparse if flops_sparse else math.inf,
        "layers": layers,
    }


def cost_fields(model: nn.Module, mask: Mapping[str, torch.Tensor] | None, input_shape: Sequence[int]) -> dict[str, Any]:
    """The totals of :func:`network_cost` for a results.json (the per-layer figures go to mask.json)."""
    cost = network_cost(model, mask, input_shape)
    cost.pop("layers")
    return cost


def requested_density_fields(requested: float | None, reached: float) -> dict[str, Any]:
    """``requested_density`` and the relative error of the reached one, for runs asked for a density."""
    if requested is None:
        return {}
    return {"requested_density": float(requested),
            "density_relative_error": (reached - requested) / requested if requested else None}


def add_cost(results: dict[str, Any], model: nn.Module, mask: Mapping[str, torch.Tensor] | None,
             input_shape: Sequence[int], mask_report: "os.PathLike[str] | str | None" = None,
             requested_density: float | None = None) -> dict[str, Any]:
    """Add the cost totals to ``results`` (and the requested density's error, against ``results["density"]``);
    with ``mask_report`` (a mask.json), add each layer's FLOPs and FLOPs share to that file's ``layers``.
    Returns ``results``."""
    cost = network_cost(model, mask, input_shape)
    layers = cost.pop("layers")
    results.update(cost)
    if requested_density is not None:  # the reached density is the one results.json reports
        results.update(requested_density_fields(requested_density, float(results["density"])))
    if mask_report is not None and Path(mask_report).is_file():
        report = read_json(Path(mask_report))
        for name, entry in report.get("layers", {}).items():
            if name in layers:
                entry.update({k: layers[name][k] for k in ("positions", "flops_dense", "flops_sparse", "flops_share")})
        report.update({k: cost[k] for k in ("flops_dense", "flops_sparse", "theoretical_speedup")})
        write_json(Path(mask_report), report)
    return results
