"""``train.compile``: the training step's forward and backward under :func:`torch.compile`.

Only the module the training loop calls is compiled (:func:`for_training`); evaluation, the one-shot
methods' calibration and the scorers run the eager model, so their numbers do not depend on the
compiler.  What can change the compiled graph during a run, and why recompilation stays bounded:

- pruning writes the adapters' ``mask`` buffers in place (values, not shapes): buffers are graph
  inputs, so a soft prune recompiles nothing;
- freezing the mask flips ``RankOneLinear.hard_mask`` (a Python flag the graph is specialised on):
  one recompilation, once per run;
- compaction replaces ``A``, ``B``, ``c`` by smaller tensors: their shapes change once (and the
  compiler marks a dimension dynamic the second time it sees it change);
- rows of different lengths (``group_by_length``) and a short last batch: dynamic after the first change.

:func:`compile_counts` reads the compiler's own counters (graphs compiled, graph breaks), so a
test or a benchmark can check that a run compiled a bounded number of graphs.  Whether compiling
pays is measured in benchmarks/bench_compile.py (docs/performance.md): on a CPU it did not, and
the default is off.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from .config_yaml import ConfigError

__all__ = ["check_compiler", "compile_counts", "for_training"]


def for_training(module: nn.Module, enabled: bool) -> nn.Module:
    """``module`` under :func:`torch.compile` when ``enabled`` (a wrapper that shares its parameters,
    buffers and ``state_dict`` keys); ``module`` itself otherwise.  Call again on the new module
    after :func:`dora_lab.run.distributed.wrap` (compaction re-wraps the model under DDP)."""
    if not enabled:
        return module
    return torch.compile(module)  # type: ignore[return-value]


def check_compiler(device: torch.device, enabled: bool) -> None:
    """``train.compile`` (``enabled``) on a CPU needs a C++ compiler (inductor writes and builds C++ kernels):
    refused before any work when there is none, with the fix."""
    if enabled and device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise ConfigError("train.compile: true needs a C++ compiler on a CPU (torch.compile's inductor builds "
                          "C++ kernels), and none is on PATH (g++, c++, clang++); install one (apt-get install "
                          "g++) or set train.compile: false")


def compile_counts() -> dict[str, int]:
    """Since the last ``torch._dynamo.reset()``: graphs compiled (``graphs``), frames compiled
    (``frames``: a first compilation or a recompilation each), and graph breaks (``breaks``)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "frames": int(counters["frames"]["ok"]),
            "breaks": int(sum(counters["graph_break"].values()))}
