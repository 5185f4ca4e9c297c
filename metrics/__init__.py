"""Built-in importance scorers, one small file each (ALGORITHMS.md section 2).

Importing a module registers its scorer; ``dora_lab`` imports them on first lookup.
"""
