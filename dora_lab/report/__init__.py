"""Ablation reports over finished studies: ``python -m dora_lab.report STUDY [STUDY ...]``.

Grouping, pairing and the numbers in :mod:`.compare`; reading studies and writing the files in
:mod:`.io`; statistics in :mod:`.stats`; pictures in :mod:`.plots`.  Reads what runs and studies
wrote (a study file through :mod:`dora_lab.plan.setup`, as the study CLI reads it), beside the study
runner; :mod:`.study_end` is what a study does with the report (its answer, its report at the end).
"""

from .compare import build, detect_factors, drop_repeats, label, main, references, side_keys, varying_keys
from .io import Run, Source, load_runs, read_report_block, source_from_config

__all__ = ["Run", "Source", "build", "detect_factors", "drop_repeats", "label", "load_runs", "main",
           "read_report_block", "references", "side_keys", "source_from_config", "varying_keys"]
