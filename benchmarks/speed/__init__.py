"""The pieces of ``benchmarks/bench_speed.py``, the training-step speed and memory benchmark.

``setup`` holds the paths, the fixed settings, the batch and the models; ``configs`` builds every
configuration that is timed; ``timing`` runs and measures the steps; ``scaling`` times the
magnitude scorer against its naive form; ``report`` writes the Markdown tables and the targets.
The method is described in the docstring of ``bench_speed.py``, the entry point.
"""
