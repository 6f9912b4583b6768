"""Issue 21's comparison on a residual network (ResNet-20 at width 0.25 on Fashion-MNIST, the
``fashion_resnet20`` preset): every part, in the order its inputs allow, on one pool of workers;
resumable (each job is a lottery run that resumes), so it may span many sessions.

    python benchmarks/resnet_fashion.py run --workers 2     # runs (or resumes) everything still missing
    python benchmarks/resnet_fashion.py report              # tables, figure and claims from what finished

The parts, 3 seeds each (the jobs of benchmarks/imp_lenet_fashion.py and benchmarks/stability_tickets.py
with this preset, and ``lottery search cs``, so their run folders are the same as those commands'):

1. instability of the dense network against the rewind point k (0, 100 iterations, 1, 2, 5 epochs);
2. IMP k = 0, 12 levels (to 6.9 % density);
3. k = the earliest rewind point whose mean instability over the seeds is below 2 points (the stability
   line of Frankle et al.; chosen once it and the points before it are in for every seed), or
   ``--rewind``; written to rewind_choice.json;
4. IMP-R and IMP-C rewinding to k; random pruning and random re-initialisation of IMP-R's levels 4, 8, 12;
5. CS tickets (rewinding to the same k) at IMP's densities 0.4096, 0.1678, 0.0859, 0.0687 and at
   just under half of the sparsest, 0.0343 (CS's own sparsest setting: where claim (c) needs it to match);
6. instability of the IMP-R and CS tickets at about 17 % (k = 0 and k) and 7 % (k). At k the copies start
   from the ticket's own rewind weights (``--start-state``: the CS search's first round at k, IMP-R's level
   0 at k), as the ticket retrains; at k = 0 from the initial weights, which are the seed's whatever the
   run. The first runs (until 2026-12-04) started every ticket from its seed's dense instability run's
   network at k instead; the CS ones are kept as a control (the CS mask on other weights);
7. CS with the paper's mask recipe (``--mask-optimizer sgd --temperature-schedule epoch --beta-final 200``,
   docs/cs.md) at 0.0687, 0.0859, 0.1678 and 0.0343: the check of whether lottery's default recipe for the
   mask (Adam logits) is what costs CS accuracy here. Its run folders go to a folder of their own (the
   --out folder's name + ``_cs_paper``, each seed's dense network copied in from --out), so the tools that
   look for one CS ticket per seed and density in --out (ticket instability, ticket cost) never see two.

Jobs run in priority order (the instability first: everything after step 3 waits for it), at most
``--workers`` at a time, each with one torch thread; a job that fails is reported and the others go on.

``--width 1 --device cuda`` runs the same comparison at full width on a GPU (every worker a process on the
one GPU; folders in benchmarks/out/resnet_fashion_w1), and ``--parts`` a subset of it:
benchmarks/resnet_fashion_gpu.sh is the one device call planned for it (issue 21, point 4).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))
import stability_tickets as ticket_bench  # noqa: E402
from _common import _init_worker, machine, mean_std, read_results  # noqa: E402

PRESET = "fashion_resnet20"
SEEDS = (0, 1, 2)
LEVELS = 12
STABILITY_POINTS = ("0it", "100it", "1ep", "2ep", "5ep")
CONTROL_LEVELS = (4, 8, 12)
CS_DENSITIES = (0.4096, 0.1678, 0.0859, 0.0687, 0.0343)
#: (density, priority) of the paper's-mask-recipe CS tickets: the two sparse densities where the default
#: recipe lost to IMP-R come before the rest of the default's own densities.
CS_PAPER_DENSITIES = ((0.0687, 1.5), (0.0859, 1.5), (0.1678, 2.5), (0.0343, 2.5))
#: The flags of the CS paper's recipe for the mask (docs/cs.md), against lottery's default (Adam logits).
CS_PAPER_FLAGS = ("--mask-optimizer", "sgd", "--temperature-schedule", "epoch", "--beta-final", "200")
CS_PAPER = "CS (paper's mask recipe)"
TICKET_STABILITY = ((0.1678, 8, True), (0.0687, 12, False))  # (CS density, IMP-R level, also at k = 0)
STABLE_BELOW = 0.02  # instability (test error, as a fraction) under which a network counts as stable
MATCHING = 0.002  # a ticket matches when its accuracy is at most 0.2 points below the dense network's


# -- the recipe and the jobs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """What every job trains: a preset, optionally at another width (``--width 1``: the full-width network,
    for a GPU), and the device it trains on. The device is not part of a run's identity (run folders made on
    a GPU and on the CPU are read alike); the width is, so runs of two widths never mix."""

    preset: str = PRESET
    width: float | None = None
    device: str = "cpu"

    def hparams(self) -> tuple[Any, Any, Any]:
        """(data, model, training) hyperparameters, as ``lottery ... --preset P [--width W]`` would make them."""
        from lottery.presets import get_preset

        p = get_preset(self.preset)
        model = p.model if self.width is None else replace(p.model, width=self.width)
        return p.data, model, p.training

    def options(self, out: str):
        from lottery.experiment import RunOptions

        return RunOptions(out=out, progress=False, device=self.device)

    def cli_flags(self) -> list[str]:
        return (["--preset", self.preset, "--device", self.device]
                + ([] if self.width is None else ["--width", repr(self.width)]))

    def describe(self) -> str:
        data, model, _ = self.hparams()
        return f"{model.model} at width {model.width:g} on {data.dataset} ({self.preset})"


DEFAULT = Recipe()


def imp_job(variant: str, rewind: str, levels: int, seed: int, out: str, recipe: Recipe = DEFAULT) -> dict:
    """IMP (variant "rewind": IMP k = 0 or IMP-R; "continue": IMP-C), the job of benchmarks/imp_lenet_fashion.py."""
    from lottery.methods.imp import IMPHparams
    from lottery.pipelines.imp import IMPJob, run_imp

    hp = IMPHparams(levels=levels, rewind=rewind, variant=variant)
    return run_imp(IMPJob(*recipe.hparams(), hp, seed=seed), recipe.options(out))


def stability_job(seed: int, out: str, points: tuple, recipe: Recipe = DEFAULT, mask: str | None = None,
                  start_state: str | None = None) -> dict:
    """Instability against k of the dense network (``mask`` None) or of a ticket (its mask file, and its
    own rewind state at the one point k when ``start_state`` is given), with the copy seeds of
    benchmarks/imp_lenet_fashion.py and benchmarks/stability_tickets.py (so the folders are theirs)."""
    from lottery.methods.stability import StabilityHparams
    from lottery.pipelines.imp import StabilityJob, run_stability

    hp = StabilityHparams(rewind_points=tuple(points), copy_seeds=(101 + seed, 201 + seed), mask=mask,
                          start_state=start_state)
    return run_stability(StabilityJob(*recipe.hparams(), hp, seed=seed), recipe.options(out))


def cs_job(seed: int, density: float, rewind: str, out: str, recipe: Recipe = DEFAULT,
           flags: tuple[str, ...] = ()) -> dict:
    """One CS ticket through the command line, so that the folder is the one `lottery search cs` makes
    (``flags``: more of its flags, e.g. CS_PAPER_FLAGS)."""
    from lottery.cli import main

    rc = main(["search", "cs", *recipe.cli_flags(), "--density", repr(density), "--rewind", rewind,
               "--seed", str(seed), "--out", out, "--no-progress", *flags])
    if rc != 0:
        raise RuntimeError(f"lottery search cs exited with {rc}")
    return {"seed": seed, "density": density}


def paper_out(out: Path) -> Path:
    """The folder of the paper's-mask-recipe CS runs that go with ``out``."""
    return out.with_name(out.name + "_cs_paper")


