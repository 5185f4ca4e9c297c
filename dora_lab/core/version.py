"""The version of dora_lab: one home, below everything, so that the core can write it into a saved
adapter (:mod:`dora_lab.core.checkpoint`) and the facade can re-export it as ``dora_lab.__version__``.
It equals ``project.version`` in pyproject.toml (tests/test_checkpoint.py checks)."""

__version__ = "0.1.0"
