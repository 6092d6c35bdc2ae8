"""The model artifact: ``model.pt`` (a state dict) + ``model.json`` (metadata).

Loading needs no Ray and uses ``torch.load(..., weights_only=True)``, so an
artifact from an untrusted bucket cannot run code. ``version`` is a content hash
of the weights: scoring tables record it, so every row says which model made it.
Wherever a model URI is read, ``ROOT@alias`` / ``ROOT@<version>`` name a version
in a registry (dragons.loop.versions), resolved once.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch

from dragons import __version__, storage
from dragons.dataconfig import DataConfig
from dragons.errors import DragonsError
from dragons.loop import versions
from dragons.loop.versions import META_FILE, WEIGHTS_FILE  # the file names live there: it must not import torch
from dragons.models.registry import Classifier, build_model


@dataclass
class Artifact:
    model: Classifier
    meta: dict[str, Any]
    uri: str

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def data(self) -> DataConfig:
        """How an image becomes this model's input (size, crop, normalisation)."""
        return DataConfig.from_meta(self.meta)

    @property
    def temperature(self) -> float:
        """The calibration temperature fitted at training (dragons.calibration); 1 for older artifacts."""
        return float(self.meta.get("temperature", 1.0))

    @property
    def version(self) -> str:
        return str(self.meta["version"])


def base_size_of(meta: dict[str, Any]) -> int:
    """Side of the square images are decoded to (from model.json alone: no weights loaded)."""
    return DataConfig.from_meta(meta).base_size


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, buf)
    return buf.getvalue()


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def save(out: str, model: torch.nn.Module, meta: dict[str, Any], register: bool = False) -> dict[str, Any]:
    """Write the weights, then ``model.json`` last (a reader never sees a half artifact).

    ``register`` (``dragons train``): ``out`` is a registry too: the same two files also go to
    ``out/versions/<version>/`` first (never replaced), and alias ``latest`` moves to it last.
    A top-level artifact from before registries is kept as a version before it is replaced.
    """
    for key in ("arch", "classes", "data_config", "metrics"):
        if key not in meta:
            raise ValueError(f"artifact metadata lacks {key!r}")
    weights = state_dict_bytes(model)
    data = DataConfig.from_meta(meta)
    # The data config again as loose keys, as artifacts before data_config had it:
    # what older dragons (and scripts written for them) read.
    legacy = {
        "image_size": data.image_size,
        "base_size": data.base_size,
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
    }
    # Redacted: meta carries the training config, whose URIs may hold a secret.
    created = meta.get("created_at") or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    full = storage.redact_obj(
        {
            **meta,
            **legacy,
            "version": content_hash(weights),
            "dragons_version": __version__,
            "weights_file": WEIGHTS_FILE,
            "created_at": created,
        }
    )
    text = json.dumps(full, indent=2, sort_keys=True).encode()
    if register:
        versions.adopt(out)  # the artifact being replaced, if it predates registries: kept, not lost
        versions.write_version(out, full["version"], weights, text)
    storage.write_bytes(storage.join(out, WEIGHTS_FILE), weights)
    storage.write_bytes(storage.join(out, META_FILE), text)
    if register:
        versions.set_latest(out, full["version"])
    return full


def read_meta(uri: str) -> dict[str, Any]:
    """model.json of an artifact folder (or of its ``model.json``, or of ``ROOT@alias`` / ``ROOT@<version>``)."""
    uri = versions.artifact_dir(uri)
    base = uri[: -len(META_FILE)].rstrip("/") if uri.rstrip("/").endswith(META_FILE) else uri
    meta_uri = storage.join(base, META_FILE)
    if not storage.exists(meta_uri):
        raise DragonsError(
            f"no model artifact at {uri}: {meta_uri} is missing (train one with `dragons train --out {uri}`)"
        )
    try:
        return dict(json.loads(storage.read_bytes(meta_uri)))
    except json.JSONDecodeError as exc:
        raise DragonsError(f"{meta_uri} is not valid JSON: {exc}") from None


def load(uri: str, map_location: str | torch.device = "cpu") -> Artifact:
    """Load an artifact directory (or its ``model.json``, or ``ROOT@alias`` / ``ROOT@<version>``)
    from disk or S3; ``Artifact.uri`` is the folder the weights came from."""
    uri = versions.artifact_dir(uri)  # resolved once: the weights and model.json come from one version's folder
    base = uri[: -len(META_FILE)].rstrip("/") if uri.rstrip("/").endswith(META_FILE) else uri
    meta = read_meta(base)
    raw = storage.read_bytes(storage.join(base, meta.get("weights_file", WEIGHTS_FILE)))
    if content_hash(raw) != meta.get("version"):
        raise DragonsError(
            f"{base}: weights do not match model.json's version hash; the artifact is corrupt or half-written"
        )
    state = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    model = build_model(meta["arch"], len(meta["classes"]), weights="none")
    model.load_state_dict(state)
    model.eval()
    return Artifact(model=model, meta=meta, uri=storage.parse(base).uri)
