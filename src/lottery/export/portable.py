"""Portable copies of an export: a TorchScript file (``model.pt``, runs with torch alone) and an ONNX file
(``model.onnx``, runs with onnxruntime alone; needs the ``onnx`` extra). Both contain the data set's
normalisation as their first op, so they take the same raw inputs as :func:`lottery.export.load_export`'s
network. Each file is written to a temporary name, loaded back, run on the check's inputs and compared with
the masked network's outputs; it gets its final name only if they agree."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lottery.errors import ConfigError
from lottery.export._base import RTOL, ExportError
from lottery.export.layers import CSRLinear
from lottery.io import fault_kill, fault_phase

PORTABLE_FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx"}
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


def _trace_input(like: torch.Tensor) -> torch.Tensor:
    # Two examples, unlike the check's batch: a batch size baked into the file would fail the check.
    return like[:2].clone() if like.shape[0] != 2 else like[:1].clone()


def _torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice, sparse CSR's beta notice
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path))
    return lambda x: loaded(x)


def _onnx(module: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("ONNX export needs onnx and onnxruntime: pip install 'lottery[onnx]' "
                          "(or pip install onnx onnxruntime)") from None
    if any(isinstance(m, CSRLinear) for m in module.modules()):
        raise ExportError("ONNX has no sparse CSR matrices: export a csr network as TorchScript, or export "
                          "--to dense/blocks for ONNX")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"the ONNX exporter refused the network: {line}") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])


def write_portable(folder: str | Path, fmt: str, module: nn.Module, inputs: torch.Tensor,
                   reference: torch.Tensor) -> dict[str, Any]:
    """Write ``module`` (in eval mode, on the CPU) as ``fmt`` into ``folder``; check that the file's outputs
    on ``inputs`` equal ``reference`` (the masked network's) within the export's tolerance, else delete it
    and raise :class:`ExportError`. Returns ``{"file", "check"}`` for model.json."""
    if fmt not in PORTABLE_FORMATS:
        raise ConfigError(f"portable format must be one of {', '.join(PORTABLE_FORMATS)}, got {fmt!r}")
    folder = Path(folder)
    final = folder / PORTABLE_FORMATS[fmt]
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    for stale in folder.glob(f".{final.name}.tmp-*"):  # left by an export that was killed while writing
        stale.unlink(missing_ok=True)
    module = module.cpu().eval()
    kill_at = fault_phase(final)  # crash tests (lottery.io); None unless LOTTERY_FAULT_KILL_AT_WRITE is set
    try:
        with torch.no_grad():
            run = (_torchscript if fmt == "torchscript" else _onnx)(module, _trace_input(inputs), tmp)
            if kill_at == "mid":  # as if killed while the library wrote it: half of it on disk
                os.truncate(tmp, tmp.stat().st_size // 2)
                fault_kill(final, kill_at)
            got = run(inputs.cpu())
        diff = float((got.float() - reference.float()).abs().max())
        scale = float(reference.abs().max())
        tolerance = RTOL * max(1.0, scale)
        if not diff <= tolerance:
            raise ExportError(f"the {fmt} file computes something else than the masked network (max difference "
                              f"{diff:.3g}, tolerance {tolerance:.3g}); it was not written")
        with open(tmp, "rb") as f:  # on disk before it gets its name, as lottery.io's atomic writes
            os.fsync(f.fileno())
        if kill_at == "before-rename":
            fault_kill(final, kill_at)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    if kill_at == "after-rename":
        fault_kill(final, kill_at)
    return {"file": final.name, "check": {"max_abs_diff": diff, "max_abs_reference": scale,
                                          "inputs": int(inputs.shape[0]), "tolerance": tolerance, "ok": True}}
