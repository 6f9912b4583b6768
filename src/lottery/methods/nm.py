"""N:M sparsity (issue 22, part 2): in every group of ``M`` consecutive input weights of a row, at most ``N``
are kept (2:4 by default, the pattern of NVIDIA's sparse tensor cores and
``torch.sparse.to_sparse_semi_structured``).

A layer is seen as the matrix ``C_out x fan_in`` (a conv's ``fan_in`` is ``C_in * kh * kw`` in the order of
``weight.reshape(C_out, -1)``, as in :mod:`lottery.methods.structured`); a row's weights are cut into groups
of ``M`` consecutive columns. When ``fan_in`` is not a multiple of ``M``, the last group of each row is
shorter and keeps at most ``N`` too.

* :func:`nm_mask` keeps, in every group, the ``N`` entries with the largest score (ties: the lower column
  first); with ``keep``, only entries that ``keep`` keeps are candidates. The scores are anything: ``|w|``
  (IMP's magnitudes), CS's mask logits.
* :func:`nm_prune` (the N:M post-processing of any ticket, like Refill and Regroup): keep the ``N``
  largest ``|w|`` among the kept weights of each group. A group with ``N`` or fewer kept weights keeps
  exactly them: weights are only ever removed, never revived, so the result is a subset of the ticket
  and has at most ``N/M`` of its weights. The CS variant passes the mask logits as ``scores``.
* :func:`satisfies_nm` checks the constraint. Every function is idempotent: an N:M mask is unchanged.
"""

from __future__ import annotations

from typing import Mapping

import torch

from lottery.errors import ConfigError
from lottery.masks import Mask

__all__ = ["DEFAULT_NM", "LOGITS_SUFFIX", "nm_mask", "nm_prune", "parse_nm", "satisfies_nm"]

DEFAULT_NM = "2:4"
LOGITS_SUFFIX = "_mask_logits"  # a CS mask's logits in a raw state dict (lottery.masking's name)


def parse_nm(text: str | tuple[int, int]) -> tuple[int, int]:
    """``"2:4"`` (or ``(2, 4)``) -> ``(2, 4)``; needs ``1 <= N < M``."""
    if isinstance(text, tuple):
        n, m = text
    else:
        try:
            n_text, m_text = str(text).split(":")
            n, m = int(n_text), int(m_text)
        except ValueError:
            raise ConfigError(f"N:M sparsity must be written N:M with integers, e.g. 2:4, got {text!r}") from None
    if not (1 <= n < m):
        raise ConfigError(f"N:M sparsity needs 1 <= N < M, got {n}:{m}")
    return int(n), int(m)


def _groups(t: torch.Tensor, m: int, fill: float) -> torch.Tensor:
    """``rows x groups x M`` view of ``t`` (rows: dim 0), the short last group padded with ``fill``."""
    t2 = t.reshape(t.shape[0], -1)
    pad = (-t2.shape[1]) % m
    if pad:
        t2 = torch.cat([t2, t2.new_full((t2.shape[0], pad), fill)], 1)
    return t2.reshape(t2.shape[0], -1, m)


def _layer_nm(scores: torch.Tensor, keep: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    if scores.dim() < 2:
        raise ConfigError(f"N:M sparsity needs a weight matrix or conv kernel, got a tensor of shape {tuple(scores.shape)}")
    s = scores.detach().to("cpu", torch.float64)
    cand = torch.ones(s.shape, dtype=torch.bool) if keep is None else keep.cpu().bool()
    s = s.masked_fill(~cand, float("-inf"))
    g = _groups(s, m, float("-inf"))
    cg = _groups(cand, m, False)
    # the N best of each group, ties to the lower column: a stable descending sort
    order = torch.sort(g, dim=2, descending=True, stable=True).indices[..., :n]
    chosen = torch.zeros_like(cg)
    chosen.scatter_(2, order, True)
    chosen &= cg  # a group with fewer than N candidates keeps only those
    fan_in = s[0].numel() if s.shape[0] else 0
    return chosen.reshape(s.shape[0], -1)[:, :fan_in].reshape(scores.shape)


def nm_mask(scores: Mapping[str, torch.Tensor], n: int = 2, m: int = 4, keep: Mask | None = None) -> Mask:
    """Per layer, the ``N`` highest-scoring entries of every group of ``M`` consecutive inputs (among the
    entries ``keep`` keeps, when given; a group with fewer than ``N`` of them keeps those)."""
    n, m = parse_nm((n, m))
    names = list(keep) if keep is not None else list(scores)
    missing = [k for k in names if k not in scores]
    if missing:
        raise ConfigError(f"no scores for {', '.join(missing[:10])}")
    return Mask({k: _layer_nm(scores[k], keep[k] if keep is not None else None, n, m) for k in names})


def nm_prune(mask: Mask, weights: Mapping[str, torch.Tensor], n: int = 2, m: int = 4,
             scores: Mapping[str, torch.Tensor] | None = None) -> Mask:
    """N:M post-processing of a ticket: in every group keep the ``N`` kept weights of largest ``|w|`` (or of
    largest ``scores``, e.g. CS's mask logits); groups with ``N`` or fewer kept weights are unchanged."""
    if scores is None:
        missing = [k for k in mask if k not in weights]
        if missing:
            raise ConfigError(f"no weights given for masked tensor(s) {', '.join(missing[:10])}")
        scores = {k: weights[k].detach().abs() for k in mask}
    return nm_mask(scores, n, m, keep=mask)


def satisfies_nm(mask: Mapping[str, torch.Tensor], n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``M`` consecutive inputs of every layer keeps at most ``N`` weights."""
    n, m = parse_nm((n, m))
    return all(int(_groups(t.bool(), m, False).sum(2).max()) <= n for t in mask.values() if t.numel())
