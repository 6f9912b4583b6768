"""N:M sparsity (lottery.methods.nm): the constraint holds in every group, the functions are idempotent, and
the post-processing only removes weights."""

from __future__ import annotations

import pytest
import torch

from lottery.errors import ConfigError
from lottery.masks import Mask
from lottery.methods.nm import LOGITS_SUFFIX, nm_mask, nm_prune, parse_nm, satisfies_nm
from lottery.methods.structured import StructuredHparams, structure


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """Kept count of every group of M consecutive inputs of every row (the short last group included)."""
    t2 = t.reshape(t.shape[0], -1).int()
    return torch.stack([t2[:, i:i + m].sum(1) for i in range(0, t2.shape[1], m)], 1)


SHAPES = {"fc.weight": (7, 12), "conv.weight": (5, 3, 3, 3), "odd.weight": (4, 10)}  # 27 and 10: short last group


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8", "3:5"])
def test_nm_mask_keeps_at_most_n_in_every_group_and_exactly_n_when_it_can(nm):
    n, m = parse_nm(nm)
    w = _weights()
    mask = nm_mask({k: v.abs() for k, v in w.items()}, n, m)
    assert satisfies_nm(mask, n, m)
    for k, t in mask.items():
        counts = _groups(t, m)
        fan_in = t[0].numel()
        full = fan_in // m
        assert bool((counts[:, :full] == n).all())  # every whole group keeps exactly N
        if fan_in % m:  # the short last group: min(N, its length)
            assert bool((counts[:, full] == min(n, fan_in % m)).all())
        # the kept entries are the N largest |w| of their group
        w2, t2 = w[k].abs().reshape(t.shape[0], -1), t.reshape(t.shape[0], -1)
        for r in range(t2.shape[0]):
            for c0 in range(0, fan_in, m):
                grp, kept = w2[r, c0:c0 + m], t2[r, c0:c0 + m]
                if kept.any() and (~kept).any():
                    assert grp[kept].min() >= grp[~kept].max()


def test_nm_mask_and_post_processing_are_idempotent():
    w = _weights(1)
    once = nm_mask({k: v.abs() for k, v in w.items()}, 2, 4)
    assert nm_prune(once, w, 2, 4) == once
    assert nm_mask({k: v.abs() for k, v in w.items()}, 2, 4, keep=once) == once
    g = torch.Generator().manual_seed(3)
    ticket = Mask({k: torch.rand(s, generator=g) < 0.6 for k, s in SHAPES.items()})
    pruned = nm_prune(ticket, w, 2, 4)
    assert nm_prune(pruned, w, 2, 4) == pruned


def test_nm_post_processing_only_removes_weights_and_keeps_sparse_groups_whole():
    w = _weights(2)
    g = torch.Generator().manual_seed(4)
    ticket = Mask({k: torch.rand(s, generator=g) < 0.5 for k, s in SHAPES.items()})
    out = nm_prune(ticket, w, 2, 4)
    assert satisfies_nm(out, 2, 4) and not satisfies_nm(ticket, 2, 4)
    for k in ticket:
        assert not bool((out[k] & ~ticket[k]).any()), "nothing is revived"
        before, after = _groups(ticket[k], 4), _groups(out[k], 4)
        assert torch.equal(after, before.clamp(max=2))  # groups with <= N kept are unchanged
    assert out.density() <= 0.5


def test_cs_logits_decide_within_each_group():
    w = _weights(5)
    logits = {k: -v for k, v in w.items()}  # a ranking other than |w|
    ticket = Mask({k: torch.ones(s, dtype=torch.bool) for k, s in SHAPES.items()})
    by_logits = structure(ticket, {**w, **{k + LOGITS_SUFFIX: v for k, v in logits.items()}},
                          StructuredHparams(method="nm", nm="2:4"))
    assert by_logits == nm_prune(ticket, w, 2, 4, scores=logits)
    by_weights = structure(ticket, w, StructuredHparams(method="nm", nm="2:4"))
    assert by_weights == nm_prune(ticket, w, 2, 4)
    assert by_logits != by_weights


def test_nm_spelling_and_hparams():
    assert parse_nm("2:4") == (2, 4)
    for bad in ("4:2", "2-4", "0:4", "2:2", "a:b"):
        with pytest.raises(ConfigError):
            parse_nm(bad)
    with pytest.raises(ConfigError):
        StructuredHparams(method="nm", nm="5:4")
    # nm's setting does not change the identity of the other methods' runs
    assert StructuredHparams(method="refill", nm="1:4").identity() == StructuredHparams(method="refill")
    assert StructuredHparams(method="nm", nm="1:4", parts=3).identity() == StructuredHparams(method="nm", nm="1:4")


def test_the_logits_suffix_is_the_masking_one():
    from lottery.masking import _common

    assert LOGITS_SUFFIX == _common._LOGITS_SUFFIX

