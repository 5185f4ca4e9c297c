"""``fisher``: one-shot ranks from each component's diagonal Fisher information at the start, then fixed.

Before the first optimizer step the model runs forward and backward on ``batches`` training
batches (``run_batch(b)`` returns the model's output; its ``.loss`` is the batch's mean training
loss).  Each component ``i`` of each layer gets the empirical diagonal Fisher information of its
gate ``c_i`` at the initial parameters,

    F_i = (1/N) sum_b (dL_b / dc_i)^2,

where at ``c = 0`` (dora_lab's init) ``dL_b/dc_i = (alpha/r0) B[:, i]^T G_b A[i, :]^T`` with
``G_b = dL_b/dW`` the gradient of the layer's weight: how much the loss would move if the component
were switched on.  All layers' components are ranked together and the top ones kept while their
cost fits the global target (:func:`keep_top`; not necessarily a prefix within a layer); the masks
freeze at step 0 and are compacted with the optimizer.

The gradients are taken with :func:`torch.autograd.grad` for the gates only, so no parameter's
``.grad`` is touched (the first optimizer step sees only its own batch), and ``c`` stays 0, so the
model's output is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from dora_lab.core.methods import OneShotMethod, keep_top, register_method


@register_method("fisher")
class DiagonalFisher(OneShotMethod):
    def __init__(self, batches: int = 4) -> None:
        if batches < 1:
            raise ValueError(f"batches must be >= 1 (training batches run forward and backward before "
                             f"training), got {batches}; set method.params.batches to 1 or more")
        self.calibration_batches = int(batches)
        self.fisher: dict[str, torch.Tensor] = {}

    def before_training(self, run_batch: Callable[[Any], Any], batches: Iterable[Any]) -> None:
        layers = self.ctx.layers
        gates = [layer.c for layer in layers.values()]
        sums = [torch.zeros(layer.rank, dtype=torch.float64, device=layer.c.device) for layer in layers.values()]
        read = 0
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                if i >= self.calibration_batches:
                    break
                out = run_batch(batch)
                loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
                    raise RuntimeError(
                        "method 'fisher' needs the training loss of each calibration batch with gradients: "
                        "run_batch(b) must run the model with the batch's labels (an output with .loss) "
                        "outside torch.no_grad()")
                grads = torch.autograd.grad(loss, gates, allow_unused=True)
                for s, g in zip(sums, grads, strict=True):
                    if g is not None:
                        s += g.detach().double() ** 2
                read += 1
        if read == 0:
            raise RuntimeError("method 'fisher': the training data gave no calibration batch")
        self.fisher = {n: s / read for n, s in zip(layers, sums, strict=True)}
        keep = keep_top(layers, self.fisher, self.ctx.target, self.ctx.cost, what="method 'fisher' scores")
        self.fix(keep)  # c is 0 at the start: the output does not change

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": {n: f.clone() for n, f in self.fisher.items()}}

    def load_state_dict(self, state: Any) -> None:
        self.fisher = {n: f.clone() for n, f in state.get("fisher", {}).items()}
