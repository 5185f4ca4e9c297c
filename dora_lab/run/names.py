"""Names that become folders and MLflow filter values: checked once, at config time.

A study's name is a folder (``<output_dir>/studies/<name>/``, ``<output_dir>/report/<name>/``) and,
with the experiment's name, a value in MLflow's search filters and the experiment's artifact folder.
A name with ``/`` or ``..`` would put those folders outside ``output_dir``, an absolute one anywhere,
and a 300-character one fails with ``File name too long`` after the stores exist.  So a name is one
path component of at most :data:`MAX_NAME` characters from a small set: ASCII letters, digits, and
``_ . - + '`` and spaces inside (``o'brien's study`` is fine: MLflow filters quote it, see
:func:`dora_lab.track.links.filter_value`).
"""

from __future__ import annotations

import re

from .config_yaml import ConfigError

__all__ = ["MAX_NAME", "check_name"]

MAX_NAME = 100
_SAFE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.+' -]*[A-Za-z0-9_+'])?")  # fullmatch; no trailing dot or space


def check_name(key: str, value: str) -> str:
    """``value`` if it is a safe name (see the module docstring), else :class:`ConfigError` naming
    ``key``, what is wrong and a name that would do."""
    if len(value) > MAX_NAME:
        raise ConfigError(f"{key}: {value[:40]!r}... is {len(value)} characters; a name becomes a folder and may "
                          f"have at most {MAX_NAME}: set {key} to a shorter name")
    if not _SAFE.fullmatch(value):
        fixed = re.sub(r"[^A-Za-z0-9_.+' -]+", "_", value).strip(" ._-+'")
        example = f", e.g. to {fixed!r}" if _SAFE.fullmatch(fixed) else ""
        raise ConfigError(f"{key}: {value!r} cannot be a name: a name becomes a folder under output_dir, so it "
                          f"may hold only letters, digits, '_', '.', '-', '+', \"'\" and spaces inside (no '/', "
                          f"no leading '.' or '-', no trailing '.' or space); set {key}{example}")
    return value
