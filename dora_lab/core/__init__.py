"""The adapter core: rank-1 components (:mod:`.adapter`), importance scorers, budget schedules,
regularisers, the checked registry and the pruning controller that joins them.  Knows nothing of
runs, studies, Optuna or MLflow."""
