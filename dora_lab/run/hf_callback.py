"""Pruning under the Hugging Face ``Trainer``: a ``TrainerCallback`` that steps the controller.

``Trainer`` calls ``on_optimizer_step`` after ``optimizer.step()`` and before the gradients are
zeroed, exactly where :meth:`PruningController.step` belongs, so pruning under ``Trainer``
matches the plain loop (PEFT's AdaLoRA, by contrast, needs a manual ``update_and_allocate`` call
that ``Trainer`` never makes)::

    callback = DoraTrainerCallback(lambda total: PruningController(model, make_scorer("magnitude"),
                                                                     "dora", total, target_rank=2))
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback]).train()

The factory receives ``state.max_steps`` (the Trainer's optimizer steps); from a run config,
``DoraTrainerCallback(lambda total: build_controller(cfg, model, total))`` builds the controller the
config asks for, as the plain loop does (:func:`dora_lab.run.config.build_controller`).  Regularisers (DEM) are
not added to the Trainer's loss by this callback; add ``callback.controller.regularization_loss()``
in a ``compute_loss`` override if you want them.

Under ``accelerate launch`` / ``torchrun`` (the Trainer wraps the model in DDP and averages the
gradients before ``on_optimizer_step``) every rank applies rank 0's pruning decision
(:func:`dora_lab.run.distributed.agree`), so the masks are identical.  Compaction is deferred to the
end of training there: it replaces the adapter's parameters, and the Trainer's DDP wrapper and
optimizer, which the callback does not own, would keep training the old ones.  The frozen mask
is applied from the last prune step on (pruned components add nothing to the output and nothing
to the kept ones' gradients), and ``on_train_end`` compacts, so the trained model ends as in one
process.  (One exception: AdaLoRA's orthogonal penalty, if added in ``compute_loss``, still sees
the pruned rows until the end.)  For gradient
checkpointing under DDP pass ``activation_checkpointing_kwargs={"use_reentrant": False}``
(``gradient_checkpointing_kwargs`` before transformers 5), and for a classification loss
``average_tokens_across_devices=False`` (its default scales a mean loss by the world size).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..core.controller import PruningController, StepInfo
from . import distributed

__all__ = ["DoraTrainerCallback"]


class DoraTrainerCallback(TrainerCallback):
    """Steps a :class:`PruningController` once per optimizer step of a ``transformers.Trainer``."""

    def __init__(self, controller: PruningController | Callable[[int], PruningController]) -> None:
        self._factory = None if isinstance(controller, PruningController) else controller
        self.controller: PruningController | None = controller if isinstance(controller, PruningController) else None
        self.history: list[StepInfo] = []
        self.deferred_compaction = False  # data-parallel: compact in on_train_end instead

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if self.controller is None and self._factory is not None:
            self.controller = self._factory(state.max_steps)
        if self.controller is not None and self.controller.method.calibration_batches:
            model, loader = kwargs.get("model"), kwargs.get("train_dataloader")
            if model is None or loader is None:
                raise RuntimeError(f"method {self.controller.method.name!r} reads training batches before training, "
                                   "but the Trainer passed no model or train_dataloader to on_train_begin")
            was_training = model.training
            model.eval()
            self.controller.before_training(lambda b: model(**b), loader)  # with .loss
            model.train(was_training)
        if self.controller is not None and distributed.world_size() > 1:
            self.controller.agree = distributed.agree
            if self.controller.compact_at_end:
                self.controller.compact_at_end = False
                self.deferred_compaction = True
                if distributed.is_main():
                    warnings.warn("DoraTrainerCallback under DDP: the pruned components are dropped at the "
                                  "end of training, not when the mask freezes", stacklevel=2)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        if self.controller is None:
            raise RuntimeError("DoraTrainerCallback: the controller was not built (on_train_begin not called)")
        wrapped = kwargs.get("optimizer")
        optimizer = getattr(wrapped, "optimizer", wrapped)  # unwrap accelerate's AcceleratedOptimizer
        # fp16: accelerate's loss scaler skips a step whose gradients overflowed; keep them out of the scores
        skipped = bool(getattr(wrapped, "step_was_skipped", False))
        self.history.append(self.controller.step(optimizer, update_scores=not skipped))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.controller is not None and self.deferred_compaction and self.controller.frozen:
            for layer in self.controller.layers.values():
                layer.compact()
            self.controller.compact_at_end = True
            self.deferred_compaction = False
