"""``eva``: one-shot ranks from the input activations before training (EVA, Paischer et al. 2024,
"One Initialization to Rule them All", as in PEFT's ``EvaConfig``), then fixed.

Before the first optimizer step the model runs forward on ``batches`` training batches (no
gradients) and each adapted layer's inputs ``X`` (every real token, ``n x d_in``: padding positions,
where the batch's ``attention_mask`` is 0, are left out, as PEFT does; on a causal task the positions
whose label is -100, a masked prompt, too, as PEFT's ``EvaConfig(use_label_mask=True)``, its
default, does in ``prepare_model_inputs_fn_language_modeling``; ``label_mask: false`` keeps them,
a departure) are collected as their count,
sum and Gram matrix, which give the centred scatter matrix ``C = (X - 1 mu^T)^T (X - 1 mu^T)``.
Its eigen-decomposition ``C = V diag(s^2) V^T`` gives the principal directions ``V`` (the right
singular vectors of the centred ``X``) and ``s``.  Component ``i`` of a layer explains the ratio
``s_i^2 / sum_j s_j^2`` of its input's variance, PEFT's ``explained_variance_ratio_`` (its
``IncrementalPCA`` centres the data).  All layers' top ``r0``
ratios are ranked together and the top ones kept while their cost fits the global target
(:func:`keep_top`); within a layer that is always a prefix, so each layer keeps its top ``k_l``
directions.  ``A``'s rows become the top right-singular vectors (unit rows, ``V[:, i]``), ``c = 0``
(the output is unchanged), and the masks are frozen at step 0 and compacted with the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from dora_lab.core.labels import IGNORE_INDEX
from dora_lab.core.methods import OneShotMethod, keep_top, register_method


@register_method("eva")
class EVA(OneShotMethod):
    def __init__(self, batches: int = 4, label_mask: bool = True) -> None:
        if batches < 1:
            raise ValueError(f"batches must be >= 1 (training batches to read before training), got {batches}")
        if not isinstance(label_mask, bool):
            raise ValueError(f"label_mask must be true or false (leave out positions labelled -100), got {label_mask!r}")
        self.label_mask = label_mask
        self.calibration_batches = int(batches)
        self.ratios: dict[str, torch.Tensor] = {}

    def before_training(self, run_batch: Callable[[Any], Any], batches: Iterable[Any]) -> None:
        layers = self.ctx.layers
        stats: dict[str, list[torch.Tensor]] = {}  # layer -> [token count, sum of x, sum of x x^T]
        real: list[torch.Tensor | None] = [None]  # the current batch's attention mask

        def hook(name: str) -> Callable[..., None]:
            def collect(module: Any, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0].detach()
                mask = real[0]
                if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                    x = x[mask.to(x.device).bool()]
                x = x.reshape(-1, module.in_features).double()
                part = [torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), x.sum(0), x.T @ x]
                stats[name] = [a + b for a, b in zip(stats[name], part, strict=True)] if name in stats else part
            return collect

        handles = [layer.register_forward_pre_hook(hook(n)) for n, layer in layers.items()]
        try:
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    if i >= self.calibration_batches:
                        break
                    real[0] = self.positions(batch)
                    run_batch(batch)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in layers if n not in stats or float(stats[n][0]) < 2]
        if missing:
            raise RuntimeError(f"method 'eva': fewer than 2 real tokens reached layers {missing[:3]} in the "
                               "calibration batches (method.params.batches; on a causal task only positions with a "
                               "label count, unless method.params.label_mask is false)")
        vectors = {}
        for n, layer in layers.items():
            count, total, gram = stats[n]
            mean = total / count
            scatter = gram - count * torch.outer(mean, mean)
            s2, v = torch.linalg.eigh((scatter + scatter.T) / 2)  # ascending
            s2, v = s2.flip(0).clamp_min(0.0), v.flip(1)
            self.ratios[n] = (s2[: layer.rank] / s2.sum().clamp_min(1e-300)).float()
            vectors[n] = v[:, : layer.rank].T
        keep = keep_top(layers, self.ratios, self.ctx.target, self.ctx.cost, what="method 'eva' ratios")
        with torch.no_grad():
            for n, layer in layers.items():
                k = vectors[n].shape[0]
                layer.A[:k] = vectors[n].to(layer.A.device, layer.A.dtype)
                layer.c.zero_()
        self.fix(keep)

    def positions(self, batch: Any) -> torch.Tensor | None:
        """The positions whose inputs the SVD reads: ``attention_mask`` (None: all), and with
        ``label_mask`` not those whose token label is -100 (labels shaped as the tokens: a causal task)."""
        if not isinstance(batch, Mapping):
            return None
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        if self.label_mask and isinstance(labels, torch.Tensor) and labels.dim() == 2:
            kept = labels != IGNORE_INDEX
            mask = kept if mask is None else mask.to(kept.device).bool() & kept
        return mask

    def state_dict(self) -> dict[str, Any]:
        return {"ratios": {n: r.clone() for n, r in self.ratios.items()}}

    def load_state_dict(self, state: Any) -> None:
        self.ratios = {n: r.clone() for n, r in state.get("ratios", {}).items()}
