"""The stability analysis (linear mode connectivity) of the dense network or an IMP level against the
rewind point k, as a resumable job."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from lottery.engine import Callback
from lottery.errors import CheckpointError, ConfigError
from lottery.experiment import write_results, RunOptions, copy_finished_files, describe_run, folder_lock, log_line, reuse_finished, run_folder_name, write_metrics_csv
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams
from lottery.io import load_tensors, read_json, save_tensors, write_json
from lottery.masks import Mask
from lottery.methods.cs import SnapshotCallback
from lottery.methods.stability import StabilityHparams, instability, l2_distance
from lottery.step import Step
from lottery.pipelines.stages import StageCallbacks, _Context, _masked_state, _pct


STABILITY_COLUMNS = (
    ("rewind", "k", "{}"),
    ("rewind_iteration", "k (it)", "{}"),
    ("density", "density", "{:.4f}"),
    ("instability", "instability %", "pct"),
    ("error_a", "error a %", "pct"),
    ("error_b", "error b %", "pct"),
    ("max_error", "max error %", "pct"),
    ("l2_to_dense", "L2 to dense", "{:.4f}"),
    ("l2_between", "L2 a-b", "{:.4f}"),
)

# Matching ticket (IMP-R's definition): within 0.2 percentage points of the dense network.


@dataclass
class StabilityJob:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    stability: StabilityHparams = field(default_factory=StabilityHparams)
    seed: int = 0

    kind = "stability"


# -- stability ----------------------------------------------------------------------------------------------
def _k_dirname(spec: str) -> str:
    return "k_" + "".join(c for c in spec if c.isalnum())


def run_stability(job: StabilityJob, options: RunOptions, *, callbacks: StageCallbacks | None = None) -> dict[str, Any]:
    """Instability and L2 distance against the rewind point k (IMP-R / LMC).

    One dense run of the recipe saves the full state at every k and gives the reference trained network.
    For each k, two copies start from that state (times the mask, if one is given) and train to the end
    with the data-order seeds ``copy_seeds``; the test error along the line between their final weights
    gives the instability, and their prunable weights' L2 distance to the dense trained network (mean of
    the two copies) the distance. Writes ``stability.csv``, ``stability.md`` and ``stability.png``.
    """
    hp = job.stability
    folder = options.out / run_folder_name(job.kind, job.data, job.model, job.training, hp, seed=job.seed)
    desc = describe_run(job.kind, job.seed, data=job.data, model=job.model, training=job.training, stability=hp)
    results_path = folder / "results.json"
    done = reuse_finished(folder, desc, options)
    if done is not None:
        return done
    with folder_lock(folder):
        ctx = _Context(folder, job.kind, job.data, job.model, job.training, job.seed, options, callbacks)
        names = ctx.prunable_names()
        mask = None
        if hp.mask is not None:
            mask = Mask.load(hp.mask)
            mask.validate(ctx.build())
            names = list(mask)
        own_start = _load_start_state(hp.start_state, ctx.build()) if hp.start_state is not None else None
        ks = [(spec, ctx.step(spec)) for spec in hp.rewind_points]
        for spec, k in ks:
            ctx.check_before_end(k, "StabilityHparams.rewind_points: the rewind point")
        ddir = folder / "dense"

        def snapshot(spec: str, k: Step) -> Callback:
            path = ddir / f"rewind_{k.iteration}it.safetensors"
            return SnapshotCallback(k.iteration, lambda sd, p=path: save_tensors(p, sd))

        if not (ddir / "history.json").exists():
            _reuse_sibling_dense(folder, desc, [k.iteration for _, k in ks], options)
        dense = ctx.train_stage(stage="dense", directory=ddir, stem="model", start_state=ctx.build().state_dict(),
                                mask=None, recipe=job.training, desc="stability dense",
                                extra_callbacks=[snapshot(spec, k) for spec, k in ks])
        dense_state = load_tensors(ddir / "model.safetensors")
        rows = []
        for spec, k in ks:
            kdir = folder / _k_dirname(spec)
            result_path = kdir / "result.json"
            if result_path.exists():
                for i in range(2):
                    ctx.load_stage(kdir, f"copy_{i}")
                rows.append(read_json(result_path))
                continue
            if own_start is not None:
                start = own_start
            else:
                snap_path = ddir / f"rewind_{k.iteration}it.safetensors"
                if not snap_path.exists():
                    raise CheckpointError(f"{snap_path} is missing; delete {ddir} to train the dense network again")
                start = load_tensors(snap_path)
            if mask is not None:
                start = _masked_state(start, mask)
            finals = []
            for i, copy_seed in enumerate(hp.copy_seeds):
                ctx.train_stage(stage=f"{_k_dirname(spec)}_copy_{i}", directory=kdir, stem=f"copy_{i}",
                                start_state=start, mask=mask, recipe=job.training.replace(data_order_seed=copy_seed),
                                start=k.iteration, desc=f"k={spec} copy {i + 1}/2", tags={"rewind": spec})
                finals.append(load_tensors(kdir / f"copy_{i}.safetensors"))
            line = instability(ctx.build, finals[0], finals[1], ctx.evals["test"], hp.points, options.device)
            da, db = (l2_distance(f, dense_state, names) for f in finals)
            row = {
                "rewind": spec, "rewind_iteration": k.iteration, "rewind_epochs": k.epochs,
                "density": mask.density() if mask is not None else 1.0,
                "instability": line["instability"], "error_a": line["error_a"], "error_b": line["error_b"],
                "max_error": line["max_error"], "l2_to_dense": (da + db) / 2, "l2_to_dense_a": da,
                "l2_to_dense_b": db, "l2_between": l2_distance(finals[0], finals[1], names),
                "alphas": line["alphas"], "errors": line["errors"],
            }
            write_json(result_path, row)
            rows.append(row)
            log_line(options, f"stability k={spec}: instability {_pct(row['instability'])} "
                              f"(errors {_pct(row['error_a'])}, {_pct(row['error_b'])}, max {_pct(row['max_error'])}), "
                              f"L2 to dense {row['l2_to_dense']:.4f}")
        table_rows = [{k2: v for k2, v in r.items() if k2 not in ("alphas", "errors")} for r in rows]
        write_metrics_csv(folder / "stability.csv", table_rows)
        from lottery.io import atomic_write_bytes
        from lottery.report import format_table

        md = format_table(table_rows, STABILITY_COLUMNS, markdown=True)
        atomic_write_bytes(folder / "stability.md", (md + "\n").encode())
        plot_stability(table_rows, folder / "stability.png",
                       title=f"{job.model.model} on {job.data.dataset}" + (f", density {mask.density():.3f}" if mask is not None else ""))
        results = {
            "kind": job.kind, "model": job.model.model, "dataset": job.data.dataset, "seed": job.seed,
            "mask": hp.mask, "mask_density": mask.density() if mask is not None else 1.0, "points": hp.points,
            "start_state": hp.start_state,
            "dense_test_accuracy": (dense.get("last") or {}).get("test_accuracy"), "rows": rows,
            "stable_below": 0.02, "run_dir": str(folder),
        }
        write_results(results_path, results)
        write_metrics_csv(folder / "metrics.csv", ctx.rows)
    log_line(options, f"\nstability: {folder}\n" + format_table(table_rows, STABILITY_COLUMNS))
    return results


def _load_start_state(path: str, model) -> dict[str, Any]:
    """``StabilityHparams.start_state`` read and checked against the model before any training."""
    if not Path(path).is_file():
        raise ConfigError(f"StabilityHparams.start_state {path} does not exist; give a state file such as a "
                          "run's rewind.safetensors")
    try:
        state = load_tensors(path)
    except CheckpointError:
        raise ConfigError(f"StabilityHparams.start_state {path} is not a readable safetensors file; give a state "
                          "file such as a run's rewind.safetensors") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"StabilityHparams.start_state {path} does not fit the model: {e}") from None
    return state


def _reuse_sibling_dense(folder: Path, desc: dict[str, Any], iterations: Sequence[int],
                         options: RunOptions) -> None:
    """Start ``folder``'s dense stage from a finished sibling stability run's files, when one beside it
    (same data, model, training and seed; any mask or rewind points) saved every rewind state needed.

    Why: the dense run depends only on the recipe and the seed (its stage draws from a seed of its own), so
    analysing several masks of one recipe (tickets of CS and IMP at several densities) would otherwise
    train the same dense network again for each: 16 of the 48 epochs of a ticket's analysis at one k."""
    same = {key: desc[key] for key in ("data", "model", "training", "seed")}
    snaps = [f"dense/rewind_{it}it.safetensors" for it in iterations]
    files = [*snaps, "dense/model.safetensors", "dense/history.json"]
    for sibling in sorted(folder.parent.glob("stability_*")):
        if sibling == folder or not (sibling / "hparams.json").exists():
            continue
        try:
            other = read_json(sibling / "hparams.json")
        except (OSError, ValueError):
            continue
        if {key: other.get(key) for key in same} != same:
            continue
        if copy_finished_files(sibling, folder, files, last="dense/history.json"):
            log_line(options, f"stability dense: reused from {sibling} (same data, model, training and seed)")
            return


def plot_stability(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Instability (%) and L2 distance to the dense network against the rewind point k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["rewind_iteration"])
    xs = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.plot(xs, [100 * r["instability"] for r in rows], marker="o")
    ax1.axhline(2.0, color="gray", linestyle="--", label="stable below 2%")
    ax1.set_ylabel("instability (% test error)")
    ax2.plot(xs, [r["l2_to_dense"] for r in rows], marker="o", color="tab:orange")
    ax2.set_ylabel("L2 distance to dense")
    for ax in (ax1, ax2):
        ax.set_xticks(xs, [r["rewind"] for r in rows])
        ax.set_xlabel("rewind point k")
        ax.grid(True, alpha=0.3)
    ax1.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from lottery.io import save_figure

    save_figure(fig, Path(path), dpi=120)  # atomic: a kill while plotting leaves no truncated image
    plt.close(fig)
