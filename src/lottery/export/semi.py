"""Semi-structured 2:4 sparsity: run the N:M Linear layers of a network on NVIDIA's sparse tensor cores
(``torch.sparse.to_sparse_semi_structured``) where the GPU, this torch and the weights allow it, and as the
dense masked layers everywhere else (issue 22).

Why a separate step from the export: the compressed 2:4 tensors exist only on a CUDA GPU and are not
portable, so the ``semi`` export stores the masked weights densely (like ``dense``, without the channel
surgery) and the conversion happens when the network is put on a device (:func:`semi_structured`, called
by ``load_export(..., device=, dtype=)`` and by ``lottery bench-latency``). Where it cannot happen, the
network stays the dense masked one, which computes the same outputs; one line says why.

What PyTorch needs (torch 2.x, ``torch/sparse/semi_structured.py`` and the PyTorch tutorial
"Accelerating BERT with semi-structured (2:4) sparsity"):

* a CUDA tensor on a GPU of compute capability 8.0 or more (Ampere, Ada, Hopper: sparse tensor cores);
* a 2-D, contiguous weight of a Linear layer (there are no semi-structured convolutions: conv layers stay
  dense masked);
* in every group of 4 consecutive elements of a row (4 consecutive *inputs* of the Linear weight
  ``out x in``), at most 2 non-zeros. The conversion does not check it: a third non-zero would be dropped
  silently, so :func:`two_four` checks it first;
* a dtype and shape the backend takes: cuSPARSELt (the default where torch was built with it):
  float16/bfloat16 with both sides multiples of 16, int8 multiples of 32, no float32; CUTLASS (used when
  cuSPARSELt is missing or ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set): float16/bfloat16 with
  rows a multiple of 32 and columns of 64, float32 multiples of 32. The table is read from torch itself
  (``_DTYPE_SHAPE_CONSTRAINTS``) so a newer torch's rules apply.

Every converted layer is run once on random inputs against the dense layer it replaces and kept only if
both agree (a safeguard for kernels that this code has not run: it was written without a GPU).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MIN_CAPABILITY", "PATTERN", "semi_layers", "semi_shape_supported", "semi_structured",
           "semi_structured_supported", "two_four"]

PATTERN = "2:4"
MIN_CAPABILITY = (8, 0)
TRIAL_RTOL = 1e-2  # a converted layer vs the dense one, in float16/bfloat16, relative to max(1, max |output|)
FALLBACK = "the N:M Linear layers run as dense masked layers"


def two_four(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight (``out x in``) keeps at most 2 non-zeros in every group of 4 consecutive inputs
    of each row, with ``in`` a multiple of 4 (the layout ``to_sparse_semi_structured`` compresses)."""
    if weight.dim() != 2 or weight.shape[1] % 4 or weight.numel() == 0:
        return False
    groups = weight.detach().ne(0).reshape(weight.shape[0], -1, 4)
    return int(groups.sum(2).max()) <= 2


def _backend() -> Any:
    """The class ``to_sparse_semi_structured`` would use (cuSPARSELt unless forced to CUTLASS), or CUTLASS
    where this torch has no cuSPARSELt (``to_sparse_semi_structured`` itself would fail there)."""
    sparse = torch.sparse
    if not hasattr(sparse, "SparseSemiStructuredTensorCUTLASS"):
        return None
    cusparselt = getattr(torch.backends, "cusparselt", None)
    has_lt = bool(cusparselt is not None and cusparselt.is_available())
    if has_lt and not getattr(sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False):
        return sparse.SparseSemiStructuredTensorCUSPARSELT
    return sparse.SparseSemiStructuredTensorCUTLASS


def _backend_name(backend: Any) -> str:
    return {"cusparselt": "cuSPARSELt", "cutlass": "CUTLASS"}.get(getattr(backend, "BACKEND", ""), "torch")


