"""Running a ``study.seeds`` study (:mod:`.seed_option`): the pilot, the plan, then the planned seeds.

A fixed number of seeds from a pilot (Stein's two-stage rule, :mod:`dora_lab.track.seed_plan`):

1. **Pilot**: the grid holds seeds ``0 .. pilot-1`` of every arm (the grid over the other searched
   keys); :func:`stages` yields once for the runner to run them (here or on ``--workers``).
2. **Plan**, once every pilot point holds a finished trial: for each arm its paired differences
   with the reference arm over the pilot seeds both completed, their sd ``s_i`` and Stein's
   ``N_i``; ``N`` is the largest (at least the pilot, at most ``max``).  The plan is stored in the
   study's user attrs (:data:`PLAN_ATTR`) under the storage's lock, so every process (workers, other
   machines, a resumed study) uses the one plan made first, and it never changes afterwards.
3. **Second stage**: the grid holds seeds ``0 .. N-1``; :func:`stages` yields again and the grid
   runs the free points, i.e. seeds ``pilot .. N-1`` of every arm.

Resume-safe by the grid's own rule (:mod:`.grid`): a point held by a trial never runs again, so a
restarted study adds no seed twice.  The seed is searched as one int range ``0 .. max-1`` (Optuna
refuses a categorical whose choices change within a study); which seeds the grid holds is
:meth:`~.seed_option.SeedsOption.running`.  A process that finds pilot trials of other processes
still running waits for them (their heartbeats fail a dead one's trial, whose point then runs again
here).  Only COMPLETE trials count; a pilot trial that failed leaves its pair out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import optuna

from ..plan.setup import StudySetup
from ..plan.space import StudyConfig
from ..track.locks import store_lock
from ..track.seed_plan import common_plan
from .grid import fail_stale, trials_to_run

__all__ = ["PLAN_ATTR", "arm_values", "make_plan", "run_stages", "stages", "use_plan"]

#: the study user attr holding the plan (JSON): made once, when the pilot is complete
PLAN_ATTR = "dora_lab.seed_plan"
POLL_SECONDS = 5.0


def use_plan(config: StudyConfig, study: optuna.Study) -> dict[str, Any] | None:
    """Let ``config``'s grid hold the stored plan's seeds, or the pilot's before there is a plan;
    the plan (``None``: no ``study.seeds``, or no plan yet)."""
    if config.seeds is None:
        return None
    plan = study.user_attrs.get(PLAN_ATTR)
    config.seeds.hold(int(plan["n"]) if plan else config.seeds.pilot)
    return plan


def _arm_keys(config: StudyConfig) -> list[str]:
    assert config.seeds is not None
    return sorted(k for k in config.space if k != config.seeds.key)


def arm_values(config: StudyConfig, trials: Sequence[optuna.trial.FrozenTrial]) -> dict[tuple[Any, ...], dict[int, float]]:
    """arm (the values of the other searched keys, sorted by key) -> seed -> the COMPLETE trial's
    value (the first objective of a multi-objective study)."""
    assert config.seeds is not None
    keys, out = _arm_keys(config), {}  # type: ignore[var-annotated]
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE and t.values:
            out.setdefault(tuple(t.params.get(k) for k in keys), {})[int(t.params[config.seeds.key])] = float(t.values[0])
    return out


def _label(keys: Sequence[str], arm: Sequence[Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, arm, strict=True))


def make_plan(config: StudyConfig, trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, Any]:
    """Stein's plan from the pilot seeds' paired differences of every arm against the reference arm
    (:func:`~dora_lab.track.seed_plan.common_plan`), as plain JSON."""
    seeds = config.seeds
    assert seeds is not None
    keys, values = _arm_keys(config), arm_values(config, trials)
    ref = tuple(seeds.reference[k] for k in keys)
    pilots = {}
    for arm, by_seed in sorted(values.items(), key=lambda kv: str(kv[0])):
        if arm != ref:
            common = [s for s in sorted(by_seed) if s < seeds.pilot and s in values.get(ref, {})]
            pilots[_label(keys, arm)] = [by_seed[s] - values[ref][s] for s in common]
    n, plans = common_plan(pilots, seeds.pilot, seeds.half_width, seeds.max)
    return {"rule": "stein", "pilot": seeds.pilot, "half_width": seeds.half_width, "max": seeds.max, "n": n,
            "capped": any(p.capped for p in plans.values()), "reference": _label(keys, ref),
            "comparisons": {k: {"pairs": p.n0, "pilot_sd": p.s0, "half_width": p.half_width, "capped": p.capped}
                            for k, p in plans.items()},
            "unplanned": [k for k in pilots if k not in plans]}


def _pilot_left(config: StudyConfig, study: optuna.Study) -> tuple[int, int]:
    """(pilot points no trial holds, trials still running), the grid at the pilot.  A WAITING trial
    (a queue entry a killed process left) holds its point but is not waited for: it may never run."""
    assert config.seeds is not None
    config.seeds.hold(config.seeds.pilot)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return trials_to_run(config.model_copy(update={"n_trials": None}), study) or 0, len(running)


def _ensure_plan(setup: StudySetup, study: optuna.Study) -> dict[str, Any] | None:
    """The stored plan; else, when every pilot point holds a finished trial, the plan made and
    stored now (under the storage's lock: the first process to get there makes it)."""
    with store_lock(setup.storage, f"optuna:{study.study_name}"):
        plan = study.user_attrs.get(PLAN_ATTR)
        if plan is None and _pilot_left(setup.study, study) == (0, 0):
            plan = make_plan(setup.study, study.get_trials(deepcopy=False))
            study.set_user_attr(PLAN_ATTR, plan)
    return plan


def describe(plan: Mapping[str, Any]) -> str:
    """The plan in a few lines (printed when it is made; the report states it too)."""
    lines = [f"seed plan (study.seeds, Stein's two-stage rule): pilot {plan['pilot']} seeds, target half-width "
             f"{plan['half_width']:g} -> {plan['n']} seeds per arm"
             + (f" (the cap study.seeds.max = {plan['max']} binds: some intervals stay wider)" if plan["capped"] else "")]
    for name, c in plan["comparisons"].items():
        lines.append(f"  {name} vs {plan['reference']}: {c['pairs']} pilot pairs, sd {c['pilot_sd']:.4g}, half-width "
                     f"at {plan['n']} seeds {c['half_width']:.4g}" + (" (capped)" if c["capped"] else ""))
    lines += [f"  {name} vs {plan['reference']}: fewer than 2 pilot pairs completed; not planned"
              for name in plan["unplanned"]]
    return "\n".join(lines)


def stages(setup: StudySetup, study: optuna.Study, reopen: Callable[[], optuna.Study]) -> Iterator[optuna.Study]:
    """Yield the study once per stage for the runner to run the grid's free points: once without
    ``study.seeds``; else the pilot (until it is complete) and then the planned seeds.  Returns early
    when the pilot still has free points after its stage (``study.n_trials`` reached, or a data or
    model error stopped it): the next start of the study continues.  ``reopen``: the study afresh."""
    seeds = setup.study.seeds
    if seeds is None:
        yield study
        return
    while (plan := _ensure_plan(setup, study)) is None:
        yield study  # the pilot (the grid holds seeds 0 .. pilot-1)
        study = reopen()
        free, running = _pilot_left(setup.study, study)
        if free:  # study.n_trials reached, or a data or model error stopped the stage
            return
        while running and not free:  # other processes' pilot trials: wait for them (or for their heartbeats;
            print(f"waiting for {running} pilot trial(s) of other processes before planning the seeds", flush=True)
            time.sleep(POLL_SECONDS)  # a dead one's point is free again and runs in the next pilot stage)
            fail_stale(study)
            free, running = _pilot_left(setup.study, study)
    use_plan(setup.study, study)
    print(describe(plan), flush=True)
    yield study


Stop = TypeVar("Stop")


def run_stages(setup: StudySetup, study: optuna.Study, reopen: Callable[[], optuna.Study],
               run: Callable[[optuna.Study], tuple[Stop | None, bool]]) -> tuple[Stop | None, bool]:
    """``run`` each stage of :func:`stages` (it returns the stop that ended it, if any, and whether a
    worker failed) until one is stopped or failed; what the last stage run returned."""
    result: tuple[Stop | None, bool] = (None, False)
    for stage in stages(setup, study, reopen):
        result = run(stage)
        if result[0] is not None or result[1]:
            break
    return result
