"""A study's objectives and the Pareto rule, re-exported from their home below study and report,
:mod:`dora_lab.plan.objectives`, so that ``from dora_lab.study.objectives import ...`` keeps working."""

from ..plan.objectives import (
    RUN_QUANTITIES,
    Objective,
    check_direction,
    check_objectives,
    dominates,
    is_multi,
    pareto_front,
    resolve,
    run_quantities,
    trial_values,
)

__all__ = ["RUN_QUANTITIES", "Objective", "check_direction", "check_objectives", "dominates", "is_multi",
           "pareto_front", "resolve", "run_quantities", "trial_values"]
