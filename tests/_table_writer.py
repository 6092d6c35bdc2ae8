"""A table writer in its own process, for the concurrency and crash tests.

    python tests/_table_writer.py ROOT RUN_ID ROWS DELAY_S [FILE_BYTES]

Writes ROWS synthetic rows through dragons' table writer (no Ray, no model),
sleeping DELAY_S between batches of 1000 rows *while delta-rs is writing*, so two
processes overlap and a SIGKILL lands mid-write. Prints "committed VERSION".
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from typing import Iterator

import pyarrow as pa


def rows(run_id: str, n: int, start: int = 0) -> pa.Table:
    from dragons.score.table import schema

    now = datetime.now(timezone.utc)
    s = schema(["ants", "bees"])
    data = {
        "uri": [f"s3://x/{run_id}/{i}.jpg" for i in range(start, start + n)], "label": ["ants"] * n, "score": [0.75] * n,
        "p_ants": [0.75] * n, "p_bees": [0.25] * n, "model_version": ["v1"] * n, "run_id": [run_id] * n,
        "scored_at": [now] * n, "error": [None] * n, "etag": [f"e{i}" for i in range(start, start + n)], "size": [100] * n,
        "last_modified": [now] * n, "dt": [now.strftime("%Y-%m-%d")] * n,
    }
    return pa.table(data, schema=s)


def main() -> int:
    from dragons.score.table import schema, write_run

    root, run_id, n, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    file_bytes = int(sys.argv[5]) if len(sys.argv) > 5 else None

    def batches() -> Iterator[pa.RecordBatch]:
        for start in range(0, n, 1000):
            time.sleep(delay)
            yield from rows(run_id, min(1000, n - start), start).to_batches()
            print(f"wrote {start + 1000}", flush=True)

    reader = pa.RecordBatchReader.from_batches(schema(["ants", "bees"]), batches())
    from dragons.cliargs import guarded

    def go() -> int:
        v = write_run(root, run_id, reader, {"dragons_run_id": run_id, "listed": n, "rows": n}, file_bytes)
        print(f"committed {v}", flush=True)
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
