"""The ``eval:`` block of a run config: evaluation at step 0 and generation-based scoring.

- ``at_start`` (default on): evaluate the model once before the first step (the base model, since
  every adapter starts as a no-op), written to metrics.json as ``initial`` and to MLflow as the
  ``eval/*`` metrics at step 0.  It is never a candidate for the run's best evaluation.
- ``generate`` (default off: it decodes token by token, several times an evaluation's cost):
  instruction data only; the model answers the first ``rows`` validation prompts (all when null),
  greedy or sampled (``do_sample``, ``temperature``, ``top_p``, ``seed``: the run's seed when null)
  up to ``max_new_tokens``, and ``gen_accuracy`` (the share matching the reference under
  ``answer``: ``exact`` or ``last_number``) and ``gen_tokens`` (mean answer length) are logged
  beside the perplexity at every evaluation.  See :mod:`dora_lab.run.generation`.
- ``autocast`` (default ``auto``): evaluation's forward passes under bf16 autocast on a GPU that has
  bf16 (``auto``: on CUDA; ``bf16``: anywhere, CPUs too), else under the training's
  ``model.precision`` (``off``, and ``auto`` on a CPU).  No gradient is kept, so it only saves time and
  memory; logits come back in float32 for the metrics (:func:`dora_lab.run.evaluate.eval_autocast`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .generation import Sampling

__all__ = ["EvalConfig"]


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    at_start: bool = Field(True, description="evaluate before the first step (metrics.json 'initial', MLflow step 0)")
    generate: bool = Field(False, description="instruction data: score generated answers (gen_accuracy)")
    answer: Literal["exact", "last_number"] = Field("exact", description="how an answer is compared")
    rows: int | None = Field(None, ge=1, description="validation rows answered (null: all)")
    max_new_tokens: int = Field(32, ge=1, description="the longest generated answer, in tokens")
    do_sample: bool = Field(False, description="sample the answer (seeded) instead of greedy decoding")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (do_sample only)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling's probability mass (do_sample only)")
    seed: int | None = Field(None, description="the sampling seed (null: the run's seed)")
    autocast: Literal["auto", "bf16", "off"] = Field(
        "auto", description="evaluate under bf16 autocast: auto (on CUDA), bf16 (also on a CPU), off (model.precision)")

    @field_validator("autocast", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` as ``false``: that is ``off`` here."""
        return "off" if value is False else value

    def sampling(self, run_seed: int) -> Sampling:
        """The decoding settings, the run's seed standing in for a null ``seed``."""
        return Sampling(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, temperature=self.temperature,
                        top_p=self.top_p, seed=run_seed if self.seed is None else self.seed)