def _float_dtypes(backend: Any) -> list[torch.dtype]:
    """The dtypes a Linear layer can run in with ``backend`` (float8 has no matrix product, int8 is not a
    Linear layer's dtype)."""
    table = getattr(backend, "_DTYPE_SHAPE_CONSTRAINTS", {}) or {}
    return [d for d in table if d.is_floating_point and d.itemsize >= 2]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def semi_structured_supported(device: str | torch.device, dtype: torch.dtype,
                              capability: tuple[int, int] | None = None) -> tuple[bool, str]:
    """Whether a network on ``device`` in ``dtype`` can run 2:4 Linear layers on sparse tensor cores, and
    why not (or which kernels) in a few words. ``capability`` (major, minor) stands for the GPU's compute
    capability (default: asked from CUDA), so the decision can be checked without a GPU."""
    device = torch.device(device)
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"this torch ({torch.__version__}) has no torch.sparse.to_sparse_semi_structured"
    if capability is None and torch.cuda.is_available():
        capability = tuple(torch.cuda.get_device_capability(device if device.type == "cuda" else None))  # type: ignore[assignment]
    if device.type != "cuda":
        if capability is None or tuple(capability) < MIN_CAPABILITY:
            return False, "no CUDA GPU with compute capability >= 8.0 here"
        return False, (f"the network is on {device.type}, not the CUDA GPU (load it with device='cuda', "
                       "dtype=torch.float16)")
    if capability is None:
        return False, "no CUDA GPU with compute capability >= 8.0 here"
    if tuple(capability) < MIN_CAPABILITY:
        return False, (f"the GPU's compute capability is {capability[0]}.{capability[1]}, below 8.0 "
                       "(sparse tensor cores: Ampere or newer)")
    backend = _backend()
    if backend is None:
        return False, f"this torch ({torch.__version__}) has no semi-structured tensor classes"
    dtypes = _float_dtypes(backend)
    if dtype not in dtypes:
        names = ", ".join(_dtype_name(d) for d in dtypes)
        return False, (f"{_dtype_name(dtype)} weights: the {_backend_name(backend)} 2:4 kernels take {names} "
                       "(load with dtype=torch.float16)")
    return True, f"{_backend_name(backend)} kernels, {_dtype_name(dtype)}"


def semi_shape_supported(shape: Iterable[int], dtype: torch.dtype) -> tuple[bool, str]:
    """Whether a weight of ``shape`` (``out x in``) in ``dtype`` fits the kernels' shape rules: both sides
    positive multiples of the backend's minimum for that dtype; and why not."""
    out_f, in_f = (int(s) for s in shape)
    backend = _backend()
    table = getattr(backend, "_DTYPE_SHAPE_CONSTRAINTS", {}) or {}
    rule = table.get(dtype)
    if rule is None:
        return False, f"no {_backend_name(backend)} 2:4 kernel for {_dtype_name(dtype)}"
    rows, cols = int(rule.sparse_min_rows), int(rule.sparse_min_cols)
    if out_f < rows or out_f % rows or in_f < cols or in_f % cols:
        return False, (f"{out_f}x{in_f} is not a multiple of {rows}x{cols} ({_backend_name(backend)}, "
                       f"{_dtype_name(dtype)})")
    return True, ""


