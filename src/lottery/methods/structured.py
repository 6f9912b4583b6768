"""Structured tickets (SLT, Chen et al. 2022; docs/methods.md): turn an unstructured mask into channels or blocks
(or N:M groups: :mod:`lottery.methods.nm`).

Every function here is pure: ``Mask`` + trained weights -> ``Mask``. Each layer is seen as the matrix
``C_out x (C_in * kh * kw)`` (a Linear layer as ``out x in``): a *row* is an output channel or neuron.

* :func:`refill` (channel-wise): a layer keeping ``nnz`` weights keeps ``n = floor(nnz / fan_in)`` whole
  rows (at least one when ``nnz > 0``), the ``n`` with the largest score: the L1 norm of their kept trained
  weights (``score='l1'``, the paper's) or their count of kept weights (``'count'``). Rounding down means
  the refilled layer never has more weights than the unstructured one. **Refill+** keeps a further
  ``floor((C_out - n) * fillback_rate)`` rows, the next ones in the same ranking.
  ``groups`` couples layers whose outputs are added together (the block outputs and the stem/shortcut of a
  residual stage): they keep the *same* rows, ``floor(sum nnz / sum fan_in)`` of them, ranked by the sum of
  each layer's scores normalised to sum 1. That is what lets a residual network physically lose channels.
* :func:`regroup` (group-wise): partition the rows of each layer with a hypergraph partitioner (rows are
  nodes, the columns with a kept weight are hyperedges; KaHyPar by default, or METIS on the row-similarity
  graph ``M M^T``), then turn each part into dense blocks (see :func:`blocks_from_parts`); the new mask is
  the union of the blocks. If the partitioner fails, :class:`PartitionError` is raised: there is no
  fallback to the unstructured mask.

Regroup's rules, as implemented (docs/methods.md gives them in words; these are the exact ones):

1. a layer is cut into ``k = min(parts, C_out // min_rows)`` parts (at least 1);
2. a part with fewer than ``min_rows`` rows (the partitioner balances only within ``imbalance``) is
   dissolved: each of its rows joins the part that has the most kept columns in common with it;
3. a part with more than ``max_rows`` rows is split into ``ceil(rows / max_rows)`` near-equal chunks of
   consecutive rows (so every block has between ``min_rows`` and ``max_rows`` rows, or all the rows of a
   layer smaller than ``min_rows``);
4. per chunk, columns are taken in decreasing order of their kept count in the chunk (ties: lower index
   first) until the block covers every kept weight of the chunk or its area would exceed
   ``coverage x`` the chunk's kept count (at least one column).

``columns='channel'`` (an option of ours, not the paper's) makes a conv layer's column unit a whole input
channel (its ``kh x kw`` weights): the partitioner's hyperedges are the input channels, rule 4 counts the
kept weights per input channel and a block's area in weights. Such blocks are small dense convolutions
(a row group times an input-channel group), which a CPU runs with its ordinary conv kernels; element
blocks need an im2col first (see :mod:`lottery.export`). For Linear layers both units are the same.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from lottery.errors import ConfigError, LotteryError
from lottery.hparams import Hparams
from lottery.masks import Mask
from lottery.methods.nm import LOGITS_SUFFIX, nm_prune, parse_nm

__all__ = [
    "METHODS",
    "Block",
    "PartitionError",
    "StructuredHparams",
    "blocks_from_parts",
    "channel_counts",
    "kahypar_partition",
    "metis_partition",
    "partition_rows",
    "refill",
    "regroup",
    "regroup_blocks",
    "structure",
]

METHODS = ("refill", "refill+", "regroup", "nm")
SCORES = ("l1", "count")
PARTITIONERS = ("kahypar", "metis")


class PartitionError(LotteryError):
    """The hypergraph/graph partitioner is missing, crashed or returned an invalid partition."""


@dataclass(frozen=True)
class StructuredHparams(Hparams):
    """How an unstructured mask becomes a channel (refill, refill+) or group (regroup) ticket."""

    method: str = "refill"
    score: str = "l1"  # refill: rank rows by the L1 norm of their kept weights, or by their kept count
    fillback_rate: float = 0.1  # refill+ only: fraction of the dropped rows added back
    parts: int = 8  # regroup: parts per layer (the paper used 8 with hMETIS)
    coverage: float = 1.5  # regroup: a block's area is at most this times its rows' kept count
    min_rows: int = 16  # regroup: fewest rows of a block
    max_rows: int = 32  # regroup: most rows of a block (larger parts are split)
    partitioner: str = "kahypar"  # regroup: kahypar (hypergraph) or metis (row-similarity graph)
    columns: str = "element"  # regroup: element (im2col columns, the paper's) or channel (whole input channels)
    imbalance: float = 0.05  # regroup: allowed part-size imbalance of the partitioner
    seed: int = 0  # regroup: partitioner seed
    nm: str = "2:4"  # nm: at most N of every M consecutive input weights kept (lottery.methods.nm)

    _prefix = "structured"
    _help = {
        "method": "refill (channels), refill+ (channels plus a fill-back) or regroup (dense blocks)",
        "score": "refill: rank channels by l1 (norm of their kept trained weights) or count (kept weights)",
        "fillback_rate": "refill+: fraction of the dropped channels added back",
        "parts": "regroup: parts per layer of the row partition",
        "coverage": "regroup: a block's area is at most this times the kept weights of its rows",
        "min_rows": "regroup: fewest rows of a dense block",
        "max_rows": "regroup: most rows of a dense block (larger parts are split)",
        "partitioner": "regroup: kahypar (hypergraph partitioner) or metis (graph partitioner on row similarity)",
        "columns": "regroup: block columns are im2col elements (element, the paper's) or whole input channels (channel)",
        "imbalance": "regroup: allowed imbalance of part sizes",
        "seed": "regroup: partitioner seed",
        "nm": "nm: N:M sparsity, at most N kept in every group of M consecutive input weights (e.g. 2:4)",
    }

    def __post_init__(self) -> None:
        self._choice("method", METHODS)
        self._choice("score", SCORES)
        self._choice("partitioner", PARTITIONERS)
        self._choice("columns", ("element", "channel"))
        if not isinstance(self.nm, str):
            raise ConfigError(f"StructuredHparams.nm must be a string N:M, e.g. '2:4', got {self.nm!r}")
        parse_nm(self.nm)
        r = self.fillback_rate
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not (0 <= r <= 1):
            raise ConfigError(f"StructuredHparams.fillback_rate must be in [0, 1], got {r!r}")
        for name in ("parts", "min_rows", "max_rows"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"StructuredHparams.{name} must be a positive integer, got {v!r}")
        if self.max_rows < self.min_rows:
            raise ConfigError(f"StructuredHparams.max_rows ({self.max_rows}) must be >= min_rows ({self.min_rows})")
        self._positive("coverage")
        if self.coverage < 1:
            raise ConfigError(f"StructuredHparams.coverage must be >= 1, got {self.coverage}")
        self._non_negative("imbalance")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"StructuredHparams.seed must be an integer, got {self.seed!r}")

    def identity(self) -> "StructuredHparams":
        """These hparams with the fields the method does not use reset to their defaults (for hashing:
        refill with another regroup setting is the same run)."""
        d = StructuredHparams()
        if self.method == "regroup":
            return self.replace(score=d.score, fillback_rate=d.fillback_rate, nm=d.nm)
        if self.method == "nm":
            return StructuredHparams(method="nm", nm=self.nm)
        keep = {"method": self.method, "score": self.score}
        if self.method == "refill+":
            keep["fillback_rate"] = self.fillback_rate
        return StructuredHparams(**keep)


# ============================================================================ refill


def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.dim() < 2:
        raise ConfigError(f"structured tickets need weight matrices or conv kernels, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


def _floor_fraction(rate: float, n: int) -> int:
    return int(Fraction(str(rate)) * n)  # int() of a non-negative Fraction is its floor


def channel_counts(mask: Mask) -> dict[str, int]:
    """Refill's row count per layer: ``floor(nnz / fan_in)``, at least 1 when the layer keeps anything."""
    out = {}
    for name, m in mask.items():
        m2 = _rows(m)
        nnz, fan_in = int(m2.sum()), m2.shape[1]
        out[name] = max(1, nnz // fan_in) if nnz > 0 else 0
    return out


def _row_scores(m2: torch.Tensor, w2: torch.Tensor | None, score: str) -> torch.Tensor:
    if score == "count":
        return m2.sum(1).to(torch.float64)
    if w2 is None:
        raise ConfigError("refill with score='l1' needs the trained weights")
    return (w2.detach().to(torch.float64).abs() * m2).sum(1)


def _top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores; ties go to the lower index (stable, deterministic)."""
    order = torch.sort(-scores, stable=True).indices
    return order[:k]


def refill(
    mask: Mask,
    weights: Mapping[str, torch.Tensor] | None = None,
    *,
    score: str = "l1",
    fillback_rate: float = 0.0,
    groups: Iterable[Sequence[str]] = (),
) -> Mask:
    """Refill (``fillback_rate=0``) or Refill+ (``> 0``): whole rows (output channels / neurons) per layer.

    ``weights``: trained weights by name (only the kept entries are scored: raw CS weights are fine);
    not needed for ``score='count'``. ``groups``: names of layers that must keep the same rows (see the
    module docstring). Layers of the mask not in any group are refilled on their own.
    """
    if score not in SCORES:
        raise ConfigError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if not (0 <= fillback_rate <= 1):
        raise ConfigError(f"fillback_rate must be in [0, 1], got {fillback_rate!r}")
    grouped: list[list[str]] = []
    seen: set[str] = set()
    for g in groups:
        g = [n for n in g if n in mask]
        if not g:
            continue
        dup = [n for n in g if n in seen]
        if dup:
            raise ConfigError(f"layers in two refill groups: {dup}")
        rows = {mask[n].shape[0] for n in g}
        if len(rows) != 1:
            raise ConfigError(f"coupled layers must have the same number of output channels: {g}")
        seen.update(g)
        grouped.append(g)
    grouped += [[n] for n in mask if n not in seen]

    out: dict[str, torch.Tensor] = {}
    for g in grouped:
        mats = {n: _rows(mask[n]) for n in g}
        rows = next(iter(mats.values())).shape[0]
        nnz = sum(int(m.sum()) for m in mats.values())
        fan_in = sum(m.shape[1] for m in mats.values())
        n_keep = max(1, nnz // fan_in) if nnz > 0 else 0
        n_keep += _floor_fraction(fillback_rate, rows - n_keep) if nnz > 0 else 0
        total = torch.zeros(rows, dtype=torch.float64)
        for n, m2 in mats.items():
            w2 = None if weights is None or n not in weights else _rows(weights[n].to(m2.device)).cpu()
            if w2 is not None and w2.shape != m2.shape:
                raise ConfigError(f"weights of {n} have shape {tuple(weights[n].shape)}, the mask {tuple(mask[n].shape)}")
            s = _row_scores(m2.cpu(), w2, score)
            total += s / s.sum() if len(g) > 1 and s.sum() > 0 else s
        keep = torch.zeros(rows, dtype=torch.bool)
        keep[_top_rows(total, n_keep)] = True
        for n in g:
            out[n] = keep.view(-1, *([1] * (mask[n].dim() - 1))).expand_as(mask[n]).clone()
    return Mask({n: out[n] for n in mask})


# ============================================================================ partitioners

PartitionFn = Callable[[Sequence[np.ndarray], Sequence[int]], list[np.ndarray]]

# The KaHyPar context (the Python package reads its configuration from an .ini file; every key must be
# known to it, or it calls exit()). Direct k-way partitioning minimising the cut, with community-aware
# multilevel coarsening, recursive-bisection initial partitioning and k-way FM refinement, as in the
# KaHyPar documentation's direct k-way setting, without the flow-based refinement (small hypergraphs).
KAHYPAR_CONFIG = """\
mode=direct
objective=cut
seed=-1
cmaxnet=-1
vcycles=0
p-use-sparsifier=false
p-detect-communities=true
p-detect-communities-in-ip=true
p-reuse-communities=false
p-max-louvain-pass-iterations=100
p-min-eps-improvement=0.0001
p-louvain-edge-weight=hybrid
c-type=ml_style
c-s=1
c-t=160
c-rating-score=heavy_edge
c-rating-use-communities=true
c-rating-heavy_node_penalty=no_penalty
c-rating-acceptance-criterion=best_prefer_unmatched
c-fixed-vertex-acceptance-criterion=fixed_vertex_allowed
i-mode=recursive
i-technique=multi
i-c-type=ml_style
i-c-s=1
i-c-t=150
i-c-rating-score=heavy_edge
i-c-rating-use-communities=true
i-c-rating-heavy_node_penalty=no_penalty
i-c-rating-acceptance-criterion=best_prefer_unmatched
i-c-fixed-vertex-acceptance-criterion=fixed_vertex_allowed
i-algo=pool
i-runs=20
i-bp-algorithm=worst_fit
i-bp-heuristic-prepacking=false
i-bp-early-restart=true
i-bp-late-restart=true
i-r-type=twoway_fm
i-r-runs=-1
i-r-fm-stop=simple
i-r-fm-stop-i=50
r-type=kway_fm
r-runs=-1
r-fm-stop=adaptive_opt
r-fm-stop-alpha=1
r-fm-stop-i=350
"""

# Run in a child process: KaHyPar exits the whole process on a bad context and could crash on a bad
# input; in a child that becomes a PartitionError with its message instead of a dead Python.
_KAHYPAR_WORKER = r"""
import json, sys
import kahypar
req = json.load(sys.stdin)
out = []
for p in req["problems"]:
    nets = len(p["index"]) - 1
    h = kahypar.Hypergraph(p["nodes"], nets, p["index"], p["pins"], p["k"], [1] * nets, [1] * p["nodes"])
    ctx = kahypar.Context()
    ctx.loadINIconfiguration(req["config"])
    ctx.setK(p["k"])
    ctx.setEpsilon(req["epsilon"])
    ctx.setSeed(req["seed"])
    ctx.suppressOutput(True)
    kahypar.partition(h, ctx)
    out.append([h.blockID(i) for i in range(p["nodes"])])
sys.stdout.write("\nLOTTERY-PARTITION:" + json.dumps(out) + "\n")
"""
_MARK = "LOTTERY-PARTITION:"


def kahypar_partition(
    matrices: Sequence[np.ndarray],
    ks: Sequence[int],
    *,
    seed: int = 0,
    imbalance: float = 0.05,
    config: str = KAHYPAR_CONFIG,
    python: str | None = None,
    timeout: float = 600.0,
) -> list[np.ndarray]:
    """Partition the rows of each bool matrix into ``k`` parts with KaHyPar (rows = nodes, each column
    with a kept entry = a hyperedge over its rows), all in one child process. Raises PartitionError."""
    problems = []
    for m, k in zip(matrices, ks):
        index, pins = [0], []
        for col in np.asarray(m, dtype=bool).T:
            rows = np.flatnonzero(col)
            if len(rows):
                pins += rows.tolist()
                index.append(len(pins))
        problems.append({"nodes": int(m.shape[0]), "k": int(k), "index": index, "pins": pins})
    with tempfile.TemporaryDirectory(prefix="lottery-kahypar-") as tmp:
        cfg = os.path.join(tmp, "context.ini")
        with open(cfg, "w") as f:
            f.write(config)
        request = json.dumps({"problems": problems, "config": cfg, "seed": int(seed), "epsilon": float(imbalance)})
        try:
            proc = subprocess.run([python or sys.executable, "-c", _KAHYPAR_WORKER], input=request,
                                  capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PartitionError(f"the KaHyPar partitioner could not run: {exc}") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        detail = " ".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-5:])
        hint = " (install it: pip install 'lottery[regroup]')" if "No module named 'kahypar'" in proc.stderr else ""
        raise PartitionError(f"the KaHyPar partitioner failed (exit code {proc.returncode}): {detail}{hint}")
    try:
        labels = json.loads(lines[-1][len(_MARK):])
    except ValueError as exc:
        raise PartitionError(f"the KaHyPar partitioner returned unreadable output: {exc}") from None
    return [np.asarray(x, dtype=np.int64) for x in labels]


def metis_partition(matrices: Sequence[np.ndarray], ks: Sequence[int], *, seed: int = 0,
                    imbalance: float = 0.05) -> list[np.ndarray]:
    """Partition rows with METIS (pymetis) on the row-similarity graph: rows i, j are joined by an edge
    weighted by the number of kept columns they share. Raises PartitionError."""
    try:
        import pymetis
    except ImportError:
        raise PartitionError("the METIS partitioner needs pymetis: pip install 'lottery[regroup]'") from None
    out = []
    for m, k in zip(matrices, ks):
        a = np.asarray(m, dtype=np.int64)
        sim = a @ a.T
        np.fill_diagonal(sim, 0)
        xadj, adjncy, eweights = [0], [], []
        for i in range(sim.shape[0]):
            nbrs = np.flatnonzero(sim[i])
            adjncy += nbrs.tolist()
            eweights += sim[i, nbrs].tolist()
            xadj.append(len(adjncy))
        try:
            opts = pymetis.Options(seed=int(seed), ufactor=max(1, int(round(1000 * imbalance))))
            graph = {"adjacency": pymetis.CSRAdjacency(xadj, adjncy)} if hasattr(pymetis, "CSRAdjacency") \
                else {"xadj": xadj, "adjncy": adjncy}  # pymetis < 2025.2
            _, membership = pymetis.part_graph(int(k), **graph, eweights=eweights or None, options=opts)
        except Exception as exc:  # pymetis raises RuntimeError / its own errors on METIS failures
            raise PartitionError(f"the METIS partitioner failed: {exc}") from None
        out.append(np.asarray(membership, dtype=np.int64))
    return out


def partition_rows(matrices: Sequence[np.ndarray], ks: Sequence[int], hp: StructuredHparams,
                   partition: PartitionFn | None = None) -> list[np.ndarray]:
    """Labels (one per row, in ``[0, k)``) of each matrix; validated, so a broken partitioner raises."""
    todo = [i for i, k in enumerate(ks) if k > 1]
    labels: list[np.ndarray | None] = [np.zeros(m.shape[0], dtype=np.int64) for m in matrices]
    if todo:
        mats, kk = [matrices[i] for i in todo], [ks[i] for i in todo]
        if partition is not None:
            try:
                got = partition(mats, kk)
            except PartitionError:
                raise
            except Exception as exc:
                raise PartitionError(f"the partitioner failed: {type(exc).__name__}: {exc}") from exc
        elif hp.partitioner == "kahypar":
            got = kahypar_partition(mats, kk, seed=hp.seed, imbalance=hp.imbalance)
        else:
            got = metis_partition(mats, kk, seed=hp.seed, imbalance=hp.imbalance)
        if got is None or len(got) != len(todo):
            raise PartitionError(f"the partitioner returned {0 if got is None else len(got)} partitions for {len(todo)} layers")
        for i, lab in zip(todo, got):
            lab = np.asarray(lab)
            rows = matrices[i].shape[0]
            if lab.shape != (rows,) or not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() >= ks[i]:
                raise PartitionError(f"the partitioner returned an invalid partition (shape {lab.shape}, "
                                     f"expected {rows} labels in [0, {ks[i]}))")
            labels[i] = lab.astype(np.int64)
    return labels  # type: ignore[return-value]


# ============================================================================ regroup


@dataclass(frozen=True)
class Block:
    """A dense block of a layer's ``C_out x fan_in`` matrix: its row and column indices (sorted)."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def area(self) -> int:
        return len(self.rows) * len(self.cols)


def _parts_count(rows: int, hp: StructuredHparams) -> int:
    return max(1, min(hp.parts, rows // hp.min_rows))


def _dissolve_small(m: np.ndarray, labels: np.ndarray, min_rows: int) -> list[np.ndarray]:
    """Parts as sorted row arrays; rows of parts smaller than ``min_rows`` join the part (of at least
    ``min_rows`` rows) whose column counts overlap them most (ties: the lowest part)."""
    parts = [np.flatnonzero(labels == p) for p in np.unique(labels)]
    big = [p for p in parts if len(p) >= min_rows]
    small = [p for p in parts if len(p) < min_rows]
    if not big:  # cannot happen with k <= rows // min_rows unless the partitioner is degenerate
        return [np.arange(m.shape[0])]
    counts = [m[p].sum(0) for p in big]
    extra: list[list[int]] = [[] for _ in big]
    for p in small:
        for r in p:
            overlap = [int((m[r] * c).sum()) for c in counts]
            extra[int(np.argmax(overlap))].append(int(r))
    return [np.sort(np.concatenate([p, np.asarray(e, dtype=np.int64)])) for p, e in zip(big, extra)]


def _split(rows: np.ndarray, max_rows: int) -> list[np.ndarray]:
    n = math.ceil(len(rows) / max_rows)
    return [c for c in np.array_split(rows, n)]


def blocks_from_parts(m: np.ndarray, parts: Sequence[np.ndarray], hp: StructuredHparams, unit: int = 1) -> list[Block]:
    """Rules 3-4 of the module docstring: split large parts, then widen each chunk's block over its
    most used columns. ``m`` holds kept counts per (row, column unit); a unit is ``unit`` weights wide
    (1, or ``kh x kw`` for whole input channels) and the blocks' columns are returned in weights."""
    blocks = []
    for part in parts:
        for chunk in _split(np.asarray(part), hp.max_rows):
            counts = m[chunk].sum(0)
            nnz = int(counts.sum())
            if nnz == 0:
                continue
            order = np.argsort(-counts, kind="stable")
            used = int((counts > 0).sum())
            width = max(1, min(used, int(Fraction(str(hp.coverage)) * nnz) // (len(chunk) * unit)))
            cols = sorted(int(c) * unit + j for c in order[:width] for j in range(unit))
            blocks.append(Block(tuple(int(r) for r in chunk), tuple(cols)))
    return blocks


def regroup_blocks(mask: Mask, hp: StructuredHparams = StructuredHparams(method="regroup"),
                   partition: PartitionFn | None = None) -> dict[str, list[Block]]:
    """The dense blocks of every layer (rules 1-4). One partitioner call for all layers."""
    counts, units = {}, {}
    for n, m in mask.items():
        unit = math.prod(m.shape[2:]) if hp.columns == "channel" and m.dim() > 2 else 1
        m2 = _rows(m).cpu().numpy().astype(np.int64)
        counts[n] = m2.reshape(m2.shape[0], -1, unit).sum(2)  # kept weights per (row, column unit)
        units[n] = unit
    names = [n for n, c in counts.items() if c.any()]
    ks = [_parts_count(counts[n].shape[0], hp) for n in names]
    labels = partition_rows([counts[n] > 0 for n in names], ks, hp, partition)
    out: dict[str, list[Block]] = {n: [] for n in mask}
    for n, lab in zip(names, labels):
        c = counts[n]
        parts = _dissolve_small(c, lab, min(hp.min_rows, c.shape[0]))
        out[n] = blocks_from_parts(c, parts, hp, units[n])
    return out


def regroup(mask: Mask, weights: Mapping[str, torch.Tensor] | None = None,
            hp: StructuredHparams = StructuredHparams(method="regroup"),
            partition: PartitionFn | None = None) -> Mask:
    """Regroup: the union of each layer's dense blocks (:func:`regroup_blocks`) as the new mask.

    ``weights`` is accepted for a uniform signature and not used (regroup looks only at the mask).
    ``partition(matrices, ks) -> labels`` replaces the configured partitioner (tests, other tools).
    """
    blocks = regroup_blocks(mask, hp, partition)
    out = {}
    for n, m in mask.items():
        new = torch.zeros(_rows(m).shape, dtype=torch.bool)
        for b in blocks[n]:
            new[torch.tensor(b.rows).unsqueeze(1), torch.tensor(b.cols).unsqueeze(0)] = True
        out[n] = new.reshape(m.shape)
    return Mask(out)


def structure(mask: Mask, weights: Mapping[str, torch.Tensor] | None, hp: StructuredHparams, *,
              groups: Iterable[Sequence[str]] = (), partition: PartitionFn | None = None) -> Mask:
    """Dispatch on ``hp.method``: refill, refill+ (with ``hp.fillback_rate``), regroup or nm (N:M, ``hp.nm``:
    the largest ``|w|`` of each group, or the largest CS mask logits when ``weights`` holds
    ``<name>_mask_logits`` for every masked layer, as a CS search's state does; :mod:`lottery.methods.nm`).

    ``groups`` (refill only) couples layers that must keep the same output channels (residual stages;
    :func:`lottery.export.coupled_layers` finds them for the supported models).
    """
    if hp.method == "regroup":
        return regroup(mask, weights, hp, partition)
    if hp.method == "nm":
        if weights is None:
            raise ConfigError("nm needs the trained weights (or, for a CS ticket, its mask logits)")
        logits = {n: weights[n + LOGITS_SUFFIX] for n in mask if n + LOGITS_SUFFIX in weights}
        return nm_prune(mask, weights, *parse_nm(hp.nm), scores=logits if len(logits) == len(mask) else None)
    rate = hp.fillback_rate if hp.method == "refill+" else 0.0
    return refill(mask, weights, score=hp.score, fillback_rate=rate, groups=groups)
