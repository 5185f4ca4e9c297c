"""What loading a model's weights says, kept to what a researcher must read.

transformers 5 logs a "LOAD REPORT" table (logger ``transformers.modeling_utils``) at every
``from_pretrained`` that found a key missing, unexpected or of another shape, and draws a "Loading
weights" bar.  For dora_lab the usual report says nothing: a classifier's task head (``classifier.*``,
``score.*``) is new by design (the head ``model.trainable`` trains), and a checkpoint's pretraining head
(``cls.*``, ``lm_head.*``) is dropped by the head swap.  Printed per trial, it buried a study's lines.

- :func:`quiet_load` holds the report back while the weights load (a :class:`logging.Filter` on that
  logger: other transformers warnings still pass) and hides the bar unless stderr is a terminal (a
  study's trial runs inside :func:`hf_bars` ``(False)``: transformers'
  ``utils.logging.disable_progress_bar``, so no bar there).  A load that raises (a size mismatch) prints the held
  report first, so its reason is not lost.
- :func:`unexpected_keys` reads ``from_pretrained(..., output_loading_info=True)``'s dict and keeps
  what is not expected: a missing key outside the new head and ``model.trainable``, an unexpected
  key inside the base model, any mismatched shape.  :func:`unexpected_line` says them in one
  ``warning:`` line, written to stderr once per process (a study's trials load the same checkpoint).
- :func:`load_pretrained` is every model load of dora_lab (training, a study's trials, export's
  base model, ``generate`` / ``lm_eval``, the GGUF conversion): ``from_pretrained`` under
  :func:`quiet_load`, then that one line.  A command that loads one model (export, generate,
  lm_eval, the GGUF conversion) keeps the "Loading weights" bar on a terminal: it is the long wait
  there; a study's trial never shows it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from transformers.utils import logging as hf_logging

from ..core.adapter.inject import _is_under

__all__ = ["hf_bars", "load_pretrained", "new_head_keys", "quiet_load", "say", "unexpected_keys", "unexpected_line"]

REPORT_LOGGER = "transformers.modeling_utils"  # where transformers' log_state_dict_report writes


class _HoldReports(logging.Filter):
    """Keeps the LOAD REPORT records from the handlers (and holds them), lets every other record pass."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" in message:
            self.held.append(message)
            return False
        return True


@contextlib.contextmanager
def hf_bars(show: bool) -> Iterator[None]:
    """transformers' progress bars (the Hub's too) off inside unless ``show``; as they were after."""
    was = hf_logging.is_progress_bar_enabled()
    if was and not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_load() -> Iterator[None]:
    """Inside: no LOAD REPORT (printed to stderr after all if the load raises), and transformers'
    progress bars only when stderr is a terminal."""
    hold = _HoldReports()
    logger = hf_logging.get_logger(REPORT_LOGGER)
    logger.addFilter(hold)
    try:
        with hf_bars(sys.stderr.isatty()):
            yield
    except BaseException:
        for report in hold.held:
            print(report, file=sys.stderr, flush=True)
        raise
    finally:
        logger.removeFilter(hold)


def load_pretrained(auto: Any, path: str, name: str, *, causal: bool, trainable: Sequence[str] = (),
                    **kwargs: Any) -> Any:
    """``auto.from_pretrained(path, **kwargs)`` (``auto``: a transformers ``AutoModel*`` or model class)
    without transformers' LOAD REPORT table (:func:`quiet_load`); what of it is unexpected
    (:func:`unexpected_keys`, ``trainable`` and ``causal`` as there) is one ``warning:`` line naming
    ``name``, written once a process (:func:`say`).  Raises what ``from_pretrained`` raises."""
    with quiet_load():
        model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    warning = unexpected_line(name, unexpected_keys(model, info, trainable, causal))
    if warning is not None:
        say(warning, once=True)
    return model


_SAID: set[str] = set()  # the once-a-process lines already written


def say(line: str, *, once: bool = False) -> None:
    """Write ``line`` to stderr; with ``once``, only the first time this process says it (a run
    resolves its model for the quick check and again for the load, a study's trials load the same
    checkpoint: one line, not one each)."""
    if once and line in _SAID:
        return
    _SAID.add(line)
    print(line, file=sys.stderr, flush=True)


def _base_names(model: Any) -> set[str]:
    """The first parts of a key inside the base model: its prefix (``bert``) and, for a checkpoint
    saved without it (a bare encoder), the base model's own children (``embeddings``, ``encoder``)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    return {prefix, *(n for n, _ in base.named_children())} if base is not None else set()


def new_head_keys(model: Any, info: Mapping[str, Any], trainable: Sequence[str], causal: bool) -> list[str]:
    """The missing keys that are expected: a classifier's head outside the base model (new: its
    ``num_labels`` rows), and whatever ``model.trainable`` trains in full.  A causal LM's head is
    not new (a missing ``lm_head`` is a broken checkpoint, unless tied, which transformers drops)."""
    base = _base_names(model)
    return sorted(k for k in info.get("missing_keys", ()) if any(_is_under(k, t) for t in trainable)
                  or (not causal and base and k.split(".")[0] not in base))


def unexpected_keys(model: Any, info: Mapping[str, Any], trainable: Sequence[str], causal: bool) -> dict[str, list[str]]:
    """What of the load's ``info`` (``output_loading_info``) is not expected, by kind (``missing``,
    ``unexpected``, ``mismatched``; kinds with nothing left out): see the module docstring."""
    base = _base_names(model)
    head = set(new_head_keys(model, info, trainable, causal))
    found = {
        "missing": sorted(set(info.get("missing_keys", ())) - head),
        # a checkpoint key inside the base model that this model has no place for; a pretraining
        # head's keys (cls.*, lm_head.*) are dropped by the head swap, as meant
        "unexpected": sorted(k for k in info.get("unexpected_keys", ()) if not base or k.split(".")[0] in base),
        "mismatched": sorted(f"{k} (checkpoint {tuple(a)}, model {tuple(b)})"
                             for k, a, b in info.get("mismatched_keys", ())),
    }
    return {kind: keys for kind, keys in found.items() if keys}


def unexpected_line(name: str, found: Mapping[str, Sequence[str]], shown: int = 8) -> str | None:
    """The ``warning:`` line naming ``found``'s keys (the first ``shown`` of each kind), or ``None``
    when nothing is unexpected.  :func:`load_pretrained` writes it to stderr once per process."""
    if not found:
        return None
    parts = [f"{kind} {', '.join(keys[:shown])}" + (f" and {len(keys) - shown} more" if len(keys) > shown else "")
             for kind, keys in found.items()]
    return (f"warning: loading model {name!r}: {'; '.join(parts)} (outside the new task head: these weights are "
            f"random or dropped; check that the checkpoint is the model meant)")
