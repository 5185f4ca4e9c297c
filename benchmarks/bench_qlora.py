"""Memory and step time of QLoRA (``model.quantization``): a decoder's frozen base in float32, in
bfloat16 and in 4 bits (NF4, double quantisation), with dora_lab adapters on it.

    python benchmarks/bench_qlora.py [--model smollm2-shape|tiny|PATH] [--layers N] [--device cpu|cuda]
        [--batch 2] [--seq 64] [--steps 3] [--out results.json]

The base is :func:`bench_decoder.build_base`'s (SmolLM2-135M's shape with random weights, ``--layers``
keeping the first N layers), saved once to a temporary folder and loaded three ways with
``from_pretrained``: ``dtype=float32``, ``dtype=bfloat16``, and 4-bit through the same
``BitsAndBytesConfig`` ``dora_lab.train`` builds (compute dtype bfloat16, the other modules in
float32).  Measured for each:

- ``base_bytes``: the bytes of the loaded model's parameters and buffers, plus for each 4-bit layer
  its quantisation state (the per-block scales and, with double quantisation, their own scales and
  code): exact byte counts, not the process's RSS (which the shared allocator blurs);
- ``linear_bytes``: the same for the adapted projections alone (q k v o gate up down), which is
  what QLoRA quantises (the embeddings, norms and head keep their dtype);
- ``step_s``: the median time of ``--steps`` training steps (forward with the loss, backward,
  AdamW) with dora_lab adapters (r0 8) on the seven projections, after one warm-up step;
- on CUDA, ``peak_step_mib``: ``torch.cuda.max_memory_allocated`` during one step.

bitsandbytes (the ``qlora`` extra) must be installed; on a CPU its 4-bit layers dequantise for
every product, so their step time says nothing about a GPU's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decoder import TARGETS, build_base, machine  # noqa: E402

from dora_lab import inject_adapters  # noqa: E402
from dora_lab.run.quantization import QuantizationConfig, standard_layout  # noqa: E402


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, with each 4-bit layer's quantisation state."""
    total = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    for m in module.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        while state is not None:  # absmax (and with double quantisation: state2, its own absmax and code)
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
            state = getattr(state, "state2", None)
    return total


def load(folder: Path, mode: str, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if mode == "nf4":
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=QuantizationConfig().bnb_config(),
                                                     device_map={"": str(device)})
        standard_layout(model)
        return model
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, mode)).to(device)


def step_times(model: nn.Module, batch: torch.Tensor, steps: int, device: torch.device) -> tuple[float, float | None]:
    """Median seconds of a training step and (CUDA) the peak MiB allocated during one."""
    inject_adapters(model, r0=8, targets=TARGETS, dropout=0.1, dtype=torch.float32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, peak = [], None
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def measure(folder: Path, mode: str, batch: torch.Tensor, steps: int, device: torch.device) -> dict[str, Any]:
    model = load(folder, mode, device)
    linears = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    out: dict[str, Any] = {"base_bytes": tensor_bytes(model), "linear_bytes": sum(map(tensor_bytes, linears))}
    out["step_s"], out["peak_step_mib"] = step_times(model, batch, steps, device)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-shape", help="smollm2-shape, tiny, or a local model folder")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    base = build_base(args.model, args.layers, torch.float32, torch.device("cpu"))
    vocab = int(base.config.vocab_size)
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_qlora_") as tmp:
        base.save_pretrained(tmp)
        del base
        for mode in ("float32", "bfloat16", "nf4"):
            results[mode] = measure(Path(tmp), mode, batch, args.steps, device)
            print(mode, json.dumps(results[mode]), flush=True)
    for mode in ("float32", "bfloat16"):
        results[f"nf4_vs_{mode}"] = {k: results["nf4"][k] / results[mode][k] for k in ("base_bytes", "linear_bytes")}
    record = {"args": vars(args), "machine": machine(device), "results": results}
    print(json.dumps({k: v for k, v in results.items() if k.startswith("nf4_vs")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
