"""Does CS give binary masks and the density asked for at any round length? (issue: budget-robust CS)

For each network and round length, CS pruning searches (no dense reference, no fine-tuning: only the
search and its hard mask matter here) with lottery's default recipe, once with the default density knobs
(s0 = 0, lam = 1e-8) and once with ``--density``. It prints, per run, every round's undecided fraction,
soft and hard validation accuracy and flips (results.json's ``convergence``), and the final density
against the target. Acceptance: every round at most 1 % undecided and hard within 0.3 points of soft;
final density within 10 % of the target.

    python benchmarks/cs_budget.py --out benchmarks/out/cs_budget            # LeNet 1/2/5/20, Conv-4 1/2/3
    python benchmarks/cs_budget.py --only lenet --lenet-rounds 1ep,2ep       # a part of it
    python benchmarks/cs_budget.py --previous                                # + the recipe before the change

``--previous`` also runs, on Conv-4 with 2-epoch rounds, the recipe this project used before the change
(SGD logits with the weights' LR schedule, beta to 200 every iteration): the setting whose masks were
found not to be binary. ``--alternatives`` runs, on Conv-4 with 1-epoch rounds, the default recipe with
one knob changed (the alternatives docs/cs.md discusses): ``beta_final`` 200 and 1000, and with
``--density`` a penalty of 1e-5 or none.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, read_results  # noqa: E402

NETWORKS = {
    "lenet": ("fashion_lenet", "1ep,2ep,5ep,20ep"),
    "conv4": ("fashion_conv4_narrow", "1ep,2ep,3ep"),
}


PREVIOUS_RECIPE = ["--mask-optimizer", "sgd", "--beta-final", "200", "--temperature-schedule", "iteration"]
# (density or None, extra flags): the default recipe with one knob changed, Conv-4, 1-epoch rounds
ALTERNATIVES = [(None, ("--beta-final", "200")), (0.05, ("--beta-final", "200")), (0.05, ("--beta-final", "1000")),
                (0.05, ("--lam", "1e-5")), (0.05, ("--lam", "0"))]


def run(out: Path, preset: str, round_steps: str, density: float | None, rounds: int, seeds: str, workers: int,
        extra: tuple[str, ...] = ()) -> None:
    cmd = [sys.executable, "-m", "lottery", "sweep", "cs", "--preset", preset, "--mode", "prune", "--no-dense",
           "--round-steps", round_steps, "--rounds", str(rounds), "--seeds", seeds, "--workers", str(workers),
           "--out", str(out), "--no-progress"]
    if density is not None:
        cmd += ["--density", str(density)]
    cmd += list(extra)
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def table(out: Path) -> str:
    lines = ["| network | recipe | round | target density | density | round: undecided % / soft-hard gap (points) / flips | all rounds converged | pruned network test acc % |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for folder, r in read_results(out, "prune-cs_*/results.json"):
        import json

        if not (folder / "hparams.json").is_file():
            continue  # not a finished run of this benchmark
        hp = json.loads((folder / "hparams.json").read_text())
        round_steps = hp.get("cs", {}).get("round_steps") or hp.get("training", {}).get("training_steps")
        conv = r.get("convergence") or []
        per_round = "; ".join(f"{c['round'] + 1}: {100 * c['undecided']:.2f} / {100 * c['soft_hard_gap']:+.2f} / {c['flips']}"
                              for c in conv)
        ok = all(c["converged"] for c in conv) if conv else None
        target = r.get("target_density")
        off = "" if target is None else f" ({100 * (r['density'] / target - 1):+.1f} %)"
        if hp["cs"].get("mask_optimizer", "adam") == "adam":
            changed = [f"beta_final {hp['cs']['beta_final']:g}"] if hp["cs"].get("beta_final", 4000.0) != 4000.0 else []
            changed += [f"lam {hp['cs']['lam']:g}"] if hp["cs"].get("lam", 1e-8) != 1e-8 else []
            recipe = "default" + (f", {', '.join(changed)}" if changed else "")
        else:
            recipe = f"previous (sgd, beta to {hp['cs']['beta_final']:g} per {hp['cs']['temperature_schedule']})"
        rows.append((r["model"], recipe, int(str(round_steps).rstrip("ep") or 0), target or 0, r["seed"],
                     f"| {r['model']} | {recipe} | {round_steps} | {target if target is not None else '- (s0 0, lam 1e-8)'} | "
                     f"{r['density']:.4f}{off} | "
                     f"{per_round} | {'yes' if ok else 'NO'} | {100 * r['test_accuracy']:.2f} |"))
    lines += [row[-1] for row in sorted(rows, key=lambda t: t[:5])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/cs_budget"))
    ap.add_argument("--only", choices=sorted(NETWORKS), default=None)
    ap.add_argument("--lenet-rounds", default=NETWORKS["lenet"][1])
    ap.add_argument("--conv4-rounds", default=NETWORKS["conv4"][1])
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--previous", action="store_true", help="also the recipe before the change, Conv-4, 2-epoch rounds")
    ap.add_argument("--alternatives", action="store_true",
                    help="also the default recipe with one knob changed (beta_final, lam), Conv-4, 1-epoch rounds")
    args = ap.parse_args()
    if not args.table_only:
        for name, (preset, default_rounds) in NETWORKS.items():
            if args.only and name != args.only:
                continue
            steps = args.lenet_rounds if name == "lenet" else args.conv4_rounds
            for density in (None, args.density):
                run(args.out, preset, steps, density, args.rounds, args.seeds, args.workers)
        if args.previous:
            run(args.out, NETWORKS["conv4"][0], "2ep", None, args.rounds, args.seeds, args.workers, tuple(PREVIOUS_RECIPE))
        if args.alternatives:
            for density, extra in ALTERNATIVES:
                run(args.out, NETWORKS["conv4"][0], "1ep", density, args.rounds, args.seeds, args.workers, extra)
    print(f"\n{machine()}\n")
    print(table(args.out))


if __name__ == "__main__":
    main()
