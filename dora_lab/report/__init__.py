"""Ablation reports over finished studies: ``python -m dora_lab.report STUDY [STUDY ...]``.

Grouping, pairing and the numbers in :mod:`.compare`; reading studies and writing the files in
:mod:`.io`; statistics in :mod:`.stats`; pictures in :mod:`.plots`.  Reads what runs and studies
wrote (the study's block through :mod:`dora_lab.study.space`), beside the study runner.
"""

from .compare import (
    Run,
    Source,
    build,
    detect_factors,
    drop_repeats,
    label,
    load_runs,
    main,
    read_report_block,
    references,
    side_keys,
    source_from_config,
    varying_keys,
)

__all__ = ["Run", "Source", "build", "detect_factors", "drop_repeats", "label", "load_runs", "main",
           "read_report_block", "references", "side_keys", "source_from_config", "varying_keys"]
