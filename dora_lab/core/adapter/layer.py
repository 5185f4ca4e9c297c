"""The rank-1-component adapter around one frozen linear layer (docs/algorithms.md section 1).

    h = W0 x + b0 + (alpha / r0) * B diag(c * m) A dropout(x)

``A`` is ``r x d_in`` (row i = input vector of component i), ``B`` is ``d_out x r`` (column i =
output vector), ``c`` one scalar per component and ``mask`` a 0/1 buffer.  ``r`` starts at ``r0``
and shrinks when the layer is compacted; the scale keeps ``r0``.

The base is an ``nn.Linear`` (weight ``d_out x d_in``) or transformers' ``Conv1D`` (GPT-2's
``c_attn``/``c_proj``/``c_fc``: weight stored transposed, ``d_in x d_out``, ``y = x W + b``).  ``A``,
``B`` and :meth:`RankOneLinear.delta_weight` keep the ``nn.Linear`` orientation for both, so scorers,
compaction and parameter counts see the same shapes; only :meth:`RankOneLinear.merge` transposes
``dW`` for a ``Conv1D`` (``fan_in_fan_out``, PEFT's name for it).

While pruning is soft the mask is *not* applied in the forward pass (``hard_mask`` is False): a
soft-pruned component has ``c_i = 0`` but still gets a gradient and may come back.  Once the mask
is frozen it is applied every step, and :meth:`compact` can drop the pruned components for good.

A hard-masked layer may hold *reserve* components (:meth:`RankOneLinear.set_reserve`; IncreLoRA's
advance learning): inactive (mask 0, not counted in any budget) but in the forward pass with a fixed
gate ``g_i`` in place of ``c_i m_i``, so their ``A`` rows and ``B`` columns train while ``c_i`` does
not; :meth:`RankOneLinear.activate` promotes one with its trained ``A``/``B`` and ``c_i = g_i``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["DEFAULT_INIT", "LINEAR_TYPES", "InitMode", "RankOneLinear", "linear_features"]

InitMode = Literal["dora", "adalora"]
DEFAULT_INIT: InitMode = "dora"  # the one home of adapter.init's default (config, inject, the layer)

#: The module types an adapter can wrap: ``nn.Linear`` and GPT-2's transposed ``Conv1D``.
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or a ``Conv1D`` (whose weight is ``d_in x d_out``)."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(f"{type(module).__name__} is not an nn.Linear or a transformers Conv1D")


class RankOneLinear(nn.Module):
    """A frozen linear layer (``nn.Linear`` or ``Conv1D``) plus ``r0`` trainable rank-1 components."""

    def __init__(
        self,
        base: nn.Module,
        r0: int,
        alpha: float = 8.0,
        dropout: float = 0.1,
        init: InitMode = DEFAULT_INIT,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``dtype``: of ``A``, ``B``, ``c`` (default: the base weight's).  float32 adapters on a
        bfloat16 base keep full-precision trained weights and optimizer state; the forward pass
        then runs the adapter's products in the input's dtype (the casts are differentiable)."""
        super().__init__()
        if r0 < 1:
            raise ValueError(f"start rank r0 must be >= 1, got {r0}")
        if init not in ("dora", "adalora"):
            raise ValueError(f"init must be 'dora' or 'adalora', got {init!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r0 = r0
        self.alpha = float(alpha)
        self.scale = self.alpha / r0
        self.in_features, self.out_features = linear_features(base)
        self.fan_in_fan_out = isinstance(base, Conv1D)  # base weight stored d_in x d_out
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        assert isinstance(w, torch.Tensor)
        dt = dtype or w.dtype
        self.A = nn.Parameter(torch.empty(r0, self.in_features, dtype=dt, device=w.device))
        self.B = nn.Parameter(torch.empty(self.out_features, r0, dtype=dt, device=w.device))
        self.c = nn.Parameter(torch.zeros(r0, dtype=dt, device=w.device))
        self.register_buffer("mask", torch.ones(r0, dtype=dt, device=w.device))
        # Original index (0..r0-1) of each remaining component; survives compaction.
        self.register_buffer("index", torch.arange(r0, device=w.device))
        # Fixed gates of reserve components (set_reserve), zero elsewhere; None: no reserve.  Not
        # saved with the weights (an allocation method that keeps reserves saves them in its state).
        self.register_buffer("reserve", None, persistent=False)
        self.hard_mask = False
        self.merged = False
        # DyLoRA (methods/dylora.py): while training, only components at stored positions < prefix act
        self.prefix: int | None = None
        self.init: InitMode = init
        self.reset_parameters(init)

    mask: torch.Tensor
    index: torch.Tensor
    reserve: torch.Tensor | None

    def reset_parameters(self, init: InitMode = DEFAULT_INIT) -> None:
        with torch.no_grad():
            if init == "dora":
                # The official DoRA code: kaiming_uniform_(w) with its default a = 0, i.e.
                # U(-sqrt(6 / fan_in), sqrt(6 / fan_in)); not nn.Linear's a = sqrt(5).
                nn.init.kaiming_uniform_(self.A)
                nn.init.kaiming_uniform_(self.B)
            else:
                nn.init.normal_(self.A, 0.0, 0.02)
                nn.init.normal_(self.B, 0.0, 0.02)
            self.c.zero_()

    # -- sizes --------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """Components currently stored (``r0`` until compaction)."""
        return int(self.c.shape[0])

    @property
    def active_rank(self) -> int:
        """Components not pruned (mask = 1).

        Counted again only when the mask changed (another tensor, or its in-place version counter
        moved): on a GPU each count is a host-device synchronisation, and the controller reports the
        active sizes after every step, while the mask changes only at prune steps."""
        mask = self.mask
        cached = self.__dict__.get("_active_cache")
        if cached is None or cached[0] is not mask or cached[1] != mask._version:
            cached = (mask, mask._version, int(mask.sum().item()))
            self.__dict__["_active_cache"] = cached  # a plain attribute: not a buffer, not saved
        return int(cached[2])

    @property
    def params_per_component(self) -> int:
        return self.in_features + self.out_features + 1

    def active_parameters(self) -> int:
        return self.active_rank * self.params_per_component

    def effective_c(self) -> torch.Tensor:
        c = self.c * self.mask if self.hard_mask else self.c
        if self.reserve is not None:
            c = c + self.reserve  # a reserve slot's mask is 0: its fixed gate, and no gradient for c
        if self.prefix is not None and self.training:
            c = c * (torch.arange(self.rank, device=c.device) < self.prefix).to(c.dtype)
        return c

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x + b0 + (alpha/r0) B diag(c m) A dropout(x)``, arranged for speed on a CPU.

        Given the same dropout mask, the same numbers (up to float rounding) and gradients as the
        plain ``base(x) + F.linear(F.linear(dropout(x), A) * c_eff * scale, B)``; what changed and
        why is measured in benchmarks/ (README.md there):

        - on a CPU the dropout mask is drawn by :func:`_cpu_keep_mask` (same Bernoulli(1 - p)
          distribution as ``nn.Dropout``, other random numbers for a given torch seed; torch's own
          CPU sampler is single-threaded at ~6 ns per entry and cost more than the adapter's
          products), as a float 0/1 tensor (torch's bool kernels are several times slower), and
          dropout's ``1/(1-p)`` moves into the ``r`` coefficients instead of a pass over ``x``;
        - the coefficients are folded into ``B`` (``d_out x r``), stored transposed and contiguous:
          MKL's skinny products with an ``r``-wide operand are several times faster in that layout,
          which is what the backward pass multiplies with;
        - the rank-``r`` update is accumulated into the base output in place (``addmm_``).
        """
        if self.merged or self.rank == 0:
            return self.base(x)
        x2 = x.reshape(-1, self.in_features)
        xd, keep = _dropout_parts(self.dropout, x2)
        coef = self.effective_c() * (self.scale / keep)
        z = F.linear(xd, self.A if self.A.dtype == xd.dtype else self.A.to(xd.dtype))  # (n, r)
        bt = (self.B * coef).t().to(z.dtype).contiguous()  # (r, d_out); z's dtype under autocast
        out = self.base(x2)
        out = out.addmm_(z, bt) if out.dtype == z.dtype else out + (z @ bt).to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """The update ``dW = (alpha/r0) B diag(c m) A`` (``d_out x d_in``, ``nn.Linear``'s orientation
        also for a ``Conv1D`` base: see :meth:`merge`); for merging and tests."""
        return (self.B * (self.effective_c() * self.scale)) @ self.A

    def _base_delta(self) -> torch.Tensor:
        """:meth:`delta_weight` laid out like the base's weight (transposed for a ``Conv1D``)."""
        dw = self.delta_weight()
        return (dw.t() if self.fan_in_fan_out else dw).to(self._base_weight().dtype)

    def _base_weight(self) -> torch.Tensor:
        w = self.base.weight
        assert isinstance(w, torch.Tensor)
        return w

    # -- pruning ------------------------------------------------------------------------------
    @torch.no_grad()
    def soft_prune(self, keep: torch.Tensor) -> None:
        """Zero ``c`` of components not in ``keep`` (bool, length ``rank``); they stay trainable."""
        self.mask.copy_(keep.to(self.mask.dtype))
        self.c.mul_(self.mask)

    @torch.no_grad()
    def activate(self, slots: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
                 generator: torch.Generator | None = None) -> None:
        """(Re)initialise the components at ``slots`` (bool, length ``rank``) as new ones: ``A``'s rows
        and ``B``'s columns drawn as at construction (the layer's ``init``), ``c = 0`` (the output
        does not change) and their optimizer state (AdamW's moments: every per-element tensor of
        ``A``'s, ``B``'s and ``c``'s shape) zeroed; then they are active (mask 1).  The component
        pool: a growing method turns inactive slots into fresh components without rebuilding the
        optimizer.  AdamW's ``step`` counter is per tensor, not per slot, so a reset slot's first
        updates are not bias-corrected as a fresh tensor's would be (methods/increlora.py warms
        them up instead).  ``generator`` (a CPU one) draws the new values: the same on every
        data-parallel rank when seeded alike.

        A reserve component (:meth:`set_reserve`) among ``slots`` is promoted instead: it keeps its
        trained ``A`` row and ``B`` column and their optimizer state, ``c`` starts at its gate (the
        output does not change) with ``c``'s moments zeroed, and it is no longer a reserve."""
        slots = slots.to(self.mask.device).bool()
        if self.reserve is not None:
            promoted = slots & (self.reserve != 0)
            slots = slots & ~promoted
            idx = torch.nonzero(promoted, as_tuple=False).flatten()
            if idx.numel():
                self.c.index_copy_(0, idx, self.reserve.index_select(0, idx))
                self.reserve.index_fill_(0, idx, 0.0)
                self.mask.index_fill_(0, idx, 1.0)
                self._zero_state(optimizer, idx, (self.c,))
                if not bool((self.reserve != 0).any()):
                    self.reserve = None
        idx = torch.nonzero(slots, as_tuple=False).flatten()
        if idx.numel() == 0:
            return
        self._draw(idx, optimizer, generator)
        self.mask.index_fill_(0, idx, 1.0)

    @torch.no_grad()
    def set_reserve(self, slots: torch.Tensor, gate: float, optimizer: torch.optim.Optimizer | None = None,
                    generator: torch.Generator | None = None, fresh: bool = True) -> None:
        """Make the inactive components at ``slots`` (bool, length ``rank``) reserves: they stay
        inactive (mask 0: no budget counts them) but act in the forward pass with the fixed gate
        ``gate`` in place of ``c m``, so their ``A`` rows and ``B`` columns get gradients and train
        while ``c`` gets none (IncreLoRA's advance learning, methods/increlora.py).  With ``fresh``
        their ``A``/``B`` are drawn anew, ``c = 0`` and their optimizer state zeroed, as
        :meth:`activate` does for a new component.  Needs a hard mask (a soft-masked slot is in the
        forward pass already)."""
        slots = slots.to(self.mask.device).bool()
        if not self.hard_mask:
            raise RuntimeError("set_reserve needs a hard mask: a soft-masked component is not out of the forward pass")
        if bool((slots & (self.mask != 0)).any()):
            raise ValueError("a reserve component must be inactive (mask 0)")
        if gate == 0.0:
            raise ValueError("a reserve's gate must be non-zero (with 0 its A and B get no gradient)")
        idx = torch.nonzero(slots, as_tuple=False).flatten()
        if idx.numel() == 0:
            return
        if fresh:
            self._draw(idx, optimizer, generator)
        if self.reserve is None:
            self.reserve = torch.zeros_like(self.c, requires_grad=False)
        self.reserve.index_fill_(0, idx, float(gate))

    def _draw(self, idx: torch.Tensor, optimizer: torch.optim.Optimizer | None,
              generator: torch.Generator | None) -> None:
        """New ``A`` rows and ``B`` columns at ``idx`` (the layer's ``init``), ``c = 0``, state zeroed."""
        fresh_a = torch.empty(idx.numel(), self.in_features, dtype=self.A.dtype)
        fresh_b = torch.empty(self.out_features, idx.numel(), dtype=self.B.dtype)
        if self.init == "dora":
            # kaiming_uniform_ of the whole (r0 x d_in) / (d_out x r0) tensors: bound sqrt(6 / fan_in)
            nn.init.uniform_(fresh_a, -math.sqrt(6 / self.in_features), math.sqrt(6 / self.in_features), generator)
            nn.init.uniform_(fresh_b, -math.sqrt(6 / self.r0), math.sqrt(6 / self.r0), generator)
        else:
            nn.init.normal_(fresh_a, 0.0, 0.02, generator)
            nn.init.normal_(fresh_b, 0.0, 0.02, generator)
        self.A.index_copy_(0, idx, fresh_a.to(self.A.device))
        self.B.index_copy_(1, idx, fresh_b.to(self.B.device))
        self.c.index_fill_(0, idx, 0.0)
        self._zero_state(optimizer, idx, (self.A, self.B, self.c))

    def _zero_state(self, optimizer: torch.optim.Optimizer | None, idx: torch.Tensor,
                    params: tuple[nn.Parameter, ...]) -> None:
        """Zero ``optimizer``'s per-element state of ``params`` at components ``idx``."""
        if optimizer is None:
            return
        for p in params:
            dim = 1 if p is self.B else 0
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.index_fill_(dim, idx.to(v.device), 0.0)

    @torch.no_grad()
    def freeze_mask(self, keep: torch.Tensor) -> None:
        """Fix the final mask: from now on pruned components (reserves too) are zero in every forward pass."""
        self.soft_prune(keep)
        self.hard_mask = True
        self.reserve = None

    @torch.no_grad()
    def compact(self, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """Drop masked components physically; slice the optimizer's state the same way.

        A, B and c become new, smaller Parameters (autograd caches a leaf's shape, so the old
        objects cannot shrink in place); ``optimizer``'s param groups and state are moved to them.
        Returns the kept positions (indices into the pre-compaction rank).
        """
        if self.merged:
            raise RuntimeError("unmerge() the adapter before compacting it")
        keep = torch.nonzero(self.mask > 0, as_tuple=False).flatten()
        for attr, dim in (("A", 0), ("B", 1), ("c", 0)):
            old: nn.Parameter = getattr(self, attr)
            new = nn.Parameter(old.data.index_select(dim, keep).contiguous(), requires_grad=old.requires_grad)
            if old.grad is not None:
                new.grad = old.grad.index_select(dim, keep).contiguous()
            if optimizer is not None:
                _move_optimizer_param(optimizer, old, new, dim, keep)
            setattr(self, attr, new)
        self.mask = self.mask[keep].contiguous()
        self.index = self.index[keep].contiguous()
        self.reserve = None  # a reserve is inactive (mask 0): compaction drops it
        return keep

    # -- merging ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Add ``dW`` into the base weight (an explicit call; inference then costs the base's)."""
        if not self.merged:
            self._base_weight().add_(self._base_delta())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._base_weight().sub_(self._base_delta())
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, "
                f"{'fan_in_fan_out=True, ' if self.fan_in_fan_out else ''}r0={self.r0}, rank={self.rank}, "
                f"active={self.active_rank}, alpha={self.alpha}, hard_mask={self.hard_mask}")


def _dropout_parts(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(x * mask, 1 - p)``: ``dropout(x) = x * mask / (1 - p)`` with the division left to the caller.

    On a CPU the mask comes from :func:`_cpu_keep_mask` (torch's CPU Bernoulli sampler runs on one
    thread at a few ns per element and cost more than the adapter's matrix products); elsewhere,
    and for any dropout module other than ``nn.Dropout``/``nn.Identity``, torch's own sampler is used.
    """
    if isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and (not dropout.training or dropout.p == 0)):
        return x, 1.0
    if not isinstance(dropout, nn.Dropout) or not 0.0 < dropout.p < 1.0:
        return dropout(x), 1.0
    keep = 1.0 - float(dropout.p)
    # under torch.compile, torch's sampler: numpy's generator and .item() would break the graph at every adapter
    if x.device.type == "cpu" and _FAST_CPU_DROPOUT and not torch.compiler.is_compiling():
        mask = _cpu_keep_mask(x.shape, keep, x.dtype)
    else:
        mask = torch.empty_like(x).bernoulli_(keep)
    return x * mask, keep


# Draw CPU dropout masks with numpy's SFC64 generator (seeded from torch's generator) instead of
# torch's Bernoulli sampler.  Same distribution, different random numbers for a given torch seed.
# False: torch's sampler, i.e. exactly nn.Dropout's masks (slower; the benchmark compares both).
_FAST_CPU_DROPOUT = True
_INT32_SPAN = 2**32


def _cpu_keep_mask(shape: torch.Size, keep: float, dtype: torch.dtype) -> torch.Tensor:
    """A float 0/1 tensor, each entry 1 independently with probability ``keep`` (to within 2^-32).

    32 random bits per entry from numpy's SFC64 (about 1 ns per entry against torch's 5 to 6), its
    seed drawn from torch's default generator so that ``torch.manual_seed`` (and a saved torch RNG
    state) fixes every mask.  An entry is kept when its bits, read as a signed int32, fall below
    ``round(keep * 2^32) - 2^31``: exactly ``round(keep * 2^32)`` of the 2^32 patterns.
    """
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, ()).item())
    bits = torch.from_numpy(np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.int32)[:n]).view(shape)
    threshold = min(round(keep * _INT32_SPAN) - _INT32_SPAN // 2, _INT32_SPAN // 2 - 1)
    # float32: write the 0/1 floats over the bits they came from (one buffer, not two).
    out = bits.view(torch.float32) if dtype == torch.float32 else torch.empty(shape, dtype=dtype)
    return torch.lt(bits, threshold, out=out)


def _move_optimizer_param(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, dim: int, keep: torch.Tensor
) -> None:
    """Point ``optimizer`` at ``new`` instead of ``old``, slicing per-element state along ``dim``."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {
            k: v.index_select(dim, keep).contiguous() if torch.is_tensor(v) and v.shape == old.shape else v
            for k, v in state.items()
        }
