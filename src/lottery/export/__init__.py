"""Export a ticket as a network that is actually smaller or sparser: channel surgery, dense blocks, CSR,
2:4 semi-structured Linear layers (docs/methods.md, "Structured tickets"; docs/structured.md, "N:M
tickets").

A model is first *described* as a small JSON program read from its ``torch.fx`` graph (any network,
registered or not, whose graph uses the supported ops: :data:`SUPPORTED`; anything else is refused in one
line naming the op, its node and its module): a list of ops (``conv`` with its BatchNorm, ``batchnorm``,
``linear``, ``relu``, ``maxpool``, ``avgpool2d``, ``avgpool`` (adaptive), ``flatten``, and ``residual``
with a ``body`` and a ``shortcut`` list, whose outputs are added, then passed through a ReLU when its
``relu`` flag says so). Every op carries its layer shapes. The exported network is rebuilt from that
description alone and its tensors are loaded from safetensors: loading never unpickles anything. With
``preprocessing`` (the data set's mean and std), a ``normalize`` op comes first: the exported network then
takes float pixels in [0, 1] (:data:`INPUT_CONVENTION`). :func:`save_export` can add portable copies
(``model.pt`` TorchScript, ``model.onnx``) that run without lottery, each checked before it is kept.

Four exports (``export_model(model, mask, to=...)``):

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
* ``blocks``: after the surgery, each masked layer keeps its dense blocks; blocks are the groups of rows
  with identical kept columns (for a regroup ticket, exactly its blocks). A layer runs either *packed*
  (blocks of similar width zero-padded into a few buckets: one gather of the input, one ``bmm`` per
  bucket, or one grouped convolution per bucket for channel blocks, in ``channels_last``, one gather of
  the output rows; the default) or as the per-block loop (``BlockLinear.path``, ``BlockConv2d.path``:
  ``packed``, ``loop``, or ``auto``: each layer times both on its first input of a shape). A conv layer does
  im2col (``unfold``) once for element blocks; when every block of a conv is made of whole input channels
  (regroup with ``columns='channel'``), its blocks are small dense convs over their input channels (no
  im2col: the CPU's conv kernels do the product).
* ``csr``: after the surgery, each masked Linear layer keeps its weights as a ``torch.sparse_csr`` matrix.
* ``semi``: the masked network at its full size (no surgery: removing a channel would shift the next
  layer's groups of 4 inputs), its weights stored densely, plus ``model.json``'s ``semi`` entry: which
  Linear layers keep at most 2 of every 4 consecutive inputs. A ticket without any is refused
  (:class:`ExportError`). :func:`load_export` with ``device=`` and ``dtype=`` converts those layers with
  ``torch.sparse.to_sparse_semi_structured`` where a GPU of compute capability 8.0+ and the dtype allow it,
  and keeps the dense masked layers elsewhere, saying why in one line (:mod:`lottery.export.semi`).

Every export is checked against the masked network on random inputs (with preprocessing, uniform pixels
in [0, 1] for the export and their normalised values for the masked network): the largest absolute
difference of the outputs must stay within ``1e-4 x max(1, max |reference output|)`` (float32; the orders
of summation differ). The check's result is stored in the JSON description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lottery.cost import network_cost
from lottery.errors import CheckpointError, ConfigError
from lottery.io import load_tensors, read_json, save_tensors, write_json
from lottery.masks import Mask

__all__ = [
    "EXPORT_KINDS",
    "INPUT_CONVENTION",
    "PORTABLE_FORMATS",
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
    "link_blocks",
    "load_export",
    "max_output_difference",
    "preprocessing_record",
    "save_export",
    "semi_layers",
    "semi_modules",
    "semi_structured",
    "semi_structured_supported",
]
from lottery.export._base import EXPORT_KINDS, FORMAT, FORMAT_VERSION, RTOL, ExportError
from lottery.export.graph import SUPPORTED, coupled_layers, dead_channel_params, describe  # noqa: F401
from lottery.export.layers import (  # noqa: F401  (public names)
    BlockConv2d, BlockLinear, CSRLinear, Normalize, _fill, build_network, link_blocks,
)
from lottery.export.semi import (  # noqa: F401  (public names)
    PATTERN as SEMI_PATTERN, semi_layers, semi_structured, semi_structured_supported,
)
from lottery.export.portable import PORTABLE_FORMATS, write_portable  # noqa: F401
from lottery.export.transform import _shrink, _to_blocks, _to_csr, blocks_from_mask  # noqa: F401


# ============================================================================ export, check, files


@dataclass
class Exported:
    """An exported network and its JSON description (``ops`` plus shapes, sizes and the check).

    ``sample`` holds the check's inputs (raw, as the exported network takes them) and the masked
    network's outputs on them, for checking portable files (:func:`save_export`); ``None`` after
    :func:`load_export`."""

    module: nn.Module
    description: dict[str, Any]
    sample: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)


def preprocessing_record(preprocessing: Any, input_shape: Sequence[int]) -> dict[str, Any] | None:
    """The ``preprocessing`` entry of model.json from a mapping with ``mean`` and ``std`` (one value per
    input channel), or anything with ``mean``/``std`` attributes (a ``DatasetSpec`` from
    ``lottery.data.dataset_info``, a loaded data set); ``None`` for none."""
    if preprocessing is None:
        return None
    if isinstance(preprocessing, Mapping):
        mean, std = preprocessing.get("mean"), preprocessing.get("std")
    else:
        mean, std = getattr(preprocessing, "mean", None), getattr(preprocessing, "std", None)
    channels = int(input_shape[0])
    try:
        mean = [float(v) for v in mean]  # type: ignore[union-attr]
        std = [float(v) for v in std]  # type: ignore[union-attr]
    except TypeError:
        raise ConfigError("preprocessing must give a mean and a std per input channel "
                          "(e.g. {'mean': [0.1307], 'std': [0.3081]} or lottery.data.dataset_info(name))") from None
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ConfigError(f"preprocessing needs {channels} means and {channels} positive stds for inputs of shape "
                          f"{tuple(input_shape)}, got mean={mean}, std={std}")
    return {"mean": mean, "std": std, "input_shape": [int(s) for s in input_shape], "input": INPUT_CONVENTION}


INPUT_CONVENTION = ("float32 pixels in [0, 1] (a uint8 image divided by 255), shape (N, C, H, W); "
                    "the network computes (x - mean) / std per channel first, as lottery's data loaders do")


def _check_inputs(input_shape, n: int, seed: int, pre: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of the exported network, inputs of the masked network): random normal inputs without
    preprocessing; with it, uniform raw pixels in [0, 1] and their normalised values."""
    g = torch.Generator().manual_seed(seed)
    if pre is None:
        x = torch.randn(n, *input_shape, generator=g)
        return x, x
    x = torch.rand(n, *input_shape, generator=g)
    mean = torch.tensor(pre["mean"]).view(1, -1, *([1] * (len(input_shape) - 1)))
    std = torch.tensor(pre["std"]).view(1, -1, *([1] * (len(input_shape) - 1)))
    return x, (x - mean) / std


