"""Importance scorers: the base class, the function adapter, and the scorer registry.

A scorer maps each component of each adapted layer to one non-negative score; the controller
ranks all layers' scores together.  The controller calls :meth:`Scorer.update` once per
optimizer step, *after* ``optimizer.step()`` and *before* the gradients are cleared, until
pruning ends; then it reads :meth:`Scorer.scores`.

The short way to add one is a function of one layer's components (``layer.A``, ``layer.B``,
``layer.c`` and their ``.grad``) that returns a tensor of length ``layer.rank``::

    from dora_lab import register_scorer

    @register_scorer("movement", needs_grad=True)
    def movement(component):
        return (component.c * component.c.grad).abs()

``beta`` adds an exponential moving average over steps (``S <- beta S + (1 - beta) s``); it is a
hyper-parameter every function scorer accepts from the config.  ``batched=True`` says the function
also works on a :class:`LayerStack` (equal-shape layers stacked along a new first dimension, written
with ``dim=-1``/``-2`` and ``.mT``): it is then called once per group of equal-shape layers instead of
once per layer (on a GPU each call is a few dozen small kernels; SmolLM2 has 210 adapted matrices in
7 shapes), with the same scores.  Scorers that keep per-element
state (``smoothed_uncertainty``) subclass :class:`Scorer` instead.  The built-ins live in the
top-level ``metrics/`` package, one file each, found by discovery: every module there is imported
on the first lookup.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from .adapter.layer import RankOneLinear
from .registry import Registry, RegistryError, build_checked

__all__ = [
    "FunctionScorer",
    "LayerStack",
    "Scorer",
    "check_grads",
    "combine_elementwise",
    "get_scorer",
    "list_scorers",
    "make_scorer",
    "register_scorer",
    "require_grads",
]

Layers = Mapping[str, RankOneLinear]


class Scorer(ABC):
    """Base class.  Subclasses implement :meth:`update` and :meth:`scores`.

    Constructor keyword arguments are the scorer's hyper-parameters (set from the config's
    ``scorer`` block).  ``needs_grad = True`` says the scorer reads ``.grad``: the controller then
    refuses, with a clear error, to update it on a step whose adapter has no gradients.
    """

    needs_grad: ClassVar[bool] = False
    name: ClassVar[str] = ""

    @abstractmethod
    def update(self, layers: Layers) -> None:
        """Called once per optimizer step while pruning is live (grads still present)."""

    @abstractmethod
    def scores(self) -> dict[str, torch.Tensor]:
        """The current score of every component, one 1-D tensor per layer name."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state

    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """The keyword arguments the constructor takes, with their defaults."""
        sig = inspect.signature(cls.__init__)
        return {
            n: (None if p.default is inspect.Parameter.empty else p.default)
            for n, p in sig.parameters.items()
            if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }


class LayerStack:
    """Equal-shape adapter layers stacked along a new first dimension, for a ``batched`` scorer
    function: ``A`` (``L x r x d_in``), ``B`` (``L x d_out x r``), ``c`` and ``mask`` (``L x r``),
    detached, with their stacked gradients as ``.grad`` when ``grads``; :meth:`effective_c`, ``rank``,
    ``in_features``, ``out_features``, ``scale`` and ``hard_mask`` as on :class:`RankOneLinear`."""

    def __init__(self, layers: list[RankOneLinear], grads: bool) -> None:
        first = layers[0]
        self.rank, self.in_features, self.out_features = first.rank, first.in_features, first.out_features
        self.scale, self.hard_mask = first.scale, first.hard_mask
        self.mask = torch.stack([la.mask for la in layers])
        for attr in ("A", "B", "c"):
            stacked = torch.stack([getattr(la, attr).detach() for la in layers])
            found = [getattr(la, attr).grad for la in layers] if grads else []
            if found and all(g is not None for g in found):  # else .grad stays None: require_grads says so
                stacked.grad = torch.stack(found)
            setattr(self, attr, stacked)

    A: torch.Tensor
    B: torch.Tensor
    c: torch.Tensor

    def effective_c(self) -> torch.Tensor:
        return self.c * self.mask if self.hard_mask else self.c