def cs_paper_job(seed: int, density: float, rewind: str, out: str, recipe: Recipe = DEFAULT) -> dict:
    """A CS ticket with the paper's mask recipe, in :func:`paper_out`. The seed's finished dense network is
    copied in from ``out`` first (through a temporary name, so a half-copied folder is never taken for a
    finished one), so `lottery search cs` reuses it instead of training it again."""
    import shutil

    source = dense_folder(Path(out), seed, recipe)
    target_out = paper_out(Path(out))
    if source is not None and not (target_out / source.name / "results.json").exists():
        target_out.mkdir(parents=True, exist_ok=True)
        partial = target_out / f".{source.name}.copy.tmp"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial, ignore=shutil.ignore_patterns(".lock", ".*.tmp"))
        shutil.rmtree(target_out / source.name, ignore_errors=True)  # an unfinished one: the copy replaces it
        partial.rename(target_out / source.name)
    return cs_job(seed, density, rewind, str(target_out), recipe, CS_PAPER_FLAGS)


def dense_folder(out: Path, seed: int, recipe: Recipe = DEFAULT) -> Path | None:
    """The finished dense run (train_*) of ``seed`` and the recipe in ``out``, or None."""
    for folder, r in read_results(out, "train_*/results.json"):
        if r.get("seed") == seed and same_recipe(folder, recipe):
            return folder
    return None


def control_job(control: str, source: str, level: int, out: str, recipe: Recipe = DEFAULT) -> dict:
    from lottery.methods.imp import RandomPruneHparams, RandomReinitHparams
    from lottery.pipelines.imp import run_random_prune, run_random_reinit

    options = recipe.options(out)
    if control == "random-prune":
        return run_random_prune(source, RandomPruneHparams(level=level, seed=1, scope="layerwise"), options)
    return run_random_reinit(source, RandomReinitHparams(level=level, seed=1), options)


def ticket_stability_job(seed: int, ticket: str, density: float, imp_level: int, rewind: str, points: tuple,
                         out: str, recipe: Recipe = DEFAULT, own_start: bool = False) -> dict:
    """A ticket's instability at ``points``; ``own_start``: at the one point k (= ``rewind``) from the
    ticket's own rewind state, its run folder's rewind.safetensors (a CS search's folder holds the mask
    beside it, an IMP run's folder is the mask's level folder's parent)."""
    masks = ticket_bench.find_masks(Path(out), Path(out), seed, 0.0, imp_level, cs_density=density, imp_rewind=rewind,
                                    cs_rewind=rewind)
    if ticket not in masks:
        raise RuntimeError(f"no {ticket} mask of seed {seed} at density {density} / level {imp_level} in {out}")
    mask = masks[ticket]
    start_state = None
    if own_start:
        if tuple(points) != (rewind,):
            raise ValueError(f"a ticket's own rewind state is its state at k = {rewind} alone, not at {points}")
        start_state = str((mask.parent if ticket == "CS" else mask.parent.parent) / "rewind.safetensors")
    return stability_job(seed, out, points, recipe, mask=str(mask), start_state=start_state)


@dataclass(frozen=True)
class Job:
    name: str
    priority: int  # smaller runs first
    fn: Callable[..., Any]
    args: tuple
    needs: tuple[str, ...] = ()
    part: str = ""  # one of PARTS (--parts runs a subset)


def same_recipe(folder: Path, recipe: Recipe) -> bool:
    """Whether the run in ``folder`` trained the recipe's data, model (width included) and training (so
    that runs of another recipe left in the same --out are never mixed in)."""
    from lottery.io import read_json

    data, model, training = recipe.hparams()
    try:
        hp = read_json(folder / "hparams.json")
    except (OSError, ValueError):
        return False
    return (hp.get("data"), hp.get("model"), hp.get("training")) == (
        data.to_dict(), model.to_dict(), training.to_dict())


def imp_runs(out: Path, seed: int, rewind: str, kind: str = "search-imp", recipe: Recipe = DEFAULT) -> list[dict]:
    """The finished IMP (``kind`` search-imp-c: IMP-C) runs of the preset's recipe rewinding to ``rewind``
    (one per seed: more levels continue the same folder)."""
    return [r for folder, r in read_results(out, f"{kind}_*/results.json")
            if r.get("seed") == seed and r.get("rewind") == rewind and len(r.get("levels", [])) > 1
            and same_recipe(folder, recipe)]


