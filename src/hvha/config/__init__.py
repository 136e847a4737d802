"""Loading and validating cluster.yaml: positions, schema, semantic rules, diagnostics.

This layer imports nothing from the rest of hvha except :mod:`hvha.model`'s vocabulary.
"""
