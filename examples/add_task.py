"""Your own task: a TaskSpec is data, registered by name (docs/extending.md).

A plugin file: list it under ``plugins:`` and name the task (``task: {name: reviews}``) with
``task.data_dir`` at a folder of ``train`` and ``validation`` files (``.jsonl``, ``.csv`` or
``.tsv``) holding the columns below; examples/data/reviews/ is such a folder (96 short film reviews
written from templates, 72 to train on and 24 to evaluate).
"""

from dora_lab import TaskSpec, register_task

register_task(TaskSpec(
    name="reviews",
    text_fields=("review",),          # the input column(s): one sentence, or two for a pair task
    num_labels=2,
    is_regression=False,
    main_metric="f1",                 # what a study optimises and a report compares
    metrics=("f1", "accuracy"),       # computed at every evaluation
    label_names=("bad", "good"),      # label i's name (files may write names instead of ids)
    eval_splits=("validation",),
    hub_path=("me/reviews", "default"),  # where load_dataset finds it when task.data_dir is null
))
