"""Training checkpoints as ONE safetensors file: tensors plus a JSON header in its metadata.

One file, written atomically, means a checkpoint is either wholly there or not there: a crash between
writing "the tensors" and "the JSON" cannot leave a mismatched pair. Loading parses JSON and raw
tensors only; no pickle, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save_bytes

from lottery.errors import CheckpointError
from lottery.io import atomic_write_bytes

FORMAT = "lottery-checkpoint-1"


def _flatten_optimizer(i: int, state: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Move an optimizer state_dict's tensors into ``tensors``; return the JSON-able remainder."""
    json_state: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        entry: dict[str, Any] = {}
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                key = f"__optim__/{i}/{pid}/{k}"
                tensors[key] = v.detach().cpu().contiguous()
                entry[k] = {"__tensor__": key}
            else:
                entry[k] = v
        json_state[str(pid)] = entry
    return {"state": json_state, "param_groups": state["param_groups"]}


def _unflatten_optimizer(saved: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {}
    for pid, entry in saved["state"].items():
        state[int(pid)] = {
            k: (tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v)
            for k, v in entry.items()
        }
    return {"state": state, "param_groups": saved["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_states: list[dict] = (),  # type: ignore[assignment]
    extra_tensors: dict[str, torch.Tensor] | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    """Write model + optimizer states + RNG state + ``info`` (any JSON) to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model_state.items():
        tensors[f"model/{k}"] = v.detach().cpu().contiguous()
    optim_json = [_flatten_optimizer(i, s, tensors) for i, s in enumerate(optimizer_states)]
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra/{k}"] = v.detach().cpu().contiguous()
    tensors["__rng__/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"__rng__/cuda{d}"] = s
    header = {"format": FORMAT, "optimizers": optim_json, "info": info or {}}
    meta = {"lottery": json.dumps(header, allow_nan=True)}
    atomic_write_bytes(path, st_save_bytes(tensors, metadata=meta))


class Checkpoint:
    """A loaded checkpoint: ``model_state``, ``optimizer_states``, ``extra_tensors``, ``info``."""

    def __init__(self, model_state, optimizer_states, extra_tensors, info, rng):
        self.model_state: dict[str, torch.Tensor] = model_state
        self.optimizer_states: list[dict] = optimizer_states
        self.extra_tensors: dict[str, torch.Tensor] = extra_tensors
        self.info: dict[str, Any] = info
        self._rng = rng

    def restore_rng(self) -> None:
        if "cpu" in self._rng:
            torch.set_rng_state(self._rng["cpu"])
        if torch.cuda.is_available():
            states = [self._rng[k] for k in sorted(self._rng) if k.startswith("cuda")]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(
            f"checkpoint {path} is unreadable or corrupt ({e}); delete it to restart that stage"
        ) from None
    try:
        header = json.loads(meta["lottery"])
        if header.get("format") != FORMAT:
            raise KeyError("format")
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a lottery checkpoint (missing or unknown header)") from None
    model_state, extra, rng = {}, {}, {}
    for k, v in tensors.items():
        if k.startswith("model/"):
            model_state[k[len("model/"):]] = v
        elif k.startswith("extra/"):
            extra[k[len("extra/"):]] = v
        elif k.startswith("__rng__/"):
            rng[k[len("__rng__/"):]] = v
    optims = [_unflatten_optimizer(o, tensors) for o in header["optimizers"]]
    return Checkpoint(model_state, optims, extra, header.get("info", {}), rng)
