"""``--incremental``: which listed objects the table already holds for this model version.

The table's ``latest`` rows for the model version are read with only three
columns (uri, etag, size) and the model version filter pushed into the scan,
and kept as one sorted array of 64-bit hashes (8 bytes an object, not a Python
set of strings). Each listing page is hashed the same way and filtered with a
binary search. A 64-bit collision (probability ~ n^2 / 2^65, about 3e-6 for 10M
objects) would skip one changed object for one night.

An object is rescored when it is new, its etag or size changed, the model
version changed, or its last row is a ``read_error`` (possibly transient).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from dragons.errors import DragonsError

_HASH = "hash(uri::VARCHAR, coalesce(etag, '')::VARCHAR, coalesce(size, -1)::BIGINT)"


class KnownObjects:
    """Hashes of (uri, etag, size) already scored by one model version."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.hashes = np.sort(hashes.astype(np.uint64))
        import duckdb

        self._con = duckdb.connect(":memory:", config={"threads": 1})

    def __len__(self) -> int:
        return int(self.hashes.size)

    def unseen(self, page: pa.Table) -> pa.Table:
        """The rows of a listing page that still need scoring."""
        if page.num_rows == 0 or self.hashes.size == 0:
            return page
        self._con.register("page", page)
        h = self._con.execute(f"SELECT {_HASH} AS h FROM page").fetchnumpy()["h"].astype(np.uint64)
        self._con.unregister("page")
        pos = np.searchsorted(self.hashes, h)
        pos = np.minimum(pos, self.hashes.size - 1)
        seen = self.hashes[pos] == h
        return page.filter(pa.array(~seen))

    def close(self) -> None:
        self._con.close()


def known_objects(table_root: str, model_version: str, run_id: str) -> KnownObjects:
    """Objects the table holds for ``model_version``; empty when there is no table yet.

    Rows of ``run_id`` itself do not count: its commit replaces them, so a rerun
    of a night under the same id must score that night's objects again, or the
    commit would delete rows it never re-wrote."""
    from deltalake import DeltaTable

    from dragons.score.query import QueryLimits, connect
    from dragons.score.table import storage_options, table_uri

    uri = table_uri(table_root)
    if not DeltaTable.is_deltatable(uri, storage_options=storage_options(uri)):
        return KnownObjects(np.zeros(0, np.uint64))
    con: Any = connect(table_root, limits=QueryLimits(timeout_s=0))
    try:
        sql = (f"SELECT {_HASH} AS h FROM (SELECT uri, etag, size, error FROM scores WHERE model_version = $v AND run_id <> $r "
               "QUALIFY row_number() OVER (PARTITION BY uri ORDER BY scored_at DESC, run_id DESC) = 1) "
               "WHERE error IS NULL OR NOT starts_with(error, 'read_error')")
        try:
            hashes = con.execute(sql, {"v": model_version, "r": run_id}).fetchnumpy()["h"]
        except Exception as exc:
            raise DragonsError(f"--incremental: cannot read what {uri} already holds: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
    return KnownObjects(np.asarray(hashes, dtype=np.uint64))
