"""The run's allocation method, built once (issue 26).

Checking a config builds its method: the constructor is what refuses a bad ``method.params`` value,
and the refusal must come before any work.  The run's controller then takes that same object
(:func:`dora_lab.run.config.build_controller`) instead of building a second one.  The object is
kept beside the config's ``method`` block, not inside it (a config compares and copies as plain
data), and handed out once: a second controller for the same block, a block changed since its
check, or a method already bound to a controller gets a freshly built one.
"""

from __future__ import annotations

import json
import weakref
from typing import Any, Protocol

from ..core.methods import AllocationMethod, make_method

__all__ = ["check_method", "take_method"]


class MethodBlock(Protocol):
    """A config's ``method`` block (:class:`~dora_lab.run.config.MethodConfig`)."""

    name: str
    params: dict[str, Any]


#: id(block) -> (the block as it was checked, the method built then); an entry goes with its block
_CHECKED: dict[int, tuple[str, AllocationMethod]] = {}


def _as_checked(block: MethodBlock) -> str:
    return json.dumps([block.name, block.params], sort_keys=True, default=repr)


def check_method(block: MethodBlock) -> AllocationMethod:
    """Build ``block``'s method (its errors are the config's) and keep it for :func:`take_method`."""
    method = make_method(block.name, **block.params)
    key = id(block)
    if key not in _CHECKED:
        weakref.finalize(block, _CHECKED.pop, key, None)
    _CHECKED[key] = (_as_checked(block), method)
    return method


def take_method(block: MethodBlock) -> AllocationMethod:
    """The method :func:`check_method` built for ``block``, once; else (taken, changed or bound
    since) a new one."""
    checked, method = _CHECKED.pop(id(block), ("", None))
    if method is None or checked != _as_checked(block) or "ctx" in vars(method):
        return make_method(block.name, **block.params)
    return method
