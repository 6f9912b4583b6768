"""K CS ticket searches as one stacked network in one process (issue 23).

Why: CS's tickets of different sparsities come from independent searches; on a CPU a LeNet search step
is a few small matrix products, so most of its time is per-step overhead (Python, the framework, two
optimizers, the temperature and penalty callbacks). K searches stacked (lottery.engine.stacking) pay that
overhead once per step for all K, compute every member's soft mask in one operation per layer, and share
the data batches.

Members of one stack share the model, the data, the data order (their seed, or
``TrainingHparams.data_order_seed``, which their hparams then state), the training recipe and CS's round
structure (rounds, round length and milestones, temperature schedule, beta_final, rewind point, logit
optimizer); they may differ in ``s0``, ``lam`` and the seed of the initialisation. Each member gets its own
logits, its own ``s0`` (scale and reset cap: :func:`lottery.masking.set_member_s0`) and its own ``lam``; the
temperature schedule is the same for all. The tickets (each member's hard mask on its own rewound
weights) are retrained as a second stack.

Every member's run folder is the one ``lottery search cs`` writes (hparams.json, rewind.safetensors,
round_*/state.safetensors and history.json, mask.safetensors, mask.json, ticket/model.safetensors,
metrics.csv, results.json), so reports, reuse and resume read it as they read an unstacked run. Stacks
keep no mid-round checkpoint: members of a killed stack resume as a stack from their last finished round
(members with different finished rounds, a written mask or an unstacked run's checkpoint finish unstacked,
by :func:`lottery.pipelines.cs.run_cs`).

Not stacked (one line in the log, then the members run one by one): CS pruning (``prune`` mode), target
densities (``--density``), ``--strict``, networks :func:`lottery.engine.stacking.stack` refuses.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lottery import masking
from lottery.engine import Callback
from lottery.errors import NumericalError
from lottery.engine.stacking import (
    StackedModel, StackedTrainer, StackingError, _member_slice, _stack_tensors, evaluate_stacked, stack,
    unstack_state,
)
from lottery.experiment import (
    DenseJob, RunOptions, StackedMetricsCSV, build_model, data_order_of, describe_run, final_row, folder_lock,
    load_data, log_line, make_loaders, prune_ignore, reuse_finished, run_folder_name, train_dense, write_metrics_csv,
    write_results,
)
from lottery.io import load_tensors, read_json, save_tensors, write_json
from lottery.masks import Mask
from lottery.methods.cs import EnforceMaskCallback, TemperatureCallback, make_search_optimizers
from lottery.methods.cs_convergence import round_convergence
from lottery.pipelines.cs import (
    CSJob, _check_rewind_fits, _log_plan, _report_convergence, _results_record, _retrain_ticket, _save_final_mask,
    run_cs,
)
from lottery.step import Step

_LOGITS = "_mask_logits"


def stack_key(job: CSJob) -> tuple:
    """What the members of one stack share: everything but ``s0``, ``lam`` and the initialisation seed
    (the data order, which the seed gives unless ``data_order_seed`` is set, is part of it)."""
    shared_cs = job.cs.replace(s0=None, lam=0.0) if job.cs.density is None else job.cs
    return (job.kind, job.data, job.model, job.training, shared_cs, job.dense_reference,
            data_order_of(job.training, job.seed))


def stack_refusal(jobs: Sequence[CSJob], options: RunOptions) -> str | None:
    """Why CS ``jobs`` cannot search as one stack (one line), or None."""
    if any(j.mode != "ticket" for j in jobs):
        return "CS pruning (prune mode) is not stacked; only ticket searches are"
    if any(j.cs.density is not None for j in jobs):
        return "searches with a target density (--density) are not stacked"
    if options.strict:
        return "--strict stops a search at its round's end, which a stack cannot do for one member"
    if len({stack_key(j) for j in jobs}) > 1:
        if len({data_order_of(j.training, j.seed) for j in jobs}) > 1:
            return ("the members do not share one data order: set TrainingHparams.data_order_seed "
                    "(--data-order-seed) to stack searches of different seeds")
        return "the members differ in more than s0, lam and seed"
    if len({(j.cs.s0, j.cs.lam, j.seed) for j in jobs}) < len(jobs):
        return "two members have the same s0, lam and seed"
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _finished_rounds(folder: Path, rounds: int) -> int | None:
    """How many search rounds of ``folder`` are finished (0: start from scratch), or None when the run
    can only go on unstacked: its mask is written (only the ticket is left), or an unstacked run left a
    mid-round checkpoint (which run_cs resumes from). Why: members resume as a stack from a common round."""
    if (folder / "mask.safetensors").exists() or any(folder.glob("round_*/checkpoint.safetensors")):
        return None
    n = 0
    while n < rounds and (folder / f"round_{n}" / "state.safetensors").exists():
        n += 1
    if n and not (folder / "rewind.safetensors").exists():
        return None
    return n


def run_cs_stacked(jobs: Sequence[CSJob], options: RunOptions, *, raise_errors: bool = True,
                   fallback: bool = True) -> list[Any]:
    """Run CS ticket searches that differ only in ``s0``, ``lam`` and seed as one stacked network,
    writing each member's run folder as :func:`lottery.pipelines.cs.run_cs` does. Finished members are
    reused; members the stack cannot take (see the module docstring) run through ``run_cs``.

    Returns each job's results, in order. ``raise_errors=False``: a member that fails (a mask keeping no
    weight, say) gets its exception in its place and the others go on; otherwise the first is raised once
    every member has finished. ``fallback=False`` (a sweep, which has workers for them): members that would
    run unstacked are left out, ``None`` in their place."""
    jobs = list(jobs)
    folders = [options.out / run_folder_name(j.kind, j.data, j.model, j.training, j.cs, seed=j.seed) for j in jobs]
    out: list[Any] = [None] * len(jobs)
    for i, (job, folder) in enumerate(zip(jobs, folders)):
        desc = describe_run(job.kind, job.seed, data=job.data, model=job.model, training=job.training, cs=job.cs)
        out[i] = reuse_finished(folder, desc, options)
    pending = [i for i, r in enumerate(out) if r is None]
    why = stack_refusal([jobs[i] for i in pending], options) if len(pending) > 1 else None
    if why is not None:
        log_line(options, f"stacking refused: {why}; running the {len(pending)} searches one by one")
        pending = []
    # Members resume together only from the same finished round; the others finish unstacked.
    by_round: dict[int | None, list[int]] = {}
    for i in pending:
        by_round.setdefault(_finished_rounds(folders[i], jobs[i].cs.rounds), []).append(i)
    alone = [i for i in range(len(jobs)) if out[i] is None and i not in pending]
    groups = []
    for n, group in by_round.items():
        if n is None or len(group) < 2:
            if n != 0:
                log_line(options, f"stack: {len(group)} CS search(es) with {'a finished search' if n is None else f'{n} finished round(s)'} "
                                  "on disk finish unstacked")
            alone += group
        else:
            groups.append((n, group))
    for n, group in groups:
        try:
            prep = _prepare(jobs, group, options)
        except StackingError as e:
            log_line(options, f"stacking refused: {e}; running the {len(group)} searches one by one")
            alone += group
            continue
        if n:
            log_line(options, f"stack: {len(group)} CS searches resume as a stack after round {n}")
        try:
            with ExitStack() as locks:
                for i in group:
                    locks.enter_context(folder_lock(folders[i]))
                for i, r in zip(group, _search_stack([jobs[i] for i in group], [folders[i] for i in group], prep,
                                                     options, start_round=n)):
                    out[i] = r
        except NumericalError as e:
            # One member's loss or weights became non-finite: the stack stops for all. Alone, each member goes
            # on from its last finished round and only the one that diverges fails, as it would unstacked.
            log_line(options, f"stack: {_one_line(e)}; the {len(group)} searches finish unstacked")
            alone += group
    return finish_members(out, alone if fallback else [], lambda i: run_cs(jobs[i], options), raise_errors)


def finish_members(out: list[Any], alone: Sequence[int], run_alone: Callable[[int], Any],
                   raise_errors: bool) -> list[Any]:
    """The end of a stacked run (CS here, IMP in lottery.pipelines.imp_stacked): members ``alone`` run
    unstacked (``run_alone(i)``), each failure kept in its member's place so the others' results stand;
    with ``raise_errors`` the first failure is then raised. Returns ``out``."""
    for i in sorted(alone):
        try:
            out[i] = run_alone(i)
        except Exception as e:  # noqa: BLE001  (kept per member; raised below when asked)
            out[i] = e
    if raise_errors:
        for r in out:
            if isinstance(r, BaseException):
                raise r
    return out


def _prepare(jobs: list[CSJob], group: list[int], options: RunOptions) -> dict[str, Any]:
    """Check, before anything is written, that the members stack: data, dense references, the stacked net."""
    first = jobs[group[0]]
    bundle = load_data(first.data, options)
    train_loader, evals = make_loaders(bundle, first.training, first.seed, options)
    ipe = len(train_loader)
    k = _check_rewind_fits(first, ipe)
    models = [build_model(jobs[i].model, bundle, jobs[i].seed) for i in group]
    stacked = stack(models)  # refuses (StackingError) a network it cannot stack
    _log_plan(first, options, ipe, k)
    log_line(options, f"stack: {len(group)} CS searches as one network; they share the data order "
                      f"(seed {data_order_of(first.training, first.seed)})")
    dense: dict[Any, dict[str, Any]] = {}
    if first.dense_reference:
        for i in group:
            key = (jobs[i].seed,)
            if key not in dense:
                dense[key] = train_dense(DenseJob(jobs[i].data, jobs[i].model, jobs[i].training, seed=jobs[i].seed),
                                         options, wait_for_lock=True)
    return {"bundle": bundle, "train_loader": train_loader, "evals": evals, "ipe": ipe, "k": k, "stacked": stacked,
            "dense": [dense.get((jobs[i].seed,)) for i in group]}


# -- callbacks of the stacked search -------------------------------------------------------------------
class StackedPenaltyCallback(Callback):
    """Each member's ``lam_k * sum(m_k)`` (or its ``mean`` form): one value per member, so that each
    member's logits get their own penalty's gradient; reports beta, hard density and penalty per member."""

    def __init__(self, lams: Sequence[float], mode: str, temperature_cb: TemperatureCallback, round_index: int,
                 k: int):
        self.lams = torch.tensor([float(v) for v in lams])
        self.mode = mode
        self.temperature_cb = temperature_cb
        self.round_index = round_index
        self.k = k
        self.last_penalty = torch.zeros(k)

    def extra_loss(self, trainer) -> torch.Tensor:
        values = masking.soft_mask_values(trainer.model, reuse_forward=True)
        total = sum(v.reshape(self.k, -1).sum(1) for v in values.values())
        if self.mode == "mean":
            total = total / (sum(v.numel() for v in values.values()) // self.k)
        if self.lams.device != total.device:
            self.lams = self.lams.to(total.device)
        p = self.lams * total
        self.last_penalty = p.detach()
        return p

    def on_evaluate(self, trainer, summary: dict[str, Any]) -> None:
        kept = torch.zeros(self.k, dtype=torch.int64)
        count = 0
        for logits in masking.mask_logits(trainer.model).values():
            kept += (logits.detach() > 0).reshape(self.k, -1).sum(1).cpu()
            count += logits.numel() // self.k
        beta = float(getattr(self.temperature_cb, "beta", 1.0))
        penalties = self.last_penalty.tolist()
        for i, row in enumerate(summary["members"]):
            row.update({"round": self.round_index, "beta": beta, "density": int(kept[i]) / count,
                        "penalty": float(penalties[i])})


class _StackedSnapshot(Callback):
    """The rewind point of every member (raw weights and buffers, logits dropped) at one iteration."""

    def __init__(self, iteration: int, paths: list[Path]):
        self.iteration = iteration
        self.paths = paths

    def _take(self, trainer) -> None:
        for i, path in enumerate(self.paths):
            save_tensors(path, unstack_state(trainer.model, i))

    def on_fit_start(self, trainer) -> None:
        if trainer.iteration == self.iteration:
            self._take(trainer)

    def on_step_end(self, trainer) -> None:
        if trainer.iteration == self.iteration:
            self._take(trainer)


# -- members' views ------------------------------------------------------------------------------------
def member_state(stacked: StackedModel, i: int) -> dict[str, torch.Tensor]:
    """Member ``i``'s state dict as its unstacked soft-masked model has it: weights, buffers and
    ``*_mask_logits`` (a logit tensor splits as its weight does), in the same key order."""
    state = stacked.body.state_dict()
    out = {}
    for key, value in state.items():
        base = _weight_of(key)
        if base not in stacked.layout:
            continue  # (a key no member has)
        out[key] = _member_slice(value, stacked.layout[base], i, stacked.k).detach().clone()
    return out


def _weight_of(key: str) -> str:
    """The state key whose layout a key follows: a weight's mask logits split as the weight does."""
    return key[: -len(_LOGITS)] if key.endswith(_LOGITS) else key


