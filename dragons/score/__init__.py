"""Scoring: Ray Data from a prefix to a Delta Lake table, and SQL over it.

``config`` (ScoreConfig), ``pipeline`` (listing -> decode -> scoring actors -> one
commit), ``table`` (Delta), ``query`` (DuckDB), ``listing``, ``incremental``,
``maintenance``, ``cli``. Modules are imported by their full names: importing
the package starts nothing heavy.
"""
