"""The scoring actor: loads the model once, turns a block of listed objects into
table rows (one per object, an error row for any it cannot score).

Blocks arrive as Arrow tables of thousands of rows (Ray Data's cost is per
block); the model still sees ``chunk`` images at a time. Objects whose listed
size is over ``--max-bytes`` are refused with Arrow compute, without a read or
a Python loop: in an archive they can be most of a block, and they must cost
what feeding a GPU costs, not a thread hop each.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dragons import artifact, storage
from dragons.columns import NOVELTY, prediction_columns, prob_column
from dragons.decode import DecodeBatch
from dragons.errors import DragonsError
from dragons.predictor import Predictor
from dragons.rowerrors import ERROR_KIND, ErrorKind
from dragons.score.schema import PASSTHROUGH


class ModelChanged(DragonsError):
    """The artifact an actor loaded is not the one the run started with."""


def check_pinned(uri: str, version: str, classes: list[str], want_version: str, want_classes: list[str]) -> None:
    """Every actor (and every restarted one) scores with the run's model, or the run stops."""
    if version != want_version or list(classes) != list(want_classes):
        raise ModelChanged(
            f"the model at {storage.redact(uri)} changed during the run: this run scores with version "
            f"{want_version} (classes {want_classes}) but a scoring actor loaded version {version} "
            f"(classes {list(classes)}); none of its rows is committed. A run scores with one model: rescore it "
            "with the new model (--replace), or score the new model under a new --run-id"
        )


def too_large(block: pa.Table, max_bytes: int) -> pa.Array:
    """Which rows' listed size is over ``max_bytes`` (a row without a size is read, and its GET decides)."""
    if not max_bytes or "size" not in block.column_names:
        return pa.repeat(pa.scalar(False), block.num_rows)
    return pc.fill_null(pc.greater(block.column("size"), max_bytes), False).combine_chunks()


def refused_rows(block: pa.Table, classes: list[str], max_bytes: int) -> pa.Table:
    """Error rows ``too_large`` for objects refused by their listed size; the message is
    the one a read would give (``storage``'s), built column-wise."""
    n = block.num_rows
    msg = pc.binary_join_element_wise(
        f"{ErrorKind.TOO_LARGE}: ",
        block.column("uri"),
        " is ",
        pc.cast(block.column("size"), pa.string()),
        f" bytes, over the {max_bytes}-byte limit (--max-bytes)",
        "",
    )
    nulls = pa.nulls(n, pa.float64())
    cols: dict[str, Any] = {"uri": block.column("uri"), "label": pa.nulls(n, pa.string()), "score": nulls, "error": msg}
    cols[ERROR_KIND] = pa.repeat(pa.scalar(ErrorKind.TOO_LARGE.value), n)
    cols.update({prob_column(c): nulls for c in classes})
    cols[NOVELTY] = nulls
    return _with_passthrough(pa.table(cols), block)


def _with_passthrough(rows: pa.Table, block: pa.Table) -> pa.Table:
    for col in PASSTHROUGH:  # what the listing knew about the object, for --incremental
        if col in block.column_names:
            rows = rows.append_column(col, block.column(col))
    return rows


def _as_numpy(block: pa.Table) -> dict[str, np.ndarray]:
    return {c: block.column(c).to_numpy(zero_copy_only=False) for c in block.column_names}