def _member_mask(stacked: StackedModel, i: int) -> Mask:
    return Mask({name: _member_slice(logits.detach(), stacked.layout[name], i, stacked.k).gt(0).cpu()
                 for name, logits in masking.mask_logits(stacked.body).items()})


def _soft_member(job: CSJob, bundle, names: list[str], state: dict[str, torch.Tensor], beta: float, device):
    """Member ``job``'s unstacked soft-masked network with ``state``: what round_convergence measures."""
    model = build_model(job.model, bundle, job.seed)
    masking.attach_soft_mask(model, names, s0=job.cs.initial_logit, scale_by_s0=job.cs.scale_by_s0)
    model.load_state_dict(state)
    masking.set_temperature(model, beta)
    return model.to(device)


def _stacked_soft_and_hard_accuracy(stacked: StackedModel, loader, device, beta: float) -> list[tuple[float, float, int]]:
    """:func:`lottery.methods.cs_convergence.soft_and_hard_accuracy` of every member, two passes for all."""
    before = masking.get_temperature(stacked.body)
    masking.set_temperature(stacked.body, beta)
    try:
        soft = evaluate_stacked(stacked, loader, device)
        with masking.hardened_soft_masks(stacked.body):
            hard = evaluate_stacked(stacked, loader, device)
    finally:
        if before is not None:
            masking.set_temperature(stacked.body, before)
    return [(float(s["top1"]), float(h["top1"]), int(s["count"])) for s, h in zip(soft, hard)]


