"""The shared adapter core: rank-1 components in any model's linear layers."""

from .inject import (
    DEFAULT_TARGETS,
    ParameterCount,
    adapter_layers,
    count_parameters,
    default_targets,
    inject_adapters,
)
from .layer import InitMode, RankOneLinear

__all__ = [
    "DEFAULT_TARGETS",
    "InitMode",
    "ParameterCount",
    "RankOneLinear",
    "adapter_layers",
    "count_parameters",
    "default_targets",
    "inject_adapters",
]
