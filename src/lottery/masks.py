"""The ``Mask`` type: which prunable weights are kept.

A ``Mask`` maps a parameter name as it appears in the model's ``state_dict`` (``"fc1.weight"``,
``"layer1.0.conv1.weight"``) to a bool tensor of the parameter's shape (``True`` = kept). Densities are
always counted from the mask (docs/methods.md: never from zeros in the weights) and only over the mask's own
entries, i.e. the prunable weights.

Masks are saved as safetensors (uint8, never pickled) with a human-readable JSON sparsity report beside
them (``mask.safetensors`` -> ``mask.json``), both written atomically.

Interop with ``torch.nn.utils.prune``: :meth:`Mask.to_torch_prune` applies a mask with
``prune.custom_from_mask`` (the module gets ``weight_orig`` and a ``weight_mask`` buffer) and
:meth:`Mask.from_torch_prune` reads ``*.weight_mask`` buffers (of a pruned model, or of a state_dict of a
torch-pruned or of a hard-masked model) back into a ``Mask``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch import nn

from lottery.errors import CheckpointError, ConfigError
from lottery.io import load_tensors, save_tensors, write_json
from lottery.parameters import has_hard_mask, has_soft_mask, logical_named_parameters, prunable_weights
from lottery.parameters import short_list as _short_list

__all__ = ["Mask"]

_FORMAT = "lottery.mask"
_FORMAT_VERSION = "1"


def _as_bool(name: str, value: Any) -> torch.Tensor:
    """A bool copy of ``value``; numeric values must all be 0 or 1 (anything else is a bug upstream)."""
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    t = t.detach()
    if t.dtype == torch.bool:
        return t.clone()
    if t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
        raise ConfigError(f"mask entry {name!r} has values other than 0 and 1 (dtype {t.dtype})")
    return t != 0


def _shape(x: Any) -> tuple[int, ...]:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, torch.Size):
        return tuple(x)
    return tuple(int(d) for d in x)


class Mask(Mapping[str, torch.Tensor]):
    """A read-only mapping parameter name -> bool tensor (``True`` = weight kept).

    Construct from any mapping of tensors (bool, or numeric with only 0/1 values); the tensors are copied.
    Insertion order is kept (it is the order of the model's prunable weights when built by this library).
    """

    __slots__ = ("_masks",)

    def __init__(self, masks: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None):
        items = masks.items() if isinstance(masks, Mapping) else (masks or ())
        self._masks: dict[str, torch.Tensor] = {}
        for name, value in items:
            if not isinstance(name, str):
                raise ConfigError(f"mask names must be strings, got {name!r}")
            self._masks[name] = _as_bool(name, value)

    # ---------------------------------------------------------------- constructors

    @classmethod
    def ones(
        cls,
        model_or_named_shapes: nn.Module | Mapping[str, Any],
        names: Iterable[str] | None = None,
    ) -> "Mask":
        """A mask that keeps everything.

        ``model_or_named_shapes`` is a model (names default to its prunable weights, see
        :func:`lottery.masking.prunable_weights`) or a mapping name -> tensor/shape (names default to all
        of its keys).
        """
        if isinstance(model_or_named_shapes, nn.Module):
            model = model_or_named_shapes
            if names is None:
                shapes = {n: tuple(p.shape) for n, p in prunable_weights(model).items()}
            else:
                params = logical_named_parameters(model)
                names = list(names)
                unknown = [n for n in names if n not in params]
                if unknown:
                    raise ConfigError(
                        f"not parameters of the model: {_short_list(unknown)}; "
                        f"parameters are: {_short_list(params, 50)}"
                    )
                shapes = {n: tuple(params[n].shape) for n in names}
        else:
            named = model_or_named_shapes
            keys = list(named) if names is None else list(names)
            unknown = [n for n in keys if n not in named]
            if unknown:
                raise ConfigError(f"names without a shape: {_short_list(unknown)}")
            shapes = {n: _shape(named[n]) for n in keys}
        return cls({n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()})

    @classmethod
    def from_torch_prune(cls, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> "Mask":
        """Read ``<param>_mask`` tensors into a Mask keyed ``<param>``.

        Accepts a module pruned with ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask``), or a
        state_dict with keys ``xxx.weight_mask`` (from a torch-pruned model: ``xxx.weight_orig``, or from a
        model with a hard mask of :mod:`lottery.masking`: ``xxx.weight``). A key ``xxx.foo_mask`` is only
        read when ``xxx.foo_orig`` or ``xxx.foo`` is also present, so unrelated buffers such as an
        attention mask are not mistaken for pruning masks.
        """
        if isinstance(model_or_state_dict, nn.Module):
            tensors: dict[str, torch.Tensor] = dict(model_or_state_dict.named_parameters())
            tensors.update(dict(model_or_state_dict.named_buffers()))
        elif isinstance(model_or_state_dict, Mapping):
            tensors = dict(model_or_state_dict)
        else:
            raise ConfigError(f"expected an nn.Module or a state_dict, got {type(model_or_state_dict).__name__}")
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if not key.endswith("_mask"):
                continue
            stem = key[: -len("_mask")]
            if stem + "_orig" in tensors or stem in tensors:
                out[stem] = value
        return cls(out)

    # ---------------------------------------------------------------- mapping protocol

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        if set(self._masks) != set(other._masks):
            return False
        return all(
            self._masks[n].shape == other._masks[n].shape
            and torch.equal(self._masks[n].cpu(), other._masks[n].cpu())
            for n in self._masks
        )

    __hash__ = None  # type: ignore[assignment]  # mutable tensors inside

    def __repr__(self) -> str:
        if not self._masks:
            return "Mask({})"
        return f"Mask({len(self)} tensors, {self.num_kept()}/{self.num_total()} kept, density {self.density():.6g})"

    # ---------------------------------------------------------------- counts

    def num_kept(self) -> int:
        return int(sum(int(m.sum()) for m in self._masks.values()))

    def num_total(self) -> int:
        return int(sum(m.numel() for m in self._masks.values()))

    def num_pruned(self) -> int:
        return self.num_total() - self.num_kept()

    def density(self) -> float:
        """Kept / total over the mask's own entries (prunable weights only); 1.0 for an empty mask."""
        total = self.num_total()
        return self.num_kept() / total if total else 1.0

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def layer_densities(self) -> dict[str, float]:
        return {n: (int(m.sum()) / m.numel() if m.numel() else 1.0) for n, m in self._masks.items()}

    def sparsity_report(self) -> dict[str, Any]:
        """JSON-ready counts: total ``density``/``sparsity``/``kept``/``total`` and ``layers`` per name."""
        layers = {}
        for n, m in self._masks.items():
            kept, total = int(m.sum()), m.numel()
            layers[n] = {
                "kept": kept,
                "total": total,
                "density": kept / total if total else 1.0,
                "shape": list(m.shape),
            }
        return {
            "density": self.density(),
            "sparsity": self.sparsity(),
            "kept": self.num_kept(),
            "total": self.num_total(),
            "layers": layers,
        }

    # ---------------------------------------------------------------- algebra

    def _check_compatible(self, other: "Mask", op: str) -> None:
        if not isinstance(other, Mask):
            raise TypeError(f"cannot {op} a Mask with {type(other).__name__}")
        if set(self._masks) != set(other._masks):
            only_a = [n for n in self._masks if n not in other._masks]
            only_b = [n for n in other._masks if n not in self._masks]
            raise ConfigError(
                f"cannot {op} masks with different names: only in the first: {_short_list(only_a)}; "
                f"only in the second: {_short_list(only_b)}"
            )
        bad = [
            f"{n}: {tuple(m.shape)} vs {tuple(other._masks[n].shape)}"
            for n, m in self._masks.items()
            if m.shape != other._masks[n].shape
        ]
        if bad:
            raise ConfigError(f"cannot {op} masks with different shapes: {_short_list(bad)}")

    def __and__(self, other: "Mask") -> "Mask":
        """Intersection: kept where both keep."""
        self._check_compatible(other, "intersect")
        return Mask({n: m & other._masks[n].to(m.device) for n, m in self._masks.items()})

    def __or__(self, other: "Mask") -> "Mask":
        """Union: kept where either keeps."""
        self._check_compatible(other, "unite")
        return Mask({n: m | other._masks[n].to(m.device) for n, m in self._masks.items()})

    intersection = __and__
    union = __or__

    def __invert__(self) -> "Mask":
        """The pruned positions as a mask."""
        return Mask({n: ~m for n, m in self._masks.items()})

    def to(self, device: str | torch.device) -> "Mask":
        return Mask({n: m.to(device) for n, m in self._masks.items()})

    def cpu(self) -> "Mask":
        return self.to("cpu")

    def clone(self) -> "Mask":
        return Mask(self._masks)

    def numpy(self) -> dict[str, Any]:
        return {n: m.cpu().numpy() for n, m in self._masks.items()}

    # ---------------------------------------------------------------- checks

    def validate(self, model: nn.Module, expected_names: Iterable[str] | None = None) -> None:
        """Check that every name is a parameter of ``model`` with the same shape.

        With ``expected_names``, the mask must also have exactly these names (e.g. the model's prunable
        weights). Raises :class:`CheckpointError` naming the missing and unexpected entries and the
        mismatching shapes (expected vs got).
        """
        params = logical_named_parameters(model)
        problems = []
        unknown = [n for n in self._masks if n not in params]
        if unknown:
            problems.append(f"not parameters of the model (unexpected): {_short_list(unknown)}")
        if expected_names is not None:
            expected = list(expected_names)
            missing = [n for n in expected if n not in self._masks]
            extra = [n for n in self._masks if n not in set(expected) and n not in unknown]
            if missing:
                problems.append(f"missing from the mask: {_short_list(missing)}")
            if extra:
                problems.append(f"unexpected (not among the expected names): {_short_list(extra)}")
        bad_shapes = [
            f"{n}: expected {tuple(params[n].shape)}, got {tuple(m.shape)}"
            for n, m in self._masks.items()
            if n in params and tuple(params[n].shape) != tuple(m.shape)
        ]
        if bad_shapes:
            problems.append(f"shape mismatch: {_short_list(bad_shapes)}")
        if problems:
            hint = f" (the model's parameters are: {_short_list(params, 30)})" if unknown else ""
            raise CheckpointError(
                f"mask does not fit the model {type(model).__name__}: " + "; ".join(problems) + hint
            )

    # ---------------------------------------------------------------- files

    @staticmethod
    def report_path(path: str | os.PathLike) -> Path:
        """Where :meth:`save` writes the JSON report for a mask saved at ``path``."""
        return Path(path).with_suffix(".json")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask (safetensors, uint8) and its JSON sparsity report beside it; both atomic.

        Returns the path of the JSON report (``path.with_suffix('.json')``).
        """
        path = Path(path)
        report = self.report_path(path)
        if report == path:
            raise ConfigError(f"a mask file must not end in .json (the report goes there): {path}")
        # The report first: pipelines take an existing mask file as "this mask is saved" and skip saving
        # it again, so a crash between the two writes must not leave the mask without its report.
        write_json(report, self.sparsity_report())
        save_tensors(
            path,
            {n: m.to(torch.uint8) for n, m in self._masks.items()},
            metadata={"format": _FORMAT, "version": _FORMAT_VERSION, "names": json.dumps(list(self._masks))},
        )
        return report

    @classmethod
    def load_or_create(cls, path: str | os.PathLike, make: "Callable[[], Mask]") -> "Mask":
        """The mask saved at ``path``; if there is none, ``make()`` it and save it there first.

        How a resumable stage fixes its mask once: a run killed after this call finds the same mask.
        """
        if Path(path).exists():
            return cls.load(path)
        mask = make()
        mask.save(path)
        return mask

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mask":
        """Read a mask saved by :meth:`save` (or any safetensors file of 0/1 tensors). Never unpickles."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"mask file not found: {path}")
        try:
            tensors = load_tensors(path)
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
            raise CheckpointError(
                f"mask file {path} is unreadable or corrupt (not a valid safetensors file): {exc}"
            ) from exc
        try:  # safetensors sorts its entries; restore the saved (module) order when it is recorded
            order = json.loads(metadata.get("names", "[]"))
        except ValueError:
            order = []
        if isinstance(order, list) and sorted(map(str, order)) == sorted(tensors):
            tensors = {n: tensors[n] for n in order}
        out = {}
        for name, t in tensors.items():
            if t.dtype != torch.bool and (t.is_complex() or not bool(((t == 0) | (t == 1)).all())):
                raise CheckpointError(
                    f"mask file {path} is corrupt: entry {name!r} has values other than 0 and 1"
                )
            out[name] = t != 0 if t.dtype != torch.bool else t
        return cls(out)

    # ---------------------------------------------------------------- torch.nn.utils.prune

    def to_torch_prune(self, model: nn.Module) -> nn.Module:
        """Apply the mask with ``torch.nn.utils.prune.custom_from_mask`` to each masked parameter.

        Each module gets ``<name>_orig`` (parameter) and ``<name>_mask`` (buffer) as torch's pruning does.
        The model must not carry masks of :mod:`lottery.masking` on the same weights. Returns the model.
        """
        from torch.nn.utils import prune

        self.validate(model)
        for name, m in self._masks.items():
            module_name, _, pname = name.rpartition(".")
            module = model.get_submodule(module_name)
            if has_hard_mask(module, pname) or has_soft_mask(module, pname):
                raise ConfigError(
                    f"{name} already has a lottery mask; remove it (lottery.masking.remove_masks) before "
                    "applying torch pruning"
                )
            ref = getattr(module, pname)
            prune.custom_from_mask(module, pname, mask=m.to(device=ref.device, dtype=ref.dtype))
        return model
