"""What a study file says, read without Optuna or MLflow: the home of the study file's schema, below
both the study runner (:mod:`dora_lab.study`) and the reports (:mod:`dora_lab.report`), which read it
alike (docs/architecture.md).

- :mod:`.space`: the ``study:`` block's schema (what to search, the sampler, the pruner, the stores);
- :mod:`.setup`: a study file read as the study CLI reads it, checked against the run config
  (:func:`~.setup.prepare` -> :class:`~.setup.StudySetup`), and a trial's config;
- :mod:`.objectives`: a study's objectives, a trial's values for them, the Pareto rule;
- :mod:`.report_block`: the ``report:`` block's schema, which the study checks before its first trial
  and the report reads.
"""
