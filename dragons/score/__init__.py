"""Scoring: Ray Data from a prefix to a Delta Lake table, and SQL over it.

``config`` (ScoreConfig), ``schema`` (the table's columns and views),
``pipeline`` (listing -> decode -> scoring actors -> commits in parts),
``source`` (the streamed listing), ``table`` (Delta), ``query`` (DuckDB),
``export``, ``listing``, ``incremental``, ``maintenance``, ``runreport`` and
``labelling`` (the morning after), ``cli``. Modules are imported by their full names: importing
the package starts nothing heavy.
"""
