"""benchmarks/ticket_cost.py: the epochs K tickets cost, read from run folders (no training)."""

from __future__ import annotations

import json
import sys

import pytest

from benchmark_module import benchmark_module

T, K_REWIND = 16, 1  # a recipe of 16 epochs rewinding to epoch 1, as fashion_resnet20's


@pytest.fixture()
def cost():
    with benchmark_module("ticket_cost.py") as module:
        yield module


def _imp_levels(variant: str, last: int) -> list[dict]:
    """Levels 0..last as lottery.pipelines.imp records their epochs: IMP (rewind) T + L (T - k); IMP-C
    L T + (T - k) for its tickets (level 0 is the dense run, T)."""
    levels = [{"level": 0, "density": 1.0, "epochs": T}]
    for level in range(1, last + 1):
        epochs = T + level * (T - K_REWIND) if variant == "imp" else level * T + (T - K_REWIND)
        levels.append({"level": level, "density": 0.8 ** level, "epochs": epochs})
    return levels


def test_imp_c_tickets_cost_their_chain_plus_one_retraining_each(cost):
    """IMP-C's K tickets are side branches of one chain of continued runs: the work counts K retrainings,
    the critical path one; IMP-R's tickets are its chain's levels, so work and path are the level's epochs.
    Past the last level both are extrapolated (flagged)."""
    imp_c = _imp_levels("imp-c", 12)
    assert cost.retrain_epochs(imp_c) == T - K_REWIND
    level, work, path, measured = cost.k_ticket_cost(imp_c, 0.8 ** 12, 5, 0.2, continued=True)
    assert (level, path, measured) == (12, 12 * T + 15, True)
    assert work == 12 * T + 5 * 15  # the chain (dense + 11 continued runs) and 5 retrainings
    level, work, path, measured = cost.k_ticket_cost(imp_c, 0.0343, 5, 0.2, continued=True)
    assert (level, path, work, measured) == (16, 16 * T + 15, 16 * T + 5 * 15, False)

    imp_r = _imp_levels("imp", 12)
    assert cost.k_ticket_cost(imp_r, 0.8 ** 12, 5, 0.2) == (12, T + 12 * 15, T + 12 * 15, True)
    with pytest.raises(ValueError, match="two finished levels"):
        cost.retrain_epochs(imp_c[:1])


def test_the_k_ticket_table_from_run_folders(cost, tmp_path, monkeypatch, capsys):
    """End to end on run folders of the shape the benchmarks write: CS tickets at two densities, IMP-R and
    IMP-C to level 4, 2 seeds."""
    for seed in (0, 1):
        for density in (0.5, 0.41):
            folder = tmp_path / f"search-cs_s{seed}_{density}"
            folder.mkdir()
            (folder / "results.json").write_text(json.dumps({
                "seed": seed, "mode": "ticket", "s0": 0.0, "lam": 0.0, "target_density": density, "rewind": "1ep",
                "density": density, "epochs": 31, "test_accuracy": 0.9}))
        for variant in ("imp", "imp-c"):
            folder = tmp_path / f"search-{variant}_s{seed}"
            folder.mkdir()
            (folder / "results.json").write_text(json.dumps({
                "method": variant, "rewind": "1ep", "seed": seed, "levels": _imp_levels(variant, 4)}))
    monkeypatch.setattr(sys, "argv", ["ticket_cost.py", "--cs-out", str(tmp_path), "--imp-out", str(tmp_path),
                                      "--seeds", "0,1", "--rewind", "1ep", "--cs-rewind", "--k", "2"])
    cost.main()
    out = capsys.readouterr().out
    assert "| CS, 2 independent runs | 62 | 31 | 0.4100 |" in out
    # 0.41 is first reached at level 4 (0.4096): IMP-R 16 + 4 x 15; IMP-C 4 x 16 + 2 x 15 of work, 4 x 16 + 15 of path
    assert "| IMP-R k=1ep, one run to level 4 | 76 | 76 (sequential) | 0.4096 |" in out
    assert "| IMP-C k=1ep, one chain to level 4 + 2 ticket retrainings beside it | 94 | 79 (chain + one retraining) | 0.4096 |" in out
    assert "64 + 4 x 15 = 124 epochs" in out
