"""The shared adapter core: rank-1 components in any model's linear layers."""

from .inject import (
    ALL_LINEAR,
    DEFAULT_TARGETS,
    ParameterCount,
    adapter_layers,
    all_linear_targets,
    count_parameters,
    default_targets,
    inject_adapters,
    linear_module_names,
)
from .layer import LINEAR_TYPES, InitMode, RankOneLinear, linear_features

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGETS",
    "LINEAR_TYPES",
    "InitMode",
    "ParameterCount",
    "RankOneLinear",
    "adapter_layers",
    "all_linear_targets",
    "count_parameters",
    "default_targets",
    "inject_adapters",
    "linear_features",
    "linear_module_names",
]