def semi_layers(ops: list[dict[str, Any]], masks: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, dict]:
    """The ``semi`` export's record of its masked layers (op name -> ``module``: the path of the layer in the
    exported network, ``shape``, ``eligible``, and ``why`` not): eligible are the Linear layers whose mask
    keeps at most 2 of every 4 consecutive inputs (:func:`two_four`); conv layers never are."""
    out: dict[str, dict] = {}
    for i, op in enumerate(ops):
        kind = op["op"]
        if kind == "residual":
            out.update(semi_layers(op["body"], masks, f"{prefix}{i}.body."))
            out.update(semi_layers(op["shortcut"], masks, f"{prefix}{i}.shortcut."))
            continue
        if kind not in ("linear", "conv") or f"{op['name']}.weight" not in masks:
            continue
        m = masks[f"{op['name']}.weight"]
        entry: dict[str, Any] = {"module": f"{prefix}{i}", "op": kind, "shape": [int(op["out"]), int(op["in"])]}
        if kind == "conv":
            entry.update(eligible=False, why="a conv layer: torch's semi-structured kernels take Linear weights only")
        elif not two_four(m):
            entry.update(eligible=False, why="its mask keeps more than 2 of some 4 consecutive inputs")
        else:
            entry.update(eligible=True)
        out[op["name"]] = entry
    return out


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _trial(lin: nn.Linear, dense_weight: torch.Tensor) -> str | None:
    """Run ``lin`` (its weight converted) and the dense weight on the same random inputs: ``None`` when
    they agree, else why not."""
    g = torch.Generator(device=dense_weight.device).manual_seed(0)
    x = torch.randn(64, dense_weight.shape[1], generator=g, device=dense_weight.device).to(dense_weight.dtype)
    with torch.no_grad():
        want = F.linear(x, dense_weight, lin.bias)
        got = lin(x)
    diff = float((got.float() - want.float()).abs().max())
    tolerance = TRIAL_RTOL * max(1.0, float(want.float().abs().max()))
    return None if diff <= tolerance else f"its output differs from the dense layer's by {diff:.3g}"


def semi_structured(module: nn.Module, layers: Iterable[str] | None = None, *,
                    log: Callable[[str], None] | None = None) -> tuple[nn.Module, list[str]]:
    """Convert the 2:4 Linear layers of ``module`` (``layers``: their module paths, e.g. from a ``semi``
    export's ``model.json``; default: every ``nn.Linear`` whose weight is :func:`two_four`) to
    ``torch.sparse`` semi-structured weights, in place, where :func:`semi_structured_supported` says the
    module's device and dtype allow it; a layer whose shape the kernels refuse, whose conversion fails or
    whose converted output differs from the dense one stays dense. Says what happened in exactly one
    line through ``log`` (default: standard error). Returns the module and the converted layers' paths."""
    log = log or _stderr
    if layers is None:
        names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and two_four(m.weight)]
    else:
        names = list(layers)
    candidates = {n: module.get_submodule(n) for n in names}
    if not candidates:
        log("semi-structured 2:4: no Linear layer keeps at most 2 of every 4 consecutive inputs; nothing to convert")
        return module, []
    first = next(iter(candidates.values())).weight
    ok, why = semi_structured_supported(first.device, first.dtype)
    if not ok:
        log(f"semi-structured 2:4: {why}; {FALLBACK}")
        return module, []
    backend = _backend()
    converted: list[str] = []
    dense: dict[str, str] = {}
    for name, lin in candidates.items():
        w = lin.weight.detach()
        if not isinstance(lin, nn.Linear) or not two_four(w):
            dense[name] = "not a 2:4 Linear weight"
            continue
        shape_ok, shape_why = semi_shape_supported(w.shape, w.dtype)
        if not shape_ok:
            dense[name] = shape_why
            continue
        before = lin.weight
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "the API of SparseSemiStructuredTensor is in prototype stage"
                lin.weight = nn.Parameter(backend.from_dense(w.contiguous()), requires_grad=False)
                wrong = _trial(lin, w)
        except Exception as exc:  # a kernel or conversion this GPU or torch refuses: the layer stays dense
            lin.weight = before
            dense[name] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            continue
        if wrong is not None:
            lin.weight = before
            dense[name] = wrong
            continue
        converted.append(name)
    line = (f"semi-structured 2:4 ({why}): {len(converted)} of {len(candidates)} N:M Linear layer(s) run on "
            "sparse tensor cores")
    if dense:
        line += "; dense masked: " + ", ".join(f"{n} ({r})" for n, r in dense.items())
    log(line)
    return module, converted