def dense_instability(out: Path, seeds=SEEDS, points=STABILITY_POINTS, recipe: Recipe = DEFAULT) -> dict[str, list[float]]:
    """{k: [instability of each seed that has finished k]} of the dense network's runs: one run per seed,
    the one analysing exactly ``points`` with the benchmark's copy seeds; each k counts once its
    ``k_*/result.json`` is written, before the whole run has finished."""
    from lottery.io import read_json

    table: dict[str, list[float]] = {k: [] for k in points}
    seen: set[int] = set()
    for hp_file in sorted(out.glob("stability_*/hparams.json")) if out.is_dir() else []:
        folder = hp_file.parent
        try:
            hp = read_json(hp_file)
        except (OSError, ValueError):
            continue
        seed, st = hp.get("seed"), hp.get("stability", {})
        if (seed not in seeds or seed in seen or st.get("mask") is not None or not same_recipe(folder, recipe)
                or st.get("rewind_points") != list(points) or st.get("copy_seeds") != [101 + seed, 201 + seed]):
            continue
        seen.add(seed)
        for result in sorted(folder.glob("k_*/result.json")):
            try:
                row = read_json(result)
            except (OSError, ValueError):
                continue
            if row.get("rewind") in table:
                table[row["rewind"]].append(row["instability"])
    return table


def imp_folder(out: Path, seed: int, rewind: str, kind: str = "search-imp", recipe: Recipe = DEFAULT) -> Path | None:
    """The run folder of the preset's IMP (``kind`` search-imp-c: IMP-C) run of ``seed`` rewinding to
    ``rewind``, or None if it has not started."""
    from lottery.io import read_json

    for hp_file in sorted(out.glob(f"{kind}_*/hparams.json")) if out.is_dir() else []:
        try:
            hp = read_json(hp_file)
        except (OSError, ValueError):
            continue
        if hp.get("seed") == seed and hp.get("imp", {}).get("rewind") == rewind and same_recipe(hp_file.parent, recipe):
            return hp_file.parent
    return None


def imp_levels(out: Path, seed: int, rewind: str, kind: str = "search-imp", recipe: Recipe = DEFAULT) -> list[dict]:
    """The finished levels (level_*/results.json) of the preset's IMP (``kind`` search-imp-c: IMP-C) run of
    ``seed`` rewinding to ``rewind``, whether or not the run has reached its last level."""
    from lottery.io import read_json

    folder = imp_folder(out, seed, rewind, kind, recipe)
    levels = []
    for result in folder.glob("level_*/results.json") if folder else []:
        try:
            levels.append(read_json(result))
        except (OSError, ValueError):
            continue
    return sorted(levels, key=lambda lv: lv["level"])


def imp_c_overlap(out: Path, seeds, rewind: str, recipe: Recipe = DEFAULT) -> dict[int, dict[int, float]]:
    """{level: {seed: share of the weights IMP-R keeps that IMP-C keeps too}} for every level both runs of a
    seed have a mask for. Why: IMP-C's level 1 must be IMP-R's (both prune the same dense network), and how
    far their masks part afterwards says how different a ticket IMP-C's continued training finds."""
    from lottery.io import load_tensors

    table: dict[int, dict[int, float]] = {}
    for s in seeds:
        rewound, continued = imp_folder(out, s, rewind, "search-imp", recipe), imp_folder(out, s, rewind, "search-imp-c", recipe)
        if rewound is None or continued is None:
            continue
        for mask_file in sorted(continued.glob("level_*/mask.safetensors")):
            if mask_file.parent.name == "level_0":
                continue  # the dense network: nothing pruned yet
            other = rewound / mask_file.parent.name / "mask.safetensors"
            if not other.exists():
                continue
            a, b = load_tensors(other), load_tensors(mask_file)
            kept = sum(int(v.bool().sum()) for v in a.values())
            both = sum(int((v.bool() & b[name].bool()).sum()) for name, v in a.items())
            table.setdefault(int(mask_file.parent.name.split("_")[1]), {})[s] = both / kept if kept else float("nan")
    return dict(sorted(table.items()))


def pick_rewind(out: Path, seeds=SEEDS, points=STABILITY_POINTS, recipe: Recipe = DEFAULT) -> tuple[str | None, str]:
    """(k, why): the earliest rewind point whose mean instability over every seed is below the line.
    Points are looked at in order, and k is chosen as soon as it and every earlier point are finished for
    every seed (the later points cannot change which is the earliest), so the jobs that need k start while
    the later points still run. (None, why) while that is not known, or when no point is stable."""
    table = dense_instability(out, seeds, points, recipe)
    for k in points:
        if len(table[k]) < len(seeds):
            return None, f"the dense network's instability at k = {k} is not finished for every seed"
        if statistics.fmean(table[k]) < STABLE_BELOW:
            earlier = ", ".join(f"{e} {100 * statistics.fmean(table[e]):.2f}" for e in points[:points.index(k)])
            return k, (f"earliest k with mean instability below {100 * STABLE_BELOW:g} points: "
                       f"{k} ({100 * statistics.fmean(table[k]):.2f} over {len(seeds)} seeds"
                       f"{'; before it ' + earlier if earlier else ''})")
    return None, (f"no rewind point is stable (means {', '.join(f'{k} {100 * statistics.fmean(v):.2f}' for k, v in table.items())}); "
                  "pass --rewind K to go on with a k of your choice")


#: where a ticket's instability copies start (report): its own rewind state, the initial weights (k = 0:
#: the same for every run of the seed, so the ticket's own), or the dense instability run's state at k
TICKET_STARTS = {"own": "its own rewind weights", "init": "the initial weights",
                 "dense": "the dense run's weights at k (control)"}
PARTS = ("stability", "imp0", "impr", "cs", "controls", "tickets", "impc", "cs_paper")


