"""The package list, the one thing pyproject.toml cannot say.

``methods/`` and ``metrics/`` stay top-level folders of the repository (the design asks for it) but
install as ``dora_lab.methods`` and ``dora_lab.metrics``, so the wheel's only top-level name is
``dora_lab`` (no global ``methods`` or ``metrics`` module; tests/test_packaging.py builds the wheel
and checks).  Every other package is found under ``dora_lab/``, so a new subpackage needs no edit here.
"""

from setuptools import find_packages, setup

MAPPED = {"dora_lab.methods": "methods", "dora_lab.metrics": "metrics"}

setup(packages=[*find_packages(include=["dora_lab", "dora_lab.*"]), *MAPPED], package_dir=MAPPED)
