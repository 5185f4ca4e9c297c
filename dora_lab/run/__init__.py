"""One training run: config, tasks (encoder and causal-LM), data, batching, models, optimizer,
evaluation, the loop (:mod:`.train`, ``python -m dora_lab.train``), the Trainer callback.  Builds
on :mod:`dora_lab.core`; knows nothing of Optuna or MLflow beyond :class:`.callbacks.TrainCallback`."""