def plan(out: Path, seeds, rewind: str | None, levels: int = LEVELS, recipe: Recipe = DEFAULT,
         points: tuple[str, ...] = STABILITY_POINTS, parts: tuple[str, ...] = PARTS) -> list[Job]:
    """Every job of ``parts`` whose inputs are known now (the jobs after the choice of k appear once it is
    made). A job that needs one of a part left out does not wait for it: it reads that part's run folders
    as they are, and fails with a clear error if they are missing."""
    o = str(out)
    jobs = [Job(f"stability s{s}", 0, stability_job, (s, o, points, recipe), part="stability") for s in seeds]
    jobs += [Job(f"IMP k=0 s{s}", 3, imp_job, ("rewind", "0it", levels, s, o, recipe), part="imp0") for s in seeds]
    if rewind is not None:
        # planned only once k is chosen (the ticket analyses also wait for their seed's dense instability
        # run, whose dense network they start from)
        for s in seeds:
            impr = f"IMP k=0 s{s}" if rewind == "0it" else f"IMP-R k={rewind} s{s}"  # k = 0: IMP-R is IMP
            if rewind != "0it":
                jobs.append(Job(impr, 1, imp_job, ("rewind", rewind, levels, s, o, recipe), part="impr"))
            jobs.append(Job(f"IMP-C k={rewind} s{s}", 6, imp_job, ("continue", rewind, levels, s, o, recipe),
                            part="impc"))
            for d in CS_DENSITIES:
                jobs.append(Job(f"CS {d} s{s}", 2, cs_job, (s, d, rewind, o, recipe), part="cs"))
            for d, priority in CS_PAPER_DENSITIES:
                jobs.append(Job(f"CS-paper {d} s{s}", priority, cs_paper_job, (s, d, rewind, o, recipe),
                                part="cs_paper"))
            source = imp_runs(out, s, rewind, recipe=recipe)
            if source:  # the controls need IMP-R's folder: planned once it has finished
                for control in ("random-prune", "random-reinit"):
                    for level in CONTROL_LEVELS:
                        jobs.append(Job(f"{control} level {level} s{s}", 4, control_job,
                                        (control, source[0]["run_dir"], level, o, recipe), (impr,), part="controls"))
            for density, level, at_zero in TICKET_STABILITY:
                needs = (impr, f"CS {density} s{s}", f"stability s{s}")
                for ticket in ("IMP-R", "CS"):
                    # at k: from the ticket's own rewind state
                    jobs.append(Job(f"instability {ticket} {density} own s{s}", 5, ticket_stability_job,
                                    (s, ticket, density, level, rewind, (rewind,), o, recipe, True), needs,
                                    part="tickets"))
                # from the dense instability run's states: k = 0 (the initial weights, every run's of the seed)
                # and, for CS, k as planned first (its own mask on the dense network's weights: a control;
                # these runs' folders exist, so they keep their points)
                if at_zero and rewind != "0it":
                    jobs.append(Job(f"instability IMP-R {density} s{s}", 5, ticket_stability_job,
                                    (s, "IMP-R", density, level, rewind, ("0it",), o, recipe), needs, part="tickets"))
                cs_points = ("0it", rewind) if at_zero and rewind != "0it" else (rewind,)
                jobs.append(Job(f"instability CS {density} s{s}", 5, ticket_stability_job,
                                (s, "CS", density, level, rewind, cs_points, o, recipe), needs, part="tickets"))
    jobs = [j for j in jobs if j.part in parts]
    planned = {j.name for j in jobs}
    return [replace(j, needs=tuple(n for n in j.needs if n in planned)) for j in jobs]


def _log(message: str) -> None:
    print(f"[{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC] {message}", flush=True)


