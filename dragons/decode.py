"""The Ray Data decode steps shared by training and scoring, over one reader.

* :func:`read_one`: an object's bytes (S3 or disk) or its row error, ``kind: message``;
* :func:`classify`: every exception a step can meet as that error (a
  :class:`~dragons.rowerrors.RowError`), one mapping; :func:`row_error` its text;
* :class:`DecodeBatch`: ``uri`` -> base-square ``image``, ``error`` and ``error_kind``
  (scoring, training's Ray Data decode actors, the scoring actors' own decode on CPUs);
* :class:`ScanBatch`: ``uri`` -> ``short_side`` and ``error`` (training's first pass).

Deliberately light: numpy, PIL, pyarrow and boto3 only. Ray starts many
decode worker processes; importing torch in each would cost seconds of CPU
apiece before the first image is read.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from dragons import storage
from dragons.errors import DragonsError
from dragons.images import DecodeOptions, ImageError, decode, decode_to_base
from dragons.rowerrors import ERROR_KIND, ErrorKind, RowError

# Per-process caches. Ray unpickles the callable for every task, so anything
# kept on the instance would be rebuilt per task: a boto3 client costs ~0.3 s
# of CPU to create, more than decoding a whole block.
_CLIENTS: dict[str, Any] = {}
_POOLS: dict[int, Any] = {}

# Bytes one object may have before it is refused unread (error row ``too_large``):
# several reader threads per decode task hold whole objects in memory, so one
# multi-GB object under the prefix could get the decode worker OOM-killed.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Concurrent reads per decode task: object stores answer in tens of milliseconds.
IO_THREADS = 8


def classify(exc: BaseException) -> RowError:
    """An image's failure as its row error: a stable kind (docs/tables.md) and a message."""
    if isinstance(exc, ImageError):
        return RowError(exc.kind, exc.message)
    if isinstance(exc, storage.ObjectError):  # not_found, too_large, access_denied, read_error
        return RowError(exc.kind, str(exc))
    if isinstance(exc, DragonsError):
        return RowError(ErrorKind.READ_ERROR, str(exc))
    # Never lose a row to a decoder bug.
    return RowError(ErrorKind.DECODE_ERROR, f"{type(exc).__name__}: {storage.shorten(str(exc), 200)}")


def row_error(exc: BaseException) -> str:
    """An image's failure as its row's ``error`` text, ``kind: message``."""
    return str(classify(exc))


def read_one(uri: str, size: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes | str:
    """The object's bytes, or its row error (``kind: message``) when it cannot be read."""
    data = _read(uri, size, max_bytes)
    return data if isinstance(data, bytes) else str(data)


def _read(uri: str, size: int | None, max_bytes: int) -> bytes | RowError:
    """The object's bytes, or its row error when it cannot be read."""
    try:
        loc = storage.object_location(uri)  # a listed key verbatim: s3://b//x.jpg is not s3://b/x.jpg
        if loc.is_s3:
            # One GET per object through boto3: pyarrow's stream opens with a HEAD
            # first, doubling requests (and S3 cost) for small objects.
            if "s3" not in _CLIENTS:  # one client per process (thread-safe), not per file
                _CLIENTS["s3"] = storage.boto3_client(max_pool_connections=IO_THREADS)
            return storage.get_object(_CLIENTS["s3"], loc, max_bytes, size)
        if "file" not in _CLIENTS:
            _CLIENTS["file"] = storage.filesystem(uri)[0]
        return storage.read_bytes(uri, _CLIENTS["file"], max_bytes)
    except Exception as exc:  # noqa: BLE001 (every failure is the row's error)
        return classify(exc)


def _map_uris(batch: dict[str, np.ndarray], one: Callable[[str, int | None], Any], threads: int) -> list[Any]:
    """``one(uri, size)`` over a batch's rows on ``threads`` reader threads of the
    process (PIL releases the GIL while decoding and resizing: decodes overlap too)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads)
    n = len(batch["uri"])
    # A "size" column (the listing's) lets the byte limit act before any request.
    # A --manifest lists no sizes: nulls arrive as None or NaN, and the GET's length decides.
    sizes = [_size(x) for x in batch["size"]] if "size" in batch else [None] * n
    return list(_POOLS[threads].map(lambda item: one(*item), zip([str(u) for u in batch["uri"]], sizes)))


class DecodeBatch:
    """Ray Data map: ``uri`` -> base-square ``image`` plus ``error`` and ``error_kind``
    strings (both "" where the image decoded).

    A failure never raises: the row keeps a black image and the reason, so the
    driver can report it by name and drop it (training) or write it (scoring).
    """

    def __init__(
        self, base_size: int, max_pixels: int, io_threads: int = IO_THREADS, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.base_size = base_size
        self.max_pixels = max_pixels
        self.io_threads = io_threads
        self.max_bytes = max_bytes

    def _one(self, uri: str, size: int | None) -> tuple[np.ndarray | None, RowError | None]:
        data = _read(uri, size, self.max_bytes)
        if isinstance(data, RowError):
            return None, data
        try:
            return decode_to_base(data, self.base_size, self.max_pixels), None
        except Exception as exc:  # noqa: BLE001 (the row's error)
            return None, classify(exc)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        images = np.zeros((n, self.base_size, self.base_size, 3), dtype=np.uint8)
        errors: list[str] = []
        kinds: list[str] = []
        for i, (img, err) in enumerate(_map_uris(batch, self._one, self.io_threads)):
            if img is not None:
                images[i] = img
            errors.append("" if err is None else str(err))
            kinds.append("" if err is None else err.kind.value)
        out = dict(batch)
        out["image"] = images
        out["error"] = np.array(errors, dtype=object)
        out[ERROR_KIND] = np.array(kinds, dtype=object)
        return out


class ScanBatch:
    """Ray Data map: ``uri`` -> ``error`` and ``short_side`` (pixels), nothing else.

    The training driver's first pass: every image is read and decoded once (at
    a reduced JPEG scale: a broken or truncated file still fails) so that bad
    ones are reported by name and left out before the workers cut their shards,
    and the data's resolution is known for the recipe. No pixels leave the task.
    """

    def __init__(self, max_pixels: int, io_threads: int = IO_THREADS, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_pixels = max_pixels
        self.io_threads = io_threads
        self.max_bytes = max_bytes

    def _one(self, uri: str, size: int | None) -> tuple[int, str]:
        data = read_one(uri, size, self.max_bytes)
        if isinstance(data, str):
            return 0, data
        try:
            try:
                with Image.open(io.BytesIO(data)) as im:  # header only: the stored resolution
                    short = min(im.size)
            except Exception:  # noqa: BLE001 (decode below names the problem)
                short = 0
            decode(data, DecodeOptions(max_pixels=self.max_pixels, min_side=32))
            return short, ""
        except Exception as exc:  # noqa: BLE001 (the row's error)
            return 0, row_error(exc)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = _map_uris(batch, self._one, self.io_threads)
        return {
            "split": batch["split"],
            "pos": batch["pos"],
            "short_side": np.array([r[0] for r in res], dtype=np.int32),
            "error": np.array([r[1] for r in res], dtype=object),
        }


def _size(value: object) -> int | None:
    """A listing size, or None where the input gave none (null, or NaN after numpy)."""
    if value is None:
        return None
    f = float(value)  # type: ignore[arg-type]
    return None if math.isnan(f) else int(f)
