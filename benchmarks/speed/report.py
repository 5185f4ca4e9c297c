"""The report: the Markdown tables written beside the JSON (machine and method, one table of
configurations per model, the scorer overhead, the magnitude scorer's scaling) and the list of
targets checked against the measured ratios.
"""

from __future__ import annotations

from typing import Any

from .setup import HIGH_RANK, START_RANK, TARGET_RANK

# -- the report ------------------------------------------------------------------------------------------
MEMORY_SOURCE = {"cpu": "torch's CPU allocator events from the profiler + tracemalloc's peak for numpy/Python",
                 "cuda": "torch.cuda.max_memory_allocated over the step, reset before it, less what was allocated "
                         "before it"}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    m, gpu = result["machine"], result.get("gpu")
    lines = [
        "# dora_lab training-step benchmark", "",
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable CPU(s) of {m['logical_cpus']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}, peft {m['peft']}, "
        f"Python {m['python']}. Load average at start {m['load_average_at_start'][0]:.2f}, "
        f"at end {result['load_average_at_end'][0]:.2f}. Run took {result['runtime_s']:.0f} s "
        f"(`{result['command']}`).", "",
        *([f"Device: **cuda**, {gpu['name']} ({gpu['memory_mib']:.0f} MiB, CUDA {gpu['cuda']}); every "
           f"phase timed after torch.cuda.synchronize().", ""] if gpu else []),
        f"Batch: {result['batch']['sentences']} CoLA training sentences, shape {result['batch']['shape']} "
        f"(padded to the longest). Step = forward + loss, backward, AdamW.step, controller/allocator (where "
        f"the method has one), zero_grad. Times: median over interleaved steps; spread p10–p90 and IQR. "
        f"Ratios: median step / median step of the floor, and of PEFT LoRA at the comparable rank "
        f"(the start rank for unpruned adapters, the target rank {TARGET_RANK} after pruning). Memory: "
        f"peak above rest during one step ({MEMORY_SOURCE['cuda' if gpu else 'cpu']}) + trainable parameters "
        f"and optimizer state (frozen weights not counted).", "",
    ]
    for model in result["models"]:
        lines += [f"## {model['name']}: {model['description']}", "",
                  f"Frozen weights {model['frozen_mib']:.0f} MiB (shared, not in the memory column). "
                  f"{model['plan']['rounds']} interleaved rounds x {model['plan']['block']} step(s) per configuration after "
                  f"{model['plan']['warmup']} warm-up step(s).", "",
                  "| configuration | × floor | × PEFT LoRA (ref) | median ms | p10–p90 ms | IQR ms | "
                  "fwd / bwd / opt / ctrl ms | peak MiB | trainable |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, c in model["configurations"].items():
            ph = c["phases_median_ms"]
            ref = f"{_fmt(c['ratio_to_lora'])} ({c['lora_ref'].removeprefix('peft_lora_')})" if c["lora_ref"] else "–"
            mem = c.get("memory")
            lines.append(
                f"| {name} | {_fmt(c['ratio_to_floor'])} | {ref} | {c['median_ms']:.1f} | "
                f"{c['p10_ms']:.1f}–{c['p90_ms']:.1f} | {c['iqr_ms']:.1f} | "
                f"{ph['forward']:.0f} / {ph['backward']:.0f} / {ph['optimizer']:.1f} / {ph['controller']:.1f} | "
                f"{_fmt(mem['peak_mib'], 1) if mem else '–'} | {c['trainable_parameters']:,} |")
        lines += ["", "Scorer overhead (dora_r3 + controller in the decay window):", "",
                  "| scorer | controller.step ms (in step) | share of step | scorer.update alone ms | "
                  "step − no-scorer step ms | share |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, c in model["configurations"].items():
            if "scorer" in c:
                s = c["scorer"]
                lines.append(f"| {name.removeprefix('scorer_')} | {s['controller_ms']:.2f} | "
                             f"{100 * s['controller_share_of_step']:.1f}% | {s['update_alone_ms']:.2f} | "
                             f"{s['step_minus_no_scorer_ms']:+.1f} | "
                             f"{100 * s['step_minus_no_scorer_share']:+.1f}% |")
        mag = model["magnitude_scaling"]
        lines += ["", f"Magnitude scorer alone, one block's six linears {mag['shapes']} "
                      "(closed form vs the naive form that materialises each d_out x d_in update):", "",
                  "| r0 | closed form ms | naive ms | naive / closed | r0²(d_in+d_out) | r0·d_in·d_out | max abs diff |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in mag["rows"]:
            naive = row.get("naive_ms")
            lines.append(f"| {row['r0']} | {row['closed_form_ms']:.3f} | {_fmt(naive, 2)} | "
                         f"{_fmt(naive / row['closed_form_ms'] if naive else None, 1)} | "
                         f"{row['work_closed_form']:,} | {row['work_naive']:,} | "
                         f"{'–' if 'max_abs_diff' not in row else format(row['max_abs_diff'], '.1e')} |")
        for method, fit in mag["fits"].items():
            lines.append(f"\n{method}: R² of a linear fit against r0²(d_in+d_out) "
                         f"{fit['r2_vs_r0sq_din_plus_dout']:.3f}, against r0·d_in·d_out {fit['r2_vs_r0_din_dout']:.3f}; "
                         f"log-log slope in r0 over the two largest ranks {fit['loglog_slope_top']:.2f}.")
        lines.append("")
    lines += ["## Targets", "", "| model | target | measured | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['model']} | {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def targets(model: dict[str, Any]) -> list[dict[str, Any]]:
    c = model["configurations"]
    out = []

    def add(target: str, measured: str, met: bool) -> None:
        out.append({"model": model["name"], "target": target, "measured": measured, "met": bool(met)})

    for r in (START_RANK, HIGH_RANK):
        if f"dora_r{r}" in c:
            x = c[f"dora_r{r}"]["ratio_to_lora"]
            add(f"dora_r{r} <= PEFT LoRA r{r}", f"{x:.3f}x", x <= 1.0)
    x = c[f"dora_r{START_RANK}"]["ratio_to_floor"]
    add(f"dora_r{START_RANK} <= 1.2x floor", f"{x:.3f}x", x <= 1.2)
    x = c["dora_final"]["median_ms"] / c["peft_adalora_final"]["median_ms"]
    add("dora_final faster than PEFT AdaLoRA final", f"{x:.3f}x", x < 1.0)
    x = c["dora_final"]["ratio_to_lora"]
    add(f"dora_final <= PEFT LoRA r{TARGET_RANK}", f"{x:.3f}x", x <= 1.0)
    for name, cc in c.items():
        if "scorer" in cc:
            s = cc["scorer"]["controller_share_of_step"]
            add(f"{name.removeprefix('scorer_')} overhead < 5% of a step", f"{100 * s:.1f}%", s < 0.05)
    return out
