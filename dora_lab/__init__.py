"""dora_lab: dynamic-rank LoRA (DoRA, Mao et al. 2024) for ablations of scorers and schedules.

The adapter core (:mod:`dora_lab.core.adapter`) knows nothing of scorers or schedules; scorers
(:mod:`dora_lab.core.scorers`, built-ins in ``dora_lab.metrics``, the folder ``metrics/``) and schedules
(:mod:`dora_lab.core.schedules`) are looked up by name in registries, and the
:class:`~dora_lab.core.controller.PruningController` joins them.
"""

# ruff: noqa: E402  (the imports below come after apply_env_defaults())
# Before torch is imported: OpenMP reads its waiting policy once, when torch loads it (threads.py).
from .run.threads import apply_env_defaults

apply_env_defaults()

from .core.adapter import (
    ParameterCount,
    RankOneLinear,
    adapter_layers,
    count_parameters,
    default_targets,
    inject_adapters,
)
from .core.context import MethodContext, Pool
from .core.controller import PruningController, StepInfo
from .core.methods import AllocationMethod, get_method, list_methods, make_method, register_method
from .core.registry import RegistryError, import_plugins
from .core.regularizers import get_regularizer, list_regularizers, register_regularizer
from .core.schedules import BudgetSchedule, get_schedule, list_schedules, register_schedule
from .core.scorers import Scorer, get_scorer, list_scorers, make_scorer, register_scorer
from .core.version import __version__ as __version__  # the one home of the version (re-exported)
from .run.tasks import TaskSpec, get_task, instruction_task, list_tasks, prompt_task, register_task

__all__ = [
    "AllocationMethod",
    "BudgetSchedule",
    "MethodContext",
    "ParameterCount",
    "Pool",
    "PruningController",
    "RankOneLinear",
    "RegistryError",
    "Scorer",
    "StepInfo",
    "TaskSpec",
    "adapter_layers",
    "count_parameters",
    "default_targets",
    "get_method",
    "get_regularizer",
    "get_schedule",
    "get_scorer",
    "get_task",
    "import_plugins",
    "inject_adapters",
    "list_methods",
    "instruction_task",
    "list_regularizers",
    "list_schedules",
    "list_scorers",
    "list_tasks",
    "make_method",
    "make_scorer",
    "register_method",
    "prompt_task",
    "register_regularizer",
    "register_schedule",
    "register_scorer",
    "register_task",
]
