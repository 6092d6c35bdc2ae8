"""A table writer in its own process, for the concurrency and crash tests.

    python tests/_table_writer.py ROOT RUN_ID ROWS DELAY_S [FILE_BYTES] [COMMIT_EVERY]

Writes ROWS synthetic rows through dragons' run writer (no Ray, no model), in
batches of 1000 rows with DELAY_S between them, committing a part every
COMMIT_EVERY rows (default: one part at the end), so two processes overlap and a
SIGKILL lands mid-run or mid-commit. Prints "part N" per part and
"committed VERSION" at the end.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone

import pyarrow as pa


def rows(run_id: str, n: int, start: int = 0) -> pa.Table:
    from dragons.score.schema import schema

    now = datetime.now(timezone.utc)
    s = schema(["ants", "bees"])
    data = {
        "uri": [f"s3://x/{run_id}/{i}.jpg" for i in range(start, start + n)],
        "label": ["ants"] * n,
        "score": [0.75] * n,
        "p_ants": [0.75] * n,
        "p_bees": [0.25] * n,
        "novelty": [None] * n,
        "model_version": ["v1"] * n,
        "run_id": [run_id] * n,
        "scored_at": [now] * n,
        "error": [None] * n,
        "error_kind": [None] * n,
        "etag": [f"e{i}" for i in range(start, start + n)],
        "size": [100] * n,
        "last_modified": [now] * n,
        "dt": [now.strftime("%Y-%m-%d")] * n,
    }
    return pa.table(data, schema=s)


def main() -> int:
    from dragons.cliargs import guarded
    from dragons.score.table import RunWriter

    root, run_id, n, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    file_bytes = int(sys.argv[5]) if len(sys.argv) > 5 and int(sys.argv[5]) else None
    every = int(sys.argv[6]) if len(sys.argv) > 6 else 0

    def go() -> int:
        w = RunWriter(
            root,
            run_id,
            datetime.now(timezone.utc),
            ["ants", "bees"],
            model_version="v1",
            commit_every=every,
            target_file_size=file_bytes,
        )
        state = w.begin()
        start = state.rows  # a second writer of the run continues where the table stands
        for at in range(start, n, 1000):
            time.sleep(delay)
            if w.add(rows(run_id, min(1000, n - at), at).drop_columns(["model_version", "run_id", "scored_at", "dt"])):
                print(f"part {w.part}", flush=True)
        m = w.finish({"listed": n})
        print(f"committed {m['version']}", flush=True)
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