# -- the search and the tickets --------------------------------------------------------------------------
def _search_stack(jobs: list[CSJob], folders: list[Path], prep: dict[str, Any], options: RunOptions,
                  start_round: int = 0) -> list[Any]:
    first = jobs[0]
    cs = first.cs
    K = len(jobs)
    bundle, train_loader, evals, ipe, k = (prep[n] for n in ("bundle", "train_loader", "evals", "ipe", "k"))
    stacked: StackedModel = prep["stacked"]
    device = options.device
    names = list(masking.prunable_weights(build_model(first.model, bundle, first.seed), ignore=prune_ignore(first.model)))
    s0s = [j.cs.initial_logit for j in jobs]
    shapes = {n: _member_slice(p, stacked.layout[n], 0, K).shape for n, p in stacked.body.named_parameters()}
    init = {n: _stack_tensors([torch.full(shapes[n], s0) for s0 in s0s], stacked.layout[n]) for n in names}
    masking.attach_soft_mask(stacked.body, init, s0=0.0, scale_by_s0=cs.scale_by_s0)
    masking.set_member_s0(stacked.body, s0s)
    stacked.to(device)

    round_recipe = cs.round_recipe(first.training)
    round_iterations = Step.parse(round_recipe.training_steps, ipe).iteration
    conv_loader = evals.get("val", evals["test"])
    rows: list[list[dict[str, Any]]] = [[] for _ in range(K)]
    convergence: list[list[dict[str, Any]]] = [[] for _ in range(K)]
    walls = [0.0] * K  # each member's share of the training time
    if start_round:  # resume: the members' states at the end of the last finished round, and its records
        states = [load_tensors(f / f"round_{start_round - 1}" / "state.safetensors") for f in folders]
        stacked.body.load_state_dict({key: _stack_tensors([st[key] for st in states], stacked.layout[_weight_of(key)])
                                      for key in states[0]})
        for i, (job, folder) in enumerate(zip(jobs, folders)):
            for r in range(start_round):
                done = read_json(folder / f"round_{r}" / "history.json")
                rows[i] += done["rows"]
                walls[i] += done["wall_seconds"]
                if done.get("convergence") is not None:
                    convergence[i].append(done["convergence"])
                    _report_convergence(done["convergence"], r, job.cs, options)
    previous = [_member_mask(stacked, i) for i in range(K)]
    wall = 0.0  # the stack's training time in this call
    for r in range(start_round, cs.rounds):
        if r > 0:
            masking.cs_reset_logits_(stacked.body, cs.beta_final)  # each member's own s0 caps its logits
        for f in folders:
            (f / f"round_{r}").mkdir(parents=True, exist_ok=True)
        t = TemperatureCallback(cs)
        callbacks: list[Callback] = [t, StackedPenaltyCallback([j.cs.lam for j in jobs], cs.penalty, t, r, K)]
        if r == 0:
            callbacks.append(_StackedSnapshot(k.iteration, [f / "rewind.safetensors" for f in folders]))
        callbacks.append(StackedMetricsCSV([f / "metrics.csv" for f in folders], options.tensorboard, rows, f"round_{r}"))
        trainer = StackedTrainer(
            stacked, train_loader, round_recipe,
            optimizers=make_search_optimizers(stacked, round_recipe, cs, round_iterations),
            eval_loaders=evals, callbacks=callbacks, device=device, progress=options.progress,
            desc=f"cs round {r + 1}/{cs.rounds}", log=options.log,
        )
        trainer.fit()
        wall += trainer.wall_seconds
        walls = [w + trainer.wall_seconds / K for w in walls]
        beta = masking.get_temperature(stacked.body)
        accuracies = _stacked_soft_and_hard_accuracy(stacked, conv_loader, device, cs.beta_final)
        for i, (job, folder) in enumerate(zip(jobs, folders)):
            state = member_state(stacked, i)
            member = _soft_member(job, bundle, names, state, beta, "cpu")
            conv = round_convergence(member, conv_loader, device, cs.beta_final, previous[i], accuracies[i])
            history = [{"stage": f"round_{r}", **row} for row in trainer.member_histories[i]]
            if history:
                history[-1].update({"undecided": conv["undecided"], "soft_val_accuracy": conv["soft_val_accuracy"],
                                    "hard_val_accuracy": conv["hard_val_accuracy"], "flips": conv["flips"]})
            rdir = folder / f"round_{r}"
            write_json(rdir / "history.json", {"rows": history, "wall_seconds": trainer.wall_seconds / K,
                                               "convergence": conv, "density_shift": 0.0,
                                               "stack": {"size": K, "wall_seconds": trainer.wall_seconds}})
            write_metrics_csv(folder / "metrics.csv", rows[i] + history)
            save_tensors(rdir / "state.safetensors", state)
            rows[i] += history
            convergence[i].append(conv)
            previous[i] = masking.hard_mask_from_logits(member)
            _report_convergence(conv, r, job.cs, options)
    search_epochs = cs.rounds * Step.parse(round_recipe.training_steps, ipe).epochs

    # -- each member's mask; the tickets as a second stack ------------------------------------------------
    out: list[Any] = [None] * K
    masks: list[Mask | None] = [None] * K
    for i, (job, folder) in enumerate(zip(jobs, folders)):
        try:
            masks[i] = _save_final_mask(_member_mask(stacked, i), folder, job.cs, s0s[i], options)
        except Exception as e:  # noqa: BLE001  (this member fails; the others go on)
            out[i] = e
    ok = [i for i in range(K) if masks[i] is not None]
    tickets = _retrain_tickets([jobs[i] for i in ok], [folders[i] for i in ok], [masks[i] for i in ok],
                               [rows[i] for i in ok], prep, options)
    epochs = search_epochs + (Step.parse(first.training.training_steps, ipe).iteration - k.iteration) / ipe
    for i, result in zip(ok, tickets):
        job, folder = jobs[i], folders[i]
        member = _soft_member(job, bundle, names, member_state(stacked, i), 1.0, "cpu")
        results = _results_record(job, folder, s0s[i], convergence[i], [0.0] * cs.rounds, masks[i], result,
                                  search_epochs, epochs, walls[i], prep["dense"][i], member, bundle.input_shape)
        # the members shared the data order: say which (it is also the hparams' data_order_seed, or the seed)
        results["stack"] = {"size": K, "search_wall_seconds": wall, "data_order": data_order_of(job.training, job.seed),
                            "ticket_stack_size": result.get("ticket_stack_size", 1)}
        results.pop("ticket_stack_size", None)
        write_results(folder / "results.json", results)
        out[i] = results
    return out


