"""What tickets cost: training epochs that CS (independent runs, one per ticket, parallelisable) and IMP
(one sequential run, a ticket per level) spend to produce tickets down to a given density, on
LeNet-300-100 / Fashion-MNIST. Trains nothing: it reads the finished run folders of
benchmarks/cs_lenet_fashion.py and benchmarks/imp_lenet_fashion.py and counts the epochs their
results.json record (every training epoch of a run: CS search rounds and ticket retraining; IMP's
dense training and every level's retraining).

The CS paper's comparison (docs/methods.md): K = 5 CS tickets at different sparsities, searched in parallel,
for 425 epochs against IMP's 2550 sequential epochs on CIFAR-10 (6x). Here:

* per CS setting (s0): the density reached, epochs per ticket, and the IMP level that first reaches the
  same density, with the epochs IMP spent until then (measured where IMP's runs went that far,
  otherwise marked as extrapolated at IMP's epochs per level);
* K CS tickets (every CS setting with all seeds): total epochs (the work) and the epochs of the longest
  one (the wall-clock length with K workers), against the IMP run that reaches the sparsest of them.

    python benchmarks/ticket_cost.py --k 5
    python benchmarks/ticket_cost.py --k 5 --cs-out benchmarks/out/resnet_fashion \
        --imp-out benchmarks/out/resnet_fashion --rewind K --cs-rewind      # ResNet-20 (issue 21)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, read_results  # noqa: E402


def _read(pattern: str, root: Path) -> list[dict]:
    return [r for _, r in read_results(root, pattern)]


def cs_settings(cs_out: Path, seeds: list[int], rewind: str | None = None) -> list[dict]:
    """One row per CS setting (s0, lam, or the target density of ``--density`` runs) finished for every
    seed (only tickets rewound to ``rewind``, when given): mean density, epochs per ticket."""
    runs = [r for r in _read("search-cs_*/results.json", cs_out) if r.get("seed") in seeds and r.get("mode") == "ticket"
            and (rewind is None or r.get("rewind") == rewind)]
    rows = []

    def setting(r: dict) -> tuple:
        return r["s0"], r["lam"], r.get("target_density"), r.get("rewind")

    several_k = len({r.get("rewind") for r in runs}) > 1
    for key in sorted({setting(r) for r in runs}, key=lambda k: (-(k[2] or 2), -k[0], str(k[3]))):
        rs = [r for r in runs if setting(r) == key]
        if sorted(r["seed"] for r in rs) != sorted(seeds):
            continue
        label = f"density={key[2]:g}" if key[2] is not None else f"s0={key[0]:g} lam={key[1]:g}"
        label += f" k={key[3]}" if several_k else ""
        rows.append({"setting": label, "density": statistics.mean(r["density"] for r in rs),
                     "epochs": statistics.mean(r["epochs"] for r in rs),
                     "test_accuracy": statistics.mean(r["test_accuracy"] for r in rs)})
    return rows


def imp_levels(imp_out: Path, seeds: list[int], method: str, rewind: str) -> list[dict]:
    """Per IMP level (all seeds finished): density and the epochs the run spent up to and including it."""
    runs = [r for r in _read("search-imp*/results.json", imp_out)
            if r.get("method") == method and r.get("rewind") == rewind and r.get("seed") in seeds]
    by_level: dict[int, list[dict]] = {}
    for r in runs:
        for lv in r.get("levels", []):
            by_level.setdefault(lv["level"], []).append(lv)
    out = []
    for level in sorted(by_level):
        lvs = by_level[level]
        if len(lvs) != len(seeds):
            continue
        out.append({"level": level, "density": statistics.mean(lv["density"] for lv in lvs),
                    "epochs": statistics.mean(lv["epochs"] for lv in lvs)})
    return out


def _epochs_per_level(levels: list[dict]) -> float:
    """Epochs between the run's last two levels. The last step, not the mean from level 0: IMP-C's first
    level costs less than its later ones (T - k against T)."""
    before, last = (levels[-2] if len(levels) > 1 else levels[0]), levels[-1]
    return (last["epochs"] - before["epochs"]) / max(last["level"] - before["level"], 1)


def imp_epochs_to(density: float, levels: list[dict], rate: float) -> tuple[int, float, bool]:
    """(level, epochs, measured?) of the first IMP level at or below ``density``; past the last measured
    level, extrapolated at the epochs of the run's last level step (flagged)."""
    for lv in levels:
        if lv["density"] <= density * (1 + 1e-9):
            return lv["level"], lv["epochs"], True
    last = levels[-1]
    level = math.ceil(math.log(density) / math.log(1 - rate) - 1e-9)
    return level, last["epochs"] + _epochs_per_level(levels) * (level - last["level"]), False


def retrain_epochs(levels: list[dict]) -> float:
    """IMP-C's epochs for one ticket's retraining from k (T - k), from its levels' epochs: level L's ticket
    costs e_L = L T + (T - k) (the dense run, the continued runs of levels 1..L-1, the retraining;
    lottery.pipelines.imp), so consecutive levels differ by T and e_L - L T is the retraining."""
    if len(levels) < 2:
        raise ValueError("IMP-C needs two finished levels to tell its chain from its retraining")
    return levels[-1]["epochs"] - levels[-1]["level"] * _epochs_per_level(levels)


