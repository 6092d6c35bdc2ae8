"""The Ray Data decode step shared by training and scoring.

Deliberately light: numpy, PIL, pyarrow and boto3 only. Ray starts many
decode worker processes; importing torch in each would cost seconds of CPU
apiece before the first image is read.
"""

from __future__ import annotations

import math

from typing import Any

import numpy as np

from dragons import storage
from dragons.errors import DragonsError
from dragons.images import ImageError, decode_to_base

# Per-process caches. Ray unpickles the callable for every task, so anything
# kept on the instance would be rebuilt per task: a boto3 client costs ~0.3 s
# of CPU to create, more than decoding a whole block.
_CLIENTS: dict[str, Any] = {}

# Bytes one object may have before it is refused unread (error row ``too_large``):
# several reader threads per decode task hold whole objects in memory, so one
# multi-GB object under the prefix could get the decode worker OOM-killed.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_POOLS: dict[int, Any] = {}


class DecodeBatch:
    """Ray Data map: ``uri`` -> base-square ``image`` plus an ``error`` string.

    A failure never raises: the row keeps a black image and the reason, so the
    driver can report it by name and drop it (training) or write it (scoring).
    """

    def __init__(self, base_size: int, max_pixels: int, io_threads: int = 8, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.base_size = base_size
        self.max_pixels = max_pixels
        self.io_threads = io_threads
        self.max_bytes = max_bytes

    def _read(self, uri: str, size: int | None = None) -> bytes:
        loc = storage.object_location(uri)  # a listed key verbatim: s3://b//x.jpg is not s3://b/x.jpg
        if loc.is_s3:
            # One GET per object through boto3: pyarrow's stream opens with a HEAD
            # first, doubling requests (and S3 cost) for small objects.
            if "s3" not in _CLIENTS:  # one client per process (thread-safe), not per file
                _CLIENTS["s3"] = storage.boto3_client(max_pool_connections=self.io_threads)
            return storage.get_object(_CLIENTS["s3"], loc, self.max_bytes, size)
        if "file" not in _CLIENTS:
            _CLIENTS["file"] = storage.filesystem(uri)[0]
        return storage.read_bytes(uri, _CLIENTS["file"], self.max_bytes)

    def _one(self, item: tuple[str, int | None]) -> tuple[np.ndarray | None, str]:
        uri, size = item
        try:
            return decode_to_base(self._read(uri, size), self.base_size, self.max_pixels), ""
        except ImageError as exc:
            return None, f"{exc.reason}: {exc.message}"
        except storage.ObjectError as exc:  # stable code first: not_found, too_large, access_denied, read_error
            return None, f"{exc.code}: {exc}"
        except DragonsError as exc:
            return None, f"read_error: {exc}"
        except Exception as exc:  # never lose a row to an unexpected decoder bug
            return None, f"decode_error: {type(exc).__name__}: {str(exc)[:200]}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        images = np.zeros((n, self.base_size, self.base_size, 3), dtype=np.uint8)
        if self.io_threads not in _POOLS:
            from concurrent.futures import ThreadPoolExecutor

            # Object stores answer in tens of milliseconds: overlap the GETs. PIL
            # releases the GIL while decoding and resizing, so decodes overlap too.
            _POOLS[self.io_threads] = ThreadPoolExecutor(max_workers=self.io_threads)
        errors: list[str] = []
        # A "size" column (the listing's) lets the byte limit act before any request.
        # A --manifest lists no sizes: nulls arrive as None or NaN, and the GET's length decides.
        sizes = [_size(x) for x in batch["size"]] if "size" in batch else [None] * n
        items = list(zip([str(u) for u in batch["uri"]], sizes))
        for i, (img, err) in enumerate(_POOLS[self.io_threads].map(self._one, items)):
            if img is not None:
                images[i] = img
            errors.append(err)
        out = dict(batch)
        out["image"] = images
        out["error"] = np.array(errors, dtype=object)
        return out


def _size(value: object) -> int | None:
    """A listing size, or None where the input gave none (null, or NaN after numpy)."""
    if value is None:
        return None
    f = float(value)  # type: ignore[arg-type]
    return None if math.isnan(f) else int(f)