def _retrain_tickets(jobs: list[CSJob], folders: list[Path], masks: list[Mask], rows: list[list[dict[str, Any]]],
                     prep: dict[str, Any], options: RunOptions) -> list[dict[str, Any]]:
    """Each member's hard mask on its own rewound weights, retrained from k as one stack (one member: alone,
    as run_cs does). Writes ticket/model.safetensors and the ticket rows of metrics.csv."""
    bundle, train_loader, evals, k = (prep[n] for n in ("bundle", "train_loader", "evals", "k"))
    if not jobs:
        return []
    if len(jobs) == 1:
        return [_retrain_ticket(jobs[0], options, folders[0], bundle, train_loader, evals, masks[0], k, rows[0])]
    models = []
    for job, folder in zip(jobs, folders):
        model = build_model(job.model, bundle, job.seed)
        model.load_state_dict(load_tensors(folder / "rewind.safetensors"))
        models.append(model)
    stacked = stack(models)
    K = len(jobs)
    masking.attach_hard_mask(stacked.body, Mask({n: _stack_tensors([m[n] for m in masks], stacked.layout[n])
                                                 for n in masks[0]}))
    for folder in folders:
        (folder / "ticket").mkdir(exist_ok=True)
    trainer = StackedTrainer(
        stacked, train_loader, jobs[0].training, eval_loaders=evals, device=options.device, start=k.iteration,
        callbacks=[EnforceMaskCallback(),
                   StackedMetricsCSV([f / "metrics.csv" for f in folders], options.tensorboard, rows, "ticket")],
        progress=options.progress, desc="ticket", log=options.log,
    )
    trainer.fit()
    out = []
    for i, (folder, mask) in enumerate(zip(folders, masks)):
        state = unstack_state(stacked, i)
        if any(bool(state[n][~mask[n].to(state[n].device)].any()) for n in mask):
            raise AssertionError("a stacked ticket's pruned weights moved during retraining")  # an internal invariant
        save_tensors(folder / "ticket" / "model.safetensors", state)
        last = final_row(trainer.member_histories[i]) or {}
        out.append({"test_accuracy": last.get("test_accuracy"), "val_accuracy": last.get("val_accuracy"),
                    "stage_wall_seconds": trainer.wall_seconds / K, "ticket_stack_size": K})
    return out


__all__ = ["StackedPenaltyCallback", "member_state", "run_cs_stacked", "stack_key", "stack_refusal"]