@torch.no_grad()
def _outputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = module.training
    module.eval()
    try:
        return module(x)
    finally:
        module.train(was)


def max_output_difference(reference: nn.Module, exported: nn.Module, input_shape, n: int = 8, seed: int = 0,
                          preprocessing: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Largest |reference(x) - exported(x)| over ``n`` random normal inputs (both in eval mode), with the
    largest |reference(x)| for scale. With ``preprocessing`` (a model.json ``preprocessing`` entry), the
    exported network gets raw pixels in [0, 1] and the reference their normalised values."""
    raw, normalised = _check_inputs(input_shape, n, seed, preprocessing)
    ref, got = _outputs(reference, normalised), _outputs(exported, raw)
    return {"max_abs_diff": float((ref - got).abs().max()), "max_abs_reference": float(ref.abs().max()), "inputs": n}


def _count(module: nn.Module) -> dict[str, int]:
    total = nonzero = 0
    for name, t in module.state_dict().items():
        if not t.is_floating_point() or name.endswith(("running_mean", "running_var")):
            continue
        total += t.numel()
        nonzero += int(t.ne(0).sum())
    return {"parameters": total, "nonzero_parameters": nonzero}


def export_model(model: nn.Module, mask: Mask | None = None, to: str = "dense", *, input_shape=None,
                 preprocessing: Any = None, check_inputs: int = 8, seed: int = 0) -> Exported:
    """Export ``model`` (plain or hard-masked, with its trained weights) under ``mask`` (default: the
    model's own hard masks, else no mask).

    ``model`` can be any network that torch.fx traces into the supported ops (see :func:`describe`);
    ``input_shape`` (C, H, W) defaults to ``model.input_shape``. ``preprocessing`` (``None``, a mapping
    with ``mean`` and ``std``, or a ``DatasetSpec``) becomes the exported network's first op, so that it
    takes raw pixels in [0, 1] (:data:`INPUT_CONVENTION`) while the masked network takes normalised ones.
    Raises :class:`ExportError` if the exported network's outputs differ from the masked network's beyond
    the tolerance."""
    from lottery import masking

    if to not in EXPORT_KINDS:
        raise ConfigError(f"export kind must be one of {', '.join(EXPORT_KINDS)}, got {to!r}")
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        raise ConfigError(f"export_model needs input_shape=(channels, height, width) for {type(model).__name__}, "
                          "which has no input_shape attribute")
    input_shape = tuple(int(s) for s in input_shape)
    pre = preprocessing_record(preprocessing, input_shape)
    ops = describe(model, input_shape)
    state = masking.to_plain_state_dict(model.state_dict())
    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    if mask is None:
        mask = masking.current_mask(model)
    masks = {k: v.cpu() for k, v in mask.items() if k.endswith(".weight") and k in state}
    for k, m in mask.items():
        if k not in state:
            raise ExportError(f"the mask names {k}, which the model does not have")
        state[k] = state[k].masked_fill(~m.cpu(), 0)
    new_ops, layers = _shrink(ops, state, masks, input_shape[0], keep_all=(to == "semi"))
    if to == "blocks":
        new_ops = _to_blocks(new_ops, state, masks)
    elif to == "csr":
        new_ops = _to_csr(new_ops, state, masks)
    if pre is not None:
        new_ops = [{"op": "normalize", "mean": pre["mean"], "std": pre["std"]}, *new_ops]
    semi = None
    if to == "semi":
        semi_record = semi_layers(new_ops, masks)
        if not any(e["eligible"] for e in semi_record.values()):
            raise ExportError(f"a semi export needs a {SEMI_PATTERN} ticket: no Linear layer of {type(model).__name__} keeps "
                              "at most 2 of every 4 consecutive input weights (make one with: lottery structure nm "
                              "RUN_DIR --nm 2:4)")
        semi = {"pattern": SEMI_PATTERN, "layers": semi_record}
    net = build_network(new_ops)
    _fill(net, new_ops, state)
    net.eval()

    reference = _masked_reference(model, mask)  # a plain masked copy; the caller's model is untouched
    raw, normalised = _check_inputs(input_shape, check_inputs, seed, pre)
    ref_out, got = _outputs(reference, normalised), _outputs(net, raw)
    check = {"max_abs_diff": float((ref_out - got).abs().max()), "max_abs_reference": float(ref_out.abs().max()),
             "inputs": check_inputs}
    check["tolerance"] = RTOL * max(1.0, check["max_abs_reference"])
    check["ok"] = check["max_abs_diff"] <= check["tolerance"]
    if not check["ok"]:
        raise ExportError(f"the exported ({to}) network differs from the masked one by {check['max_abs_diff']:.3g} "
                          f"(tolerance {check['tolerance']:.3g})")
    original = _count(reference)
    dense_flops = network_cost(model, {}, input_shape)["flops_dense"]
    export_flops = network_cost(net, None, input_shape)["flops_sparse"]
    description = {
        "format": FORMAT, "version": FORMAT_VERSION, "kind": to, "family": type(model).__name__,
        "input_shape": list(input_shape), "num_classes": int(ref_out.shape[1]) if ref_out.dim() == 2 else None,
        "preprocessing": pre,
        "ops": new_ops, "layers": layers, "check": check,
        "size": {"original_parameters": original["parameters"],
                 "original_nonzero_parameters": original["nonzero_parameters"], **_count(net)},
        # multiply-accumulates per example (lottery.cost): the network before pruning, the export as built
        "flops": {"dense": dense_flops, "export": export_flops, "theoretical_speedup": dense_flops / export_flops},
    }
    if semi is not None:
        description["semi"] = semi
    return Exported(net, description, sample=(raw, ref_out))


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


def save_export(folder: str | Path, exported: Exported, extra: Mapping[str, Any] | None = None,
                portable: Sequence[str] = ()) -> Path:
    """Write ``model.safetensors`` (the exported module's tensors) and ``model.json`` (its description
    plus ``extra``) into ``folder``, and the ``portable`` files (``"torchscript"``: ``model.pt``,
    ``"onnx"``: ``model.onnx``), each checked against the masked network's outputs on the check's inputs
    before it is kept (see :mod:`lottery.export.portable`); returns the folder."""
    folder = Path(folder)
    if any(_is_semi_tensor(p) for p in exported.module.parameters()):
        raise ExportError("this network runs semi-structured 2:4 weights, which are not portable: save the export "
                          "as exported, or as loaded on the CPU (load_export without device=)")
    folder.mkdir(parents=True, exist_ok=True)
    description = {**exported.description, **(extra or {})}
    files: dict[str, Any] = {}
    for fmt in dict.fromkeys(portable):
        if exported.sample is not None:
            inputs, reference = exported.sample
        else:  # a loaded export: the file must compute what the loaded network computes
            inputs, _ = _check_inputs(description["input_shape"], int(description["check"]["inputs"]), 0,
                                      description.get("preprocessing"))
            reference = _outputs(exported.module, inputs)
        files[fmt] = write_portable(folder, fmt, exported.module, inputs, reference)
    if files:
        description["portable"] = files
    save_tensors(folder / "model.safetensors", exported.module.state_dict(), metadata={"format": FORMAT})
    write_json(folder / "model.json", description)
    return folder


def _is_semi_tensor(t: torch.Tensor) -> bool:
    cls = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    return cls is not None and isinstance(t, cls)


def load_export(folder: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                log: Callable[[str], None] | None = None) -> Exported:
    """Rebuild an exported network from ``model.json`` and load ``model.safetensors`` (no unpickling), then
    move it to ``device`` and ``dtype`` (default: the CPU, float32, as stored).

    A ``semi`` export's N:M Linear layers are then converted to ``torch.sparse`` semi-structured weights
    where the device and dtype allow it (a CUDA GPU of compute capability 8.0 or more; float16 or bfloat16,
    e.g. ``load_export(folder, device="cuda", dtype=torch.float16)``); otherwise they stay the dense masked
    layers, and one line through ``log`` (default: standard error) says why (:func:`semi_structured`).
    The converted layers are in ``description["semi"]["converted"]``.

    When the description has ``preprocessing`` (exports from ``lottery export`` record the run's data set),
    the network normalises its inputs itself: it takes float pixels in [0, 1], shape (N, C, H, W)
    (:data:`INPUT_CONVENTION`), not normalised ones."""
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
    if device is not None or dtype is not None:
        net.to(device=device, dtype=dtype)
    if desc.get("kind") == "semi":
        _, converted = semi_structured(net, semi_modules(desc), log=log)
        desc["semi"] = {**desc.get("semi", {}), "converted": converted}
    return Exported(net, desc)


def semi_modules(description: Mapping[str, Any]) -> list[str]:
    """The module paths of a ``semi`` export's eligible (2:4 Linear) layers, from its ``model.json``."""
    layers = (description.get("semi") or {}).get("layers") or {}
    return [e["module"] for e in layers.values() if e.get("eligible")]
