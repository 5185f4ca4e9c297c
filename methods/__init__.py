"""Built-in allocation methods, one file each (docs/methods.md has their rules and citations).

Importing a module registers its method; ``dora_lab`` imports every module of this package on the
first method lookup, so a new built-in is one new file here (names starting with ``_`` are skipped).
The protocol they implement is :mod:`dora_lab.core.methods`.
"""
