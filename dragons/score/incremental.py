"""Which listed objects a run still has to score: resume and ``--incremental``.

Two sets, both read from the table *as of one version* (fixed when the run
starts, so a retried listing task filters exactly as the first try did), each
kept as one sorted array of 64-bit hashes (8 bytes an object, not a Python set
of strings):

* **done**: objects this run id already holds (committed parts of an earlier,
  killed attempt). They are kept as they are and skipped: that is resume.
* **known** (``--incremental`` only): objects whose ``latest`` row for this
  model version, in another run, has the same etag and size and is not a
  transient error. A new model version therefore scores everything.

Each listing page is hashed the same way and filtered with a binary search. A
64-bit collision (probability ~ n^2 / 2^65, about 3e-6 for 10M objects) would
skip one object for one night.

Error kinds: a row's ``error`` is ``kind: message``. Permanent kinds describe
the object itself and stay until it changes; every other kind (``read_error``,
``access_denied``, ``not_found``, timeouts, and any kind not listed) may be
transient: ``--incremental`` scores those objects again, and
``--retry-errors`` scores every error row again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from dragons.errors import DragonsError
from dragons.score.schema import newest_row

# Kinds an unchanged object keeps: its bytes are what they are.
PERMANENT_ERRORS = ("empty", "not_an_image", "truncated", "too_large", "decode_error")
# Kinds the decoder writes that another night may not see again (documented; anything
# not in PERMANENT_ERRORS is treated as transient).
TRANSIENT_ERRORS = ("read_error", "access_denied", "not_found", "timeout")

_OBJECT_HASH = "hash(uri::VARCHAR, coalesce(etag, '')::VARCHAR, coalesce(size, -1)::BIGINT)"
_URI_HASH = "hash(uri::VARCHAR)"


def _sorted(hashes: Any) -> np.ndarray:
    return np.sort(np.asarray(hashes, dtype=np.uint64))


def _member(sorted_hashes: np.ndarray, h: np.ndarray) -> np.ndarray:
    if sorted_hashes.size == 0:
        return np.zeros(h.size, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_hashes, h), sorted_hashes.size - 1)
    return np.asarray(sorted_hashes[pos] == h)


@dataclass
class Skips:
    """The objects a run skips: ``done`` (this run's, by uri) and ``known`` (unchanged)."""

    done: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    known: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    _con: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.done, self.known = _sorted(self.done), _sorted(self.known)

    def split(self, page: pa.Table) -> tuple[pa.Table, int, int]:
        """(rows still to score, rows this run already holds, rows unchanged since an earlier run)."""
        if page.num_rows == 0 or (self.done.size == 0 and self.known.size == 0):
            return page, 0, 0
        if self._con is None:
            import duckdb

            self._con = duckdb.connect(":memory:", config={"threads": 1})
        self._con.register("page", page)
        h = self._con.execute(f"SELECT {_URI_HASH} AS u, {_OBJECT_HASH} AS o FROM page").fetchnumpy()
        self._con.unregister("page")
        done = _member(self.done, np.asarray(h["u"], dtype=np.uint64))
        known = _member(self.known, np.asarray(h["o"], dtype=np.uint64)) & ~done
        return page.filter(pa.array(~(done | known))), int(done.sum()), int(known.sum())

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


def load_skips(table_root: str, version: int | None, model_version: str, run_id: str, incremental: bool,
               retry_errors: bool = False) -> Skips:
    """What run ``run_id`` skips, read from the table as of ``version`` (None: no table yet)."""
    if version is None:
        return Skips()
    from dragons.score.query import QueryLimits, connect

    uri = table_root
    con: Any = connect(table_root, as_of=version, limits=QueryLimits(timeout_s=0), commit_log=False)
    try:
        try:
            done = con.execute(f"SELECT {_URI_HASH} AS h FROM scores WHERE run_id = $r", {"r": run_id}).fetchnumpy()["h"]
            known: Any = np.zeros(0, np.uint64)
            if incremental:
                kept = "error IS NULL" if retry_errors else "error IS NULL OR split_part(error, ':', 1) IN $permanent"
                sql = (f"SELECT {_OBJECT_HASH} AS h FROM (SELECT uri, etag, size, error FROM scores "
                       "WHERE model_version = $v AND run_id <> $r "
                       f"{newest_row('uri')}) "
                       f"WHERE {kept}")
                params: dict[str, Any] = {"v": model_version, "r": run_id}
                if not retry_errors:
                    params["permanent"] = list(PERMANENT_ERRORS)
                known = con.execute(sql, params).fetchnumpy()["h"]
        except Exception as exc:
            raise DragonsError(f"cannot read what {uri} already holds for run {run_id}: "
                               f"{str(exc).splitlines()[0]}") from None
    finally:
        con.close()
    return Skips(done=done, known=known)