def run(out: Path, seeds, workers: int, rewind: str | None, levels: int = LEVELS, recipe: Recipe = DEFAULT,
        points: tuple[str, ...] = STABILITY_POINTS, parts: tuple[str, ...] = PARTS) -> int:
    """Run every job of :func:`plan` (re-planned as jobs finish), ``workers`` at a time. Returns the
    number of jobs that failed (their dependants are not run)."""
    import multiprocessing as mp

    from lottery.io import read_json, write_json

    out.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    failed: set[str] = set()
    running: dict[Any, Job] = {}
    started: dict[str, float] = {}
    chosen = rewind
    choice = out / "rewind_choice.json"
    if rewind is not None:
        write_json(choice, {"rewind": rewind, "why": "given with --rewind", "seeds": list(seeds)})
    elif choice.exists():
        chosen = read_json(choice)["rewind"]
        _log(f"rewind point k = {chosen} ({choice}; delete it to choose again)")
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(1,)) as pool:
        while True:
            if chosen is None:
                chosen, why = pick_rewind(out, seeds, points, recipe)
                if chosen is not None:
                    _log(f"rewind point k = {chosen}: {why}")
                    write_json(choice, {"rewind": chosen, "why": why, "seeds": list(seeds),
                                                            "stable_below": STABLE_BELOW})
            jobs = plan(out, seeds, chosen, levels, recipe, points, parts)
            names = {j.name for j in jobs}
            for j in jobs:  # dependants of a failed job fail too, so the loop can end
                if j.name not in failed and any(n in failed for n in j.needs):
                    failed.add(j.name)
                    _log(f"skipped {j.name}: it needs {', '.join(n for n in j.needs if n in failed)}")
            busy = {j.name for j in running.values()}
            ready = sorted((j for j in jobs if j.name not in done | failed | busy
                            and all(n in done for n in j.needs)), key=lambda j: (j.priority, j.name))
            for j in ready[:max(0, workers - len(running))]:
                try:
                    running[pool.submit(j.fn, *j.args)] = j
                except BrokenProcessPool:
                    _log("the worker pool broke (a worker died: out of memory or killed); run the command again "
                         "to resume")
                    return len(failed) + 1
                started[j.name] = time.monotonic()
                _log(f"start {j.name}")
            if not running:
                waiting = sorted(names - done - failed)
                if chosen is None and rewind is None and all(f"stability s{s}" in done for s in seeds):
                    _log(f"stopped before k: {pick_rewind(out, seeds, points, recipe)[1]}")
                elif waiting:
                    _log(f"stopped with {len(waiting)} jobs whose inputs are missing: {', '.join(waiting)}")
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                j = running.pop(fut)
                minutes = (time.monotonic() - started[j.name]) / 60
                try:
                    fut.result()
                    done.add(j.name)
                    _log(f"done {j.name} ({minutes:.1f} min)")
                except Exception as e:  # one job's failure must not stop the others
                    failed.add(j.name)
                    _log(f"FAILED {j.name} after {minutes:.1f} min: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    _log(f"{len(done)} jobs done, {len(failed)} failed")
    return len(failed)


# -- report -----------------------------------------------------------------------------------------------
def _pm(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{100 * m:.2f} ± {100 * s:.2f}" if values else "-"


def _per_seed(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.2f}" for v in values)


def nominal(level: int, rate: float = 0.2) -> float:
    """An IMP level's nominal density, (1 - rate)^level: the row it shares with CS's target density (the
    exact density differs in the 4th digit, as the counts are rounded per layer)."""
    return (1 - rate) ** level


def collect(out: Path, seeds, rewind: str | None, points: tuple[str, ...] = STABILITY_POINTS,
            recipe: Recipe = DEFAULT) -> dict[str, Any]:
    """Every finished result of the preset's recipe, as {series: {density: [per-seed rows]}}, plus the
    instabilities; IMP's levels and the controls under their nominal density, CS under its target density
    (which it has exactly). Only runs of rewind point ``rewind`` (IMP-R, IMP-C, CS, the controls of IMP-R,
    the tickets analysed) are taken, so runs of another k in the same folder are never mixed in."""
    from lottery.io import read_json

    series: dict[str, dict[float, list[dict]]] = {}

    def add(name: str, density: float, row: dict) -> None:
        series.setdefault(name, {}).setdefault(round(density, 4), []).append(row)

    for s in seeds:
        # the dense network: the seed's dense run (train_*: what CS's and IMP-R's tickets are compared with,
        # and what IMP-R's level 0 repeats); IMP k = 0's level 0, the same recipe trained once more, only
        # where that run is missing (it is also kept apart, as "IMP k=0 level 0", to show the spread)
        dense_run = dense_folder(out, s, recipe)
        if dense_run is not None:
            add("dense", 1.0, read_results(dense_run, "results.json")[0][1])
        for name, rw, kind in (("IMP k=0", "0it", "search-imp"), (f"IMP-R k={rewind}", rewind, "search-imp"),
                               (f"IMP-C k={rewind}", rewind, "search-imp-c")):
            if rw is None or (name.startswith("IMP-R") and rw == "0it"):
                continue
            for lv in imp_levels(out, s, rw, kind, recipe):
                if lv.get("test_accuracy") is None or (lv["level"] == 0 and name != "IMP k=0"):
                    continue
                if lv["level"] == 0:
                    add("IMP k=0 level 0", 1.0, lv)
                    if dense_run is None:
                        add("dense", 1.0, lv)
                else:
                    add(name, nominal(lv["level"]), lv)
    for series_name, _, r in cs_tickets(out, seeds, rewind, recipe):
        add(series_name, r["target_density"], r)
    for control in ("random-prune", "random-reinit"):
        for folder, r in read_results(out, f"*{control}*/results.json"):
            source = Path(str(r.get("source_run", ""))).name
            if (r.get("seed") in seeds and r.get("test_accuracy") is not None and r.get("rewind") == rewind
                    and source.startswith("search-imp_") and r.get("control_seed") == 1
                    and r.get("scope", "layerwise") == "layerwise" and same_recipe(out / source, recipe)):
                add(f"{control.replace('-', ' ')} (IMP-R masks)", nominal(r["level"]), r)
    tickets: dict[tuple[str, float, str, str], dict[int, dict[str, Any]]] = {}
    for folder, r in read_results(out, "stability_*/results.json"):
        if r.get("mask") is None or r.get("seed") not in seeds or not same_recipe(folder, recipe):
            continue
        mask = Path(r["mask"])
        source = mask.parent if mask.parent.name.startswith("search-cs_") else mask.parent.parent
        try:
            found = read_json(out / source.name / "results.json")
        except (OSError, ValueError):
            continue
        if found.get("rewind") != rewind or found.get("method") not in ("cs", "imp"):
            continue  # a ticket of another k (IMP at k = 0 included)
        name = "CS" if found["method"] == "cs" else "IMP-R"
        for row in r["rows"]:
            start = ("own" if r.get("start_state") else "init" if row["rewind"] == "0it" else "dense")
            ends = [1 - row[e] for e in ("error_a", "error_b") if row.get(e) is not None]
            tickets.setdefault((name, round(r["mask_density"], 4), row["rewind"], start), {})[r["seed"]] = {
                "instability": row["instability"], "ends": ends, "l2_between": row.get("l2_between")}
    return {"series": series, "dense_instability": dense_instability(out, seeds, points, recipe),
            "tickets": {key: [v[s]["instability"] for s in sorted(v)] for key, v in tickets.items()},
            "ticket_details": {key: [v[s] for s in sorted(v)] for key, v in tickets.items()}}


def paper_recipe(folder: Path) -> bool:
    """Whether the CS run in ``folder`` used the paper's mask recipe (CS_PAPER_FLAGS)."""
    from lottery.io import read_json

    try:
        cs = read_json(folder / "hparams.json").get("cs", {})
    except (OSError, ValueError):
        return False
    return (cs.get("mask_optimizer"), cs.get("temperature_schedule"), cs.get("beta_final")) == ("sgd", "epoch", 200.0)


def cs_tickets(out: Path, seeds, rewind: str | None, recipe: Recipe = DEFAULT) -> list[tuple[str, Path, dict]]:
    """(series, folder, results) of every finished CS ticket of ``seeds``, the recipe and rewind point
    ``rewind`` searched for a target density: series "CS" (lottery's default recipe, in ``out``) or
    CS_PAPER (the paper's mask recipe, in :func:`paper_out`)."""
    found = [("CS", folder, r) for folder, r in read_results(out, "search-cs_*/results.json")]
    found += [(CS_PAPER, folder, r) for folder, r in read_results(paper_out(out), "search-cs_*/results.json")
              if paper_recipe(folder)]
    return [(series, folder, r) for series, folder, r in found
            if r.get("seed") in seeds and r.get("mode") == "ticket" and r.get("target_density")
            and r.get("rewind") == rewind and same_recipe(folder, recipe)]


def cs_checks(out: Path, seeds, rewind: str | None, recipe: Recipe = DEFAULT) -> list[dict]:
    """What each finished CS ticket's search did, to tell a weak CS result from a fault (is the mask binary,
    is its density the one asked, did the logits move?): the density asked and kept, whether the last
    round's mask converged (no undecided logits, and the hard mask scoring on validation what the soft one
    did), the soft and hard validation accuracy at that round's end, its share of undecided logits, the
    logits that changed side in it, and the retrained ticket's test accuracy; "series" says which CS
    (lottery's default recipe in ``out``, the paper's mask recipe in :func:`paper_out`)."""
    rows = []
    for series, folder, r in cs_tickets(out, seeds, rewind, recipe):
        last = (r.get("convergence") or [{}])[-1]
        rows.append({"series": series, "seed": r["seed"], "asked": r["target_density"], "density": r["density"],
                     "converged": r.get("mask_converged"), "soft": last.get("soft_val_accuracy"),
                     "hard": last.get("hard_val_accuracy"), "undecided": last.get("undecided"),
                     "flips": last.get("flips"), "test": r["test_accuracy"], "folder": folder})
    return sorted(rows, key=lambda row: (-row["asked"], row["series"], row["seed"]))


def layer_densities(out: Path, seeds, rewind: str | None, density: float, recipe: Recipe = DEFAULT) -> dict:
    """Per-layer density of the CS tickets at ``density`` and of the IMP-R and IMP-C levels of that nominal
    density (their mask.json), as {layer: {"CS": [per seed], CS_PAPER: [...], "IMP-R": [...], "IMP-C": [...]}}:
    where each method keeps its weights, the first thing to compare when two differ in accuracy at one density."""
    from lottery.io import read_json

    table: dict[str, dict[str, list[float]]] = {}
    for row in cs_checks(out, seeds, rewind, recipe):
        if round(row["asked"], 4) == round(density, 4):
            for name, layer in read_json(row["folder"] / "mask.json")["layers"].items():
                table.setdefault(name, {}).setdefault(row["series"], []).append(layer["density"])
    level = round(math.log(density) / math.log(0.8)) if 0 < density < 1 else None
    for series, kind in (("IMP-R", "search-imp"), ("IMP-C", "search-imp-c")):
        for s in seeds:
            folder = imp_folder(out, s, rewind, kind, recipe) if rewind not in (None, "0it") else None
            if folder is None or level is None or round(nominal(level), 4) != round(density, 4):
                continue
            try:
                layers = read_json(folder / f"level_{level}" / "mask.json")["layers"]
            except (OSError, ValueError):
                continue  # that level has not finished
            for name, layer in layers.items():
                table.setdefault(name, {}).setdefault(series, []).append(layer["density"])
    return table


def imp_c_layer_gaps(out: Path, seeds, rewind: str, levels: list[int], recipe: Recipe = DEFAULT,
                     top: int = 3) -> dict[int, dict[str, tuple[float, float]]]:
    """{level: {layer: (IMP-R's, IMP-C's mean density)}} for the ``top`` layers whose densities differ most at the
    sparsest of ``levels`` every seed of both has finished; every such level gets a row. Whether where the two
    masks part follows where their tickets part in accuracy is read off this table."""
    by_level = {}
    for level in levels:
        layers = layer_densities(out, seeds, rewind, nominal(level), recipe)
        if layers and all(len(v.get("IMP-R", [])) == len(v.get("IMP-C", [])) == len(seeds) for v in layers.values()):
            by_level[level] = {name: (statistics.fmean(v["IMP-R"]), statistics.fmean(v["IMP-C"]))
                               for name, v in layers.items()}
    if not by_level:
        return {}
    sparsest = by_level[max(by_level)]
    chosen = sorted(sparsest, key=lambda name: -abs(sparsest[name][0] - sparsest[name][1]))[:top]
    return {level: {name: row[name] for name in chosen} for level, row in by_level.items()}


def sparsest_matching(rows_by_density: dict[float, list[dict]], dense: float) -> float | None:
    """The smallest density whose mean accuracy over seeds is at most MATCHING below the dense mean."""
    ok = [d for d, rows in rows_by_density.items() if d < 1
          and statistics.fmean(r["test_accuracy"] for r in rows) >= dense - MATCHING]
    return min(ok) if ok else None


def first_below(rows_by_density: dict[float, list[dict]], dense: float) -> float | None:
    """The densest density (walking down from dense) whose mean accuracy falls below dense - MATCHING."""
    for d in sorted(rows_by_density, reverse=True):
        if d < 1 and statistics.fmean(r["test_accuracy"] for r in rows_by_density[d]) < dense - MATCHING:
            return d
    return None


def welch_t(a: list[float], b: list[float]) -> float:
    if len(a) < 2 or len(b) < 2:
        return math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    return (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb) if va + vb > 0 else math.nan


def report(out: Path, seeds, rewind: str | None, figure: Path | None, points: tuple[str, ...] = STABILITY_POINTS,
           recipe: Recipe = DEFAULT) -> None:
    print(f"machine: {machine()}\nrecipe: {recipe.describe()}\nrun folders: {out}\n")
    choice = out / "rewind_choice.json"
    if rewind is None and choice.exists():
        from lottery.io import read_json

        made = read_json(choice)
        rewind = made["rewind"]
        print(f"rewind point k: {rewind} (rewind_choice.json: {made['why']})\n")
    elif rewind is None:
        rewind, why = pick_rewind(out, seeds, points, recipe)
        print(f"rewind point k: {rewind} ({why})\n" if rewind else f"rewind point k: not chosen yet ({why})\n")
    data = collect(out, seeds, rewind, points, recipe)
    series = data["series"]
    dense_rows = series.get("dense", {}).get(1.0, [])
    dense = statistics.fmean(r["test_accuracy"] for r in dense_rows) if dense_rows else None
    again = series.get("IMP k=0 level 0", {}).get(1.0, [])
    per_seed = " / ".join(f"{100 * r['test_accuracy']:.2f}" for r in dense_rows)
    per_seed_again = " / ".join(f"{100 * r['test_accuracy']:.2f}" for r in again) or "-"
    print(f"dense (each seed's dense run): {_pm([r['test_accuracy'] for r in dense_rows])} % over {len(dense_rows)} "
          f"seeds ({per_seed}); trained again as IMP k=0's level 0: {per_seed_again}\n")
    methods = [m for m in series if m not in ("dense", "IMP k=0 level 0")]
    densities = sorted({d for m in methods for d in series[m]}, reverse=True)
    if methods:
        print("| density | " + " | ".join(methods) + " |")
        print("|---" * (len(methods) + 1) + "|")
    else:
        print("(no sparse network has finished yet)")
    for d in densities:
        cells = []
        for m in methods:
            rows = series[m].get(d, [])
            cells.append(f"{_pm([r['test_accuracy'] for r in rows])} ({len(rows)})" if rows else "")
        print(f"| {d:.4f} | " + " | ".join(cells) + " |")
    print("\ntest accuracy %, mean ± std over seeds (number of seeds)\n")

    print("| k | instability of the dense network, points (mean ± std) | per seed |\n|---|---|---|")
    for k, values in data["dense_instability"].items():
        if values:
            print(f"| {k} | {_pm(values)} | {_per_seed(values)} |")
    if data["tickets"]:
        print("\n| ticket | density | k | copies start from | instability, points (mean ± std) | per seed "
              "| copies end at, test % | copies apart, L2 (per seed) |\n|---|---|---|---|---|---|---|---|")
        for key, values in sorted(data["tickets"].items()):
            name, d, k, start = key
            details = data["ticket_details"][key]
            ends = [a for row in details for a in row["ends"]]
            span = f"{100 * min(ends):.2f}-{100 * max(ends):.2f}" if ends else "-"
            apart = " / ".join("-" if row["l2_between"] is None else f"{row['l2_between']:.2f}" for row in details)
            print(f"| {name} | {d:.4f} | {k} | {TICKET_STARTS[start]} | {_pm(values)} | "
                  f"{_per_seed(values)} | {span} | {apart} |")

    overlap = imp_c_overlap(out, seeds, rewind, recipe) if rewind else {}
    if overlap:
        print(f"\nIMP-C's masks against IMP-R's (k={rewind}, same seed and level): share of the weights IMP-R keeps "
              "that IMP-C keeps too, %\n\n| level | density | per seed |\n|---|---|---|")
        for level, shares in overlap.items():
            print(f"| {level} | {nominal(level):.4f} | "
                  + " / ".join(f"s{s} {100 * v:.1f}" for s, v in sorted(shares.items())) + " |")

        gaps = imp_c_layer_gaps(out, seeds, rewind, sorted(overlap), recipe)
        if gaps:
            layers = list(next(iter(gaps.values())))
            print(f"\nIMP-R's and IMP-C's per-layer density (k={rewind}), %, mean over the seeds, in the {len(layers)} "
                  "layers where they differ most at the sparsest level\n\n| level | density | "
                  + " | ".join(f"{name}: IMP-R / IMP-C" for name in layers) + " |\n" + "|---" * (len(layers) + 2) + "|")
            for level, row in gaps.items():
                print(f"| {level} | {nominal(level):.4f} | "
                      + " | ".join(f"{100 * r:.1f} / {100 * c:.1f}" for r, c in row.values()) + " |")

    checks = cs_checks(out, seeds, rewind, recipe)
    if checks:
        print("\nCS searches (the last round of each; converged: binary and the hard mask as good as the soft one "
              "on validation):\n\n| CS | density asked | seed | mask density | converged | soft / hard val % "
              "| undecided % | flips | ticket test % |\n|---|---|---|---|---|---|---|---|---|")
        for c in checks:
            soft_hard = "-" if c["soft"] is None else f"{100 * c['soft']:.2f} / {100 * c['hard']:.2f}"
            undecided = "-" if c["undecided"] is None else f"{100 * c['undecided']:.3f}"
            print(f"| {c['series']} | {c['asked']:.4f} | {c['seed']} | {c['density']:.4f} | {c['converged']} | {soft_hard} | "
                  f"{undecided} | {c['flips'] if c['flips'] is not None else '-'} | {100 * c['test']:.2f} |")
        for d in sorted({c["asked"] for c in checks}):
            layers = layer_densities(out, seeds, rewind, d, recipe)
            if any(("CS" in v or CS_PAPER in v) and "IMP-R" in v for v in layers.values()):
                columns = [m for m in ("CS", CS_PAPER, "IMP-R", "IMP-C") if any(m in v for v in layers.values())]
                print(f"\nwhere the weights are at density {d:.4f}: per-layer density, % (mean over the seeds "
                      f"that have it)\n\n| layer | " + " | ".join(f"{m} k={rewind}" if m.startswith("IMP") else m
                                                                for m in columns)
                      + " |\n" + "|---" * (len(columns) + 1) + "|")
                for name, v in layers.items():
                    cells = [f"{100 * statistics.fmean(v[m]):.1f} ({len(v[m])})" if m in v else "-" for m in columns]
                    print(f"| {name} | " + " | ".join(cells) + " |")
                break  # the sparsest density CS and IMP-R both have

    if dense is not None:
        claims(series, data["dense_instability"], dense, rewind, len(seeds))
    if figure is not None and methods:
        plot(series, dense_rows, figure, recipe)
        print(f"\nfigure: {figure}")


def claims(series: dict[str, dict[float, list[dict]]], instability: dict[str, list[float]], dense: float,
           rewind: str | None, n_seeds: int) -> None:
    """Print claims (a)-(c) as measured. Only densities every seed has finished count, and (a) compares
    IMP k = 0 and IMP-R over the levels both have reached."""
    def complete(name: str) -> dict[float, list[dict]]:
        return {d: rows for d, rows in series.get(name, {}).items() if len(rows) == n_seeds}

    def mean(rows: list[dict]) -> float:
        return statistics.fmean(r["test_accuracy"] for r in rows)

    print(f"\nclaims (only densities with all {n_seeds} seeds; a ticket matches when its mean accuracy is at "
          f"most {100 * MATCHING:g} points below the dense mean, {100 * dense:.2f}):")
    imp0, impr = complete("IMP k=0"), complete(f"IMP-R k={rewind}")
    if rewind is None:
        print("(a) k is not chosen yet")
    elif rewind == "0it":
        print("(a) not applicable: k = 0, so IMP-R is IMP k = 0")
    elif not impr or not imp0:
        print(f"(a) not measured yet (finished levels: IMP k=0 {len(imp0)}, IMP-R {len(impr)})")
    else:
        both = set(imp0) & set(impr)
        fa = first_below({d: imp0[d] for d in both}, dense)
        fr = first_below({d: impr[d] for d in both}, dense)
        verdict = "holds" if fa is not None and (fr is None or fa > fr) else "does not hold"
        print(f"(a) over the {len(both)} levels both reached (down to {min(both):.4f}): IMP k=0 first falls below "
              f"matching at density {fa if fa is not None else 'none of them'}, IMP-R at "
              f"{fr if fr is not None else 'none of them'}: {verdict}")
    means = [(k, statistics.fmean(v)) for k, v in instability.items() if len(v) == n_seeds]
    stable = next((k for k, m in means if m < STABLE_BELOW), None)
    falls = all(a >= b for (_, a), (_, b) in zip(means, means[1:]))
    trend = (f"{', '.join(f'{k} {100 * m:.2f}' for k, m in means)} points ({'never rises with k' if falls else 'not monotone in k'}; "
             f"first below {100 * STABLE_BELOW:g}: {stable})") if means else "not measured for every seed yet"
    print(f"(b) mean instability against k: {trend}; "
          f"sparsest matching: IMP-R (k={rewind}) {sparsest_matching(impr, dense) if impr else '-'}, "
          f"IMP k=0 {sparsest_matching(imp0, dense) if imp0 else '-'}")
    for name in ("CS", CS_PAPER):
        cs = complete(name)
        if name != "CS" and not cs:
            continue  # the paper's recipe is a check, reported once it has a density with every seed
        sc = sparsest_matching(cs, dense) if cs else None
        sr = sparsest_matching(impr, dense) if impr else None
        shared = sorted(set(cs) & set(impr), reverse=True)
        diffs = []
        for d in shared:
            a, b = [r["test_accuracy"] for r in cs[d]], [r["test_accuracy"] for r in impr[d]]
            diffs.append(f"{d:.4f}: {100 * (statistics.fmean(a) - statistics.fmean(b)):+.2f} (Welch t {welch_t(a, b):+.1f})")
        half = "-" if sc is None or sr is None else "yes" if sc <= sr / 2 + 1e-9 else "no"
        ge = "-" if not shared else "yes" if all(mean(cs[d]) >= mean(impr[d]) for d in shared) else "no"
        print(f"(c) {name}: sparsest matching: {name} {'none' if sc is None else sc}, IMP-R "
              f"{'none' if sr is None else sr} (at most half of IMP-R: {half}); {name} - IMP-R "
              f"at shared densities, points: {'; '.join(diffs) or 'none yet'} (at least as accurate at every one: {ge})")
    impc = complete(f"IMP-C k={rewind}")
    if impc and impr:  # not one of the papers' claims: IMP-C beside IMP-R, as RESULTS.md reads it
        rows = []
        for d in sorted(set(impc) & set(impr), reverse=True):
            a, b = [r["test_accuracy"] for r in impc[d]], [r["test_accuracy"] for r in impr[d]]
            below = " every seed below" if max(a) < min(b) else ""
            rows.append(f"{d:.4f}: {100 * (statistics.fmean(a) - statistics.fmean(b)):+.2f} (Welch t {welch_t(a, b):+.1f}){below}")
        sc = sparsest_matching(impc, dense)
        continued = [f"{d:.4f}: {100 * statistics.fmean(r['continued_test_accuracy'] for r in impc[d]):.2f}"
                     for d in sorted(impc, reverse=True) if all(r.get("continued_test_accuracy") is not None for r in impc[d])]
        print(f"IMP-C (not a claim): sparsest matching {'none' if sc is None else sc}; IMP-C - IMP-R, points: "
              + "; ".join(rows) + ("; the network IMP-C keeps training, test %: " + "; ".join(continued) if continued else ""))


def plot(series: dict[str, dict[float, list[dict]]], dense_rows: list[dict], path: Path,
         recipe: Recipe = DEFAULT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from lottery.io import atomic_write_bytes
    import io

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if dense_rows:
        m, s = mean_std([100 * r["test_accuracy"] for r in dense_rows])
        ax.axhspan(m - s, m + s, color="0.85", label=f"dense {m:.2f} ± {s:.2f}")
        ax.axhline(m - 100 * MATCHING, color="0.5", ls=":", lw=1, label="dense - 0.2 (matching)")
    for name, by_density in series.items():
        if name in ("dense", "IMP k=0 level 0"):
            continue
        ds = sorted(d for d in by_density if d < 1)
        if not ds:
            continue
        stats = [mean_std([100 * r["test_accuracy"] for r in by_density[d]]) for d in ds]
        ax.errorbar(ds, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", ms=4, capsize=3, label=name,
                    ls="-" if not name.startswith("random") else "--")
    ax.set_xscale("log")
    ticks = [0.8, 0.4, 0.2, 0.1, 0.05, 0.03]
    ax.set_xticks(ticks, [f"{100 * t:g} %" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.invert_xaxis()
    ax.set_xlabel("density (prunable weights kept)")
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    ax.set_title(f"tickets of {recipe.describe()}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("run", "report"))
    ap.add_argument("--out", default=None,
                    help="folder of the run folders (default: benchmarks/out/resnet_fashion, with --width W "
                         "benchmarks/out/resnet_fashion_wW)")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--preset", default=PRESET, help="the recipe (another one only to try the script out)")
    ap.add_argument("--width", type=float, default=None,
                    help="the network's width instead of the preset's (1: the full-width ResNet-20, for a GPU)")
    ap.add_argument("--device", default="cpu", help="where the jobs train: cpu, cuda (every worker on the one GPU) or auto")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"the parts to run, a comma list of {', '.join(PARTS)} (default: all); a part that "
                         "needs one left out reads its folders as they are")
    ap.add_argument("--levels", type=int, default=LEVELS)
    ap.add_argument("--stability-points", default=",".join(STABILITY_POINTS))
    ap.add_argument("--rewind", default=None, help="IMP-R's and CS's rewind point (default: chosen from the instability)")
    ap.add_argument("--figure", default=None,
                    help="the figure's file (default: benchmarks/figures/<the --out folder's name>/accuracy_vs_density.png; "
                         "'' for none)")
    args = ap.parse_args()
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 0,1,2")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        ap.error(f"--parts {args.parts!r}: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    if args.width is not None and args.width <= 0:
        ap.error(f"--width {args.width:g}: the width multiplier must be positive (e.g. 0.25, 0.5 or 1)")
    try:
        from lottery.experiment import resolve_device

        device = resolve_device(args.device)
    except Exception as e:  # a device that is unknown or not there, said before anything is written
        ap.error(str(e))
    recipe = Recipe(args.preset, args.width, device)
    out = Path(args.out) if args.out else Path("benchmarks/out") / (
        "resnet_fashion" if args.width is None else f"resnet_fashion_w{args.width:g}")
    figure = (Path("benchmarks/figures") / out.name / "accuracy_vs_density.png" if args.figure is None
              else Path(args.figure) if args.figure else None)
    points = tuple(p.strip() for p in args.stability_points.split(",") if p.strip())
    if args.command == "run":
        sys.exit(1 if run(out, seeds, args.workers, args.rewind, args.levels, recipe, points, parts) else 0)
    report(out, seeds, args.rewind, figure, points, recipe)


if __name__ == "__main__":
    main()