def k_ticket_cost(levels: list[dict], sparsest: float, k: int, rate: float,
                  continued: bool = False) -> tuple[int, float, float, bool]:
    """(level, work, critical path, measured?) of ``k`` IMP tickets down to ``sparsest``. IMP k = 0 and IMP-R
    are one chain whose every level is a ticket, so work = critical path = the level's epochs. IMP-C's
    (``continued``) tickets are side branches of its chain of continued runs: work = the chain to the level + ``k``
    retrainings; the critical path = the chain + one retraining (the level's own epochs)."""
    level, epochs, measured = imp_epochs_to(sparsest, levels, rate)
    if not continued:
        return level, epochs, epochs, measured
    retrain = retrain_epochs(levels)
    return level, epochs - retrain + k * retrain, epochs, measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cs-out", default="benchmarks/out/cs_lenet_fashion")
    ap.add_argument("--imp-out", default="benchmarks/out/imp_lenet_fashion")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rewind", default="1ep", help="IMP-R's and IMP-C's rewind point (and CS's, with --cs-rewind)")
    ap.add_argument("--cs-rewind", action="store_true", help="count only CS tickets rewound to --rewind")
    ap.add_argument("--imp-rate", type=float, default=0.2, help="IMP's pruning rate per level (for extrapolation)")
    ap.add_argument("--k", type=int, default=None, help="K: the K sparsest CS settings form the set of tickets "
                                                         "(default: all finished settings)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    cs = cs_settings(Path(args.cs_out), seeds, args.rewind if args.cs_rewind else None)
    series = (("IMP k=0", "imp", "0it"), (f"IMP-R k={args.rewind}", "imp", args.rewind),
              (f"IMP-C k={args.rewind}", "imp-c", args.rewind))
    imps = {name: imp_levels(Path(args.imp_out), seeds, method, rewind) for name, method, rewind in series}
    continued_runs = {name for name, method, _ in series if method == "imp-c"}  # tickets beside a chain
    imps = {name: levels for name, levels in imps.items() if levels or name.startswith("IMP-R")}  # IMP-C if run
    if not cs or not all(imps.values()):
        sys.exit("no finished CS or IMP runs with all seeds under --cs-out / --imp-out: run the CS and IMP benchmarks first")
    print(f"machine: {machine()}\n")
    print(f"seeds {','.join(map(str, seeds))}; epochs are means over seeds (they do not vary); "
          "'*' = IMP did not go that far: extrapolated at its epochs per level\n")
    names = list(imps)
    print("| CS setting | CS ticket density | CS epochs | " + " | ".join(f"{n}: level reaching it | {n}: epochs" for n in names)
          + " | IMP epochs / CS epochs |")
    print("|---|---|---|" + "---|---|" * len(names) + "---|")
    for row in cs:
        cells = []
        ratios = []
        for n in names:
            level, epochs, measured = imp_epochs_to(row["density"], imps[n], args.imp_rate)
            mark = "" if measured else "*"
            cells += [f"{level}{mark}", f"{epochs:.0f}{mark}"]
            ratios.append(f"{epochs / row['epochs']:.1f}{mark}")
        print(f"| {row['setting']} | {row['density']:.4f} | {row['epochs']:.0f} | " + " | ".join(cells)
              + f" | {' / '.join(ratios)} |")
    if args.k is not None:
        cs = sorted(cs, key=lambda r: r["density"])[: args.k][::-1]
    k = len(cs)
    sparsest = min(r["density"] for r in cs)
    total = sum(r["epochs"] for r in cs)
    longest = max(r["epochs"] for r in cs)
    densities = ", ".join(f"{r['density']:.3f}" for r in cs)
    print(f"\nK = {k} CS tickets (densities {densities}):\n")
    print("| method | epochs, all K tickets (work) | epochs of the longest run (wall with K workers) | sparsest density |")
    print("|---|---|---|---|")
    print(f"| CS, {k} independent runs | {total:.0f} | {longest:.0f} | {sparsest:.4f} |")
    continued_note = ""
    for n in names:
        continued = n in continued_runs
        level, work, path, measured = k_ticket_cost(imps[n], sparsest, k, args.imp_rate, continued)
        mark = "" if measured else " (extrapolated)"
        how = f"one chain to level {level} + {k} ticket retrainings beside it" if continued else f"one run to level {level}"
        chain = "chain + one retraining" if continued else "sequential"
        print(f"| {n}, {how} | {work:.0f}{mark} | {path:.0f}{mark} ({chain}) | "
              f"{(1 - args.imp_rate) ** level:.4f} |")
        if continued:
            retrain = retrain_epochs(imps[n])
            continued_note = (f"\n{n}: each ticket is retrained from k ({retrain:.0f} epochs) beside the chain of continued runs "
                              f"({path - retrain:.0f} epochs to level {level}); lottery's IMP-C run retrains every "
                              f"level's ticket in turn, {path - retrain:.0f} + {level} x {retrain:.0f} = "
                              f"{path - retrain + level * retrain:.0f} epochs to that level's ticket (its results.json's "
                              "epochs_total adds the continued run after its last level).")
    if continued_note:
        print(continued_note)


if __name__ == "__main__":
    main()
