"""MLflow tracking of a study, and the pictures and tables that studies and reports share.

One parent run per study, one child run per trial.

MLflow is imported here, by the study runner and by the tools that read finished runs
(:mod:`dora_lab.report.io`, :mod:`dora_lab.export.cli`).  This module talks to the tracking store through
:class:`mlflow.MlflowClient` (no global "active run"), so any process (a ``--workers`` worker, or
another machine in the distributed mode) can log a child under the same parent: the child carries
the tag ``mlflow.parentRunId``, which is what ``mlflow.start_run(nested=True)`` sets too.

The parent is found again by its tags (``dora_lab.study`` = the study name, ``dora_lab.role`` =
``study``, and ``dora_lab.study_uid`` = the Optuna study's identity: its creation time and a random
part, kept in the study's user attrs), so running a study again continues under the same parent
instead of adding one, and a new study of the same name (its ``optuna.db`` deleted, or a new storage
with the old ``output_dir``) gets a parent of its own instead of adopting the old one's.
A fresh SQLite or file store is created under a lock (:mod:`.locks`), so processes that start
together on a new folder do not race through MLflow's migrations.

Child runs are named for their searched values (:func:`run_name`, e.g. ``sensitivity · seed 1 (t3)``;
the parent keeps the study's name) and get the trial's flattened resolved config as params, with the
effective scorer, method, schedule and regulariser settings (``scorer.effective.*``, ``method.effective.*``:
the defaults where ``scorer.params`` / ``method.params`` are silent; ``schedule.effective.*_steps``; ``regularizer.effective.*``); tags
``task model scorer schedule budget seed trial state`` (+ ``fail_reason`` or ``prune_reason``,
``dora_lab.adapter_dir``, ``dora_lab.run_dir``, ``dora_lab.worker``, and ``dora_lab.artifact_error``
when a file could not be logged); metrics at every optimizer step (``train/loss train/lr
budget/active_components budget/active_parameters budget/target``), at every evaluation (the task's
metrics as ``eval/<metric>``) and once, at step 0 (``objective best_<metric> best_step
active_components_final adapter_parameters_final minutes peak_memory_mb trainable_parameters``), sent at each
evaluation and at least every 30 s; the train and evaluation rows as MLflow datasets
(:func:`datasets`); artifacts ``config.yaml``, ``allocation.json``, ``metrics.json``, ``budget.json``,
the figures ``rank_heatmap.png`` and ``budget.png`` at the artifact root (:data:`FIGURES`, titled
with their run: MLflow's compare page shows top-level artifacts side by side) and, for a COMPLETE
trial, its adapter (``adapter/``, for ``python -m dora_lab.export RUN_ID`` anywhere).  Status:
FINISHED (complete), KILLED (pruned or interrupted), FAILED.

The experiment is tagged as MLflow 3's model-training kind and the printed links
(:func:`ui_lines`: :func:`experiment_url`, :func:`compare_url`, :func:`run_url`) open the model-training
view (MLflow 3.17 decides it by the URL's ``workflowType``), the runs table filtered to the study's
trials and sorted by ``objective``.

Modules: :mod:`.links` (the UI's links and saved view), :mod:`.logger` (a trial's child run),
:mod:`.tracker` (the study's experiment, parent run and summary), :mod:`.plots`, :mod:`.tables` and
:mod:`.locks` (one cross-process lock per store).  The study runner and the reports import from here;
nothing here imports the study runner or the reports.
"""