class FunctionScorer(Scorer):
    """Wraps ``fn(layer) -> scores`` with an optional EMA (``beta``; ``None`` means no smoothing).
    With ``batched`` the layers are scored in groups of equal shape (:class:`LayerStack`)."""

    fn: ClassVar[Callable[[RankOneLinear], torch.Tensor]]
    default_beta: ClassVar[float | None] = None
    batched: ClassVar[bool] = False

    def __init__(self, beta: float | None = "default") -> None:  # type: ignore[assignment]
        if beta == "default":
            beta = self.default_beta
        if beta is not None and not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"scorer {self.name!r}: beta must be in [0, 1) or null, got {beta}")
        self.beta = None if beta is None else float(beta)
        self._scores: dict[str, torch.Tensor] = {}

    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        return {"beta": cls.default_beta}

    def update(self, layers: Layers) -> None:
        groups: dict[tuple[Any, ...], list[str]] = {}
        for name, layer in layers.items():
            key = (layer.rank, layer.in_features, layer.out_features, layer.hard_mask, layer.A.dtype,
                   layer.A.device, layer.scale) if type(self).batched and layer.rank else (name,)
            groups.setdefault(key, []).append(name)
        for names in groups.values():
            if len(names) == 1:
                layer = layers[names[0]]
                with torch.no_grad():
                    s = type(self).fn(layer).detach().to(torch.float32)
                self._check_shape(s, (layer.rank,), names[0])
                self._smooth(names, s.unsqueeze(0))
                continue
            stack = LayerStack([layers[n] for n in names], grads=self.needs_grad)
            with torch.no_grad():
                s = type(self).fn(stack).detach().to(torch.float32)  # type: ignore[arg-type]
            self._check_shape(s, (len(names), stack.rank), names[0])
            self._smooth(names, s)
        if type(self).batched:  # scores() lists the layers in the model's order, as the groups do not
            self._scores = {**{n: self._scores[n] for n in layers if n in self._scores}, **self._scores}

    def _check_shape(self, s: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
        if s.shape != shape:
            raise ValueError(
                f"scorer {self.name!r} returned shape {tuple(s.shape)} for layer {name!r}; "
                f"it must return one score per component, shape {shape}"
            )

    def _smooth(self, names: list[str], s: torch.Tensor) -> None:
        """EMA of the rows of ``s`` (one per layer in ``names``), in one pass for the whole group."""
        prev = [self._scores.get(n) for n in names]
        if self.beta is None or any(p is None or p.shape != s.shape[1:] for p in prev):
            # The EMA starts at 0 as in the paper's code: S_0 = (1 - beta) s_0.
            new = s if self.beta is None else (1 - self.beta) * s
        else:
            new = self.beta * torch.stack(prev) + (1 - self.beta) * s  # type: ignore[arg-type]
        for i, n in enumerate(names):
            self._scores[n] = new[i]

    def scores(self) -> dict[str, torch.Tensor]:
        return dict(self._scores)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": {k: v.clone() for k, v in self._scores.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._scores = {k: v.clone() for k, v in state["scores"].items()}


def require_grads(layer: RankOneLinear, scorer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A.grad, B.grad, c.grad)``, or a clear error when backward has not run."""
    grads = (layer.A.grad, layer.B.grad, layer.c.grad)
    if any(g is None for g in grads):
        raise RuntimeError(
            f"scorer {scorer!r} needs gradients but the adapter has none: call controller.step() "
            f"after optimizer.step() and before optimizer.zero_grad()"
        )
    return grads  # type: ignore[return-value]


def check_grads(scorer: Scorer, layers: Layers) -> None:
    """A scorer that says it reads gradients (``needs_grad``) is refused a step without them, by
    layer name, before it sees ``None`` (a layer with no components has nothing to score)."""
    if not getattr(scorer, "needs_grad", False):
        return
    for name, layer in layers.items():
        if layer.rank and any(p.grad is None for p in (layer.A, layer.B, layer.c)):
            raise RuntimeError(
                f"scorer {scorer.name!r} needs gradients but layer {name!r} has none: call "
                f"controller.step() after optimizer.step() and before optimizer.zero_grad()"
            )


def combine_elementwise(i_a: torch.Tensor, i_b: torch.Tensor, i_c: torch.Tensor) -> torch.Tensor:
    """Per-component score from element scores: ``I(c_i) + mean_j I(A[i,j]) + mean_j I(B[j,i])``
    (one layer, or a :class:`LayerStack`'s layers along the first dimension)."""
    return i_c + i_a.mean(dim=-1) + i_b.mean(dim=-2)


def _check(name: str, obj: object) -> None:
    if not (isinstance(obj, type) and issubclass(obj, Scorer)):
        raise RegistryError(f"scorer {name!r} must be a Scorer subclass or a function of one layer")
    if inspect.isabstract(obj):
        raise RegistryError(f"scorer {name!r} ({obj.__qualname__}) does not implement update/scores")


SCORERS: Registry[type[Scorer]] = Registry(
    "scorer", "dora_lab.scorers", _check,
    packages=("dora_lab.metrics",),  # every module of metrics/: a new built-in is one new file there
)


def register_scorer(
    name: str, *, beta: float | None = None, needs_grad: bool = False, batched: bool = False,
    replace: bool = False,
) -> Callable[[Any], Any]:
    """Register a :class:`Scorer` subclass, or a function ``fn(layer) -> Tensor[rank]``.

    For a function, ``beta`` is the default EMA factor (``None``: no smoothing), ``needs_grad``
    says whether it reads gradients and ``batched`` that it also scores a :class:`LayerStack`
    (returning ``L x rank``).  The decorated object is returned unchanged.
    """

    def decorate(obj: Any) -> Any:
        cls: type[Scorer]
        if isinstance(obj, type):
            cls = obj
        elif callable(obj):
            params = [p for p in inspect.signature(obj).parameters.values() if p.default is p.empty]
            if len(params) != 1:
                raise RegistryError(
                    f"scorer function {name!r} must take exactly one argument (the layer's components)"
                )
            cls = type(
                f"{obj.__name__}_scorer",
                (FunctionScorer,),
                {"fn": staticmethod(obj), "default_beta": beta, "needs_grad": needs_grad, "batched": batched,
                 "__module__": obj.__module__, "__qualname__": obj.__qualname__, "__doc__": obj.__doc__},
            )
        else:
            raise RegistryError(f"cannot register {obj!r} as scorer {name!r}: not a class or function")
        cls.name = name
        SCORERS.add(name, cls, replace=replace)
        return obj

    return decorate


def get_scorer(name: str) -> type[Scorer]:
    return SCORERS.get(name)


def list_scorers() -> list[str]:
    return SCORERS.names()


def make_scorer(name: str, **params: Any) -> Scorer:
    """Build scorer ``name`` with hyper-parameters ``params``; unknown ones are refused by name."""
    cls = get_scorer(name)
    return build_checked("scorer", name, cls, cls.hyperparameters(), params)