class Scorer:
    """Ray Data actor over Arrow blocks: ``uri`` (+ listing columns) -> rows.

    With ``decode`` (CPU clusters) the actor reads and decodes the block itself,
    the next chunk on a thread while the model runs on this one (PIL and torch
    both release the GIL). Without it (GPU clusters) CPU tasks decode upstream
    and the block arrives with base squares in ``image`` and ``error``.
    """

    def __init__(
        self,
        model_uri: str,
        tta: int,
        threads: int,
        decode: DecodeBatch | None = None,
        chunk: int = 8,
        pinned: tuple[str, list[str]] | None = None,
    ) -> None:
        self.art = artifact.load(model_uri)
        if pinned is not None:
            check_pinned(model_uri, self.art.version, self.art.classes, *pinned)
        self.predictor = Predictor.from_artifact(self.art, tta=tta, threads=threads)
        self.classes = list(self.art.classes)
        self.decode, self.chunk = decode, chunk
        # One thread runs the next chunk's decode (itself fanning out on the
        # decoder's reader threads), so the model never waits on a cold chunk.
        self.prefetch = ThreadPoolExecutor(max_workers=1) if decode is not None else None

    def __call__(self, block: pa.Table | dict[str, np.ndarray]) -> pa.Table:
        if isinstance(block, dict):  # decoded upstream (numpy batches with base squares): score what decoded
            listed = pa.table({k: v for k, v in block.items() if k in ("uri", *PASSTHROUGH)})
            probs, novelty = self._probs(block)
            return self._rows(listed, probs, block["error"], block[ERROR_KIND], novelty)
        assert self.decode is not None, "Arrow blocks go to actors that decode"
        big = too_large(block, self.decode.max_bytes)
        n_big = pc.sum(big).as_py() or 0
        parts = []
        if n_big:
            parts.append(refused_rows(block.filter(big), self.classes, self.decode.max_bytes))
        rest = block.filter(pc.invert(big)) if n_big else block
        if rest.num_rows:
            parts.append(self._decode_and_score(rest))
        if not parts:
            return refused_rows(block, self.classes, self.decode.max_bytes)  # an empty block: empty rows
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")

    def _decode_and_score(self, block: pa.Table) -> pa.Table:
        """Decode chunk k+1 on the decoder's threads while the model scores chunk k."""
        assert self.decode is not None and self.prefetch is not None
        n = block.num_rows
        chunks = [_as_numpy(block.slice(i, self.chunk)) for i in range(0, n, self.chunk)]
        pending = self.prefetch.submit(self.decode, chunks[0])
        probs, novelty, errors, kinds = [], [], [], []
        for i in range(len(chunks)):
            decoded = pending.result()
            if i + 1 < len(chunks):
                pending = self.prefetch.submit(self.decode, chunks[i + 1])
            p, nov = self._probs(decoded)
            probs.append(p)
            novelty.append(nov)
            errors.append(decoded["error"])
            kinds.append(decoded[ERROR_KIND])
            del decoded  # 300 KB an image: only the probabilities go on
        return self._rows(
            block, np.concatenate(probs), np.concatenate(errors), np.concatenate(kinds), np.concatenate(novelty)
        )

    def _probs(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, novelty) of a decoded batch: NaN on error rows, and novelty NaN
        throughout for a model without novelty statistics (NULL in the table)."""
        errors = batch["error"]
        ok = np.array([not e for e in errors], dtype=bool)
        probs = np.full((len(errors), len(self.classes)), np.nan, dtype=np.float64)
        novelty = np.full(len(errors), np.nan, dtype=np.float64)
        if ok.any():
            p, nov = self.predictor.numpy_with_novelty(batch["image"] if ok.all() else batch["image"][ok])
            probs[ok] = p
            if nov is not None:
                novelty[ok] = nov
        return probs, novelty

    def _rows(
        self, block: pa.Table, probs: np.ndarray, errors: np.ndarray, kinds: np.ndarray, novelty: np.ndarray
    ) -> pa.Table:
        """The table's rows; ``errors`` and ``kinds`` are the decoder's, "" where the image decoded."""
        cols = prediction_columns(self.classes, probs, list(errors), novelty)
        rows = pa.table(
            {
                "uri": block.column("uri"),
                "label": pa.array(cols.pop("label"), pa.string()),
                "score": pa.array(cols.pop("score"), pa.float64(), from_pandas=True),
                "error": pa.array(cols.pop("error"), pa.string()),
                ERROR_KIND: pa.array([k or None for k in kinds], pa.string()),
                **{k: pa.array(v, pa.float64(), from_pandas=True) for k, v in cols.items()},
            }
        )
        return _with_passthrough(rows, block)
