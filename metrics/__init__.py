"""Built-in importance scorers, one small file each (docs/algorithms.md section 2).

Importing a module registers its scorer; ``dora_lab`` imports every module of this package on the
first scorer lookup, so a new built-in is one new file here (names starting with ``_`` are skipped).
"""
