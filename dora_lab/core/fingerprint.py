"""Is this the base model an adapter was saved for?  A fingerprint of a model's frozen weights,
written into a saved adapter (:mod:`dora_lab.core.checkpoint`) and checked when it is loaded, so an
adapter is never silently put onto another checkpoint, seed or fine-tune of the same architecture.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["base_fingerprint", "fingerprint_mismatch"]

_FINGERPRINT_TENSORS = 6  # the largest frozen base tensors outside the adapted layers and the head
_FINGERPRINT_SAMPLE = 4096  # strided elements hashed per tensor


def base_fingerprint(
    model: nn.Module, *, skip_modules: Collection[str] = (), skip_params: Collection[str] = ()
) -> dict[str, Any]:
    """A fingerprint of the frozen base: per-tensor sha256 of a strided sample of the largest
    parameters outside ``skip_modules`` (the adapted layers, whose weights merging changes) and
    ``skip_params`` (the trained head).  Works on the plain and on the adapted model alike."""
    skip_p = set(skip_params)
    prefixes = tuple(m + "." for m in skip_modules)
    candidates = [(n, p) for n, p in model.named_parameters() if n not in skip_p and not n.startswith(prefixes)]
    chosen = sorted(range(len(candidates)), key=lambda i: (-candidates[i][1].numel(), i))[:_FINGERPRINT_TENSORS]
    tensors: dict[str, Any] = {}
    dtype = None
    for i in sorted(chosen):
        name, p = candidates[i]
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _FINGERPRINT_SAMPLE)][:_FINGERPRINT_SAMPLE].float().cpu()
        digest = hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]
        probe = sample[torch.linspace(0, max(sample.numel() - 1, 0), 4).long()].tolist() if sample.numel() else []
        tensors[name] = {"shape": list(p.shape), "sha256": digest, "probe": probe}
        dtype = str(p.dtype).removeprefix("torch.")
    return {"dtype": dtype, "tensors": tensors}


def fingerprint_mismatch(
    model: nn.Module, base_info: Mapping[str, Any], layer_cfgs: Mapping[str, Any], head: list[str]
) -> str | None:
    """Why ``model``'s frozen base is not the one whose fingerprint ``base_info`` (an adapter config's
    ``base_model``) holds, or None when it is; weights saved in another dtype are compared by their
    probes, within bf16's rounding.  The loader raises the answer as its mismatch error."""
    saved = base_info.get("fingerprint") or {}
    actual = base_fingerprint(model, skip_modules=list(layer_cfgs), skip_params=head)
    where = f"the adapter was saved for {base_info['name_or_path']!r}"
    s_t, a_t = saved.get("tensors", {}), actual["tensors"]
    if set(s_t) != set(a_t):
        return (f"wrong base model: {where}, whose largest frozen tensors are {sorted(s_t)[:3]}...; "
                f"this model's are {sorted(a_t)[:3]}...")
    other_dtype = saved.get("dtype") != actual["dtype"]
    for name, s in s_t.items():
        a = a_t[name]
        if s["shape"] != a["shape"]:
            return f"wrong base model: {where}; {name} has shape {s['shape']} there, {a['shape']} here"
        same = s["sha256"] == a["sha256"] or (
            other_dtype and torch.allclose(torch.tensor(s["probe"]), torch.tensor(a["probe"]), rtol=1e-2, atol=1e-3)
        )
        if not same:
            return (f"wrong base model: {where}, but the weights of {name} differ (another checkpoint, seed "
                    f"or fine-tune of the same architecture). Load the right base, or pass check_base=False "
                    f"if you are sure")
    return None
