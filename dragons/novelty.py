"""What the model does not know: a ``novelty`` score per image.

The Mahalanobis distance (Lee et al. 2018) of an image's penultimate features
(the body's pooled output, what the head reads, scaled to unit length) to the
nearest class mean under one covariance shared by all classes, fitted at
training on the training images with the final model. Unit length because an
image's overall activation level says more about its exposure than about its
content: on hymenoptera vs flowers5 it moves the AUROC from 0.947 to 0.98
(benchmarks/bench_novelty.py). Stored compactly in ``model.json`` (``meta["novelty"]``):
Lite0's features have 1280 dimensions, and a full precision matrix in JSON would
be ~30 MB. So the features are first projected on the training set's top
``dim`` principal directions (the directions the training images vary in), and
the tied covariance is fitted there; the projection and the whitening then fold
into one (D, k) matrix ``A``:

    novelty(f) = min_c || (u - m) A - c_c ||        (u = f / |f|, A = P L, L L^T = precision)

so scoring costs one (batch, D) x (D, k) product. What the k directions leave
out is not ignored: the rest of the tied covariance is taken as isotropic (as
probabilistic PCA does), so an image off the training directions adds its
residual ``|u - m|^2 - |P^T (u - m)|^2`` over the discarded directions' mean
within-class variance (a feature far out where the training set never varied is
the plainest sign of something new). Matrices are kept as base64 float32
(0.45 MB for D = 1280, k = 64), decoded with ``np.frombuffer``: no pickle.

The fit needs only sufficient statistics (per-class counts and sums, and the
sum of outer products), which data-parallel workers add up with one all-reduce.
``threshold_p95`` is the 95th percentile of held-out novelty (the validation
images when there are any: the training images' own distances are optimistic,
since the statistics were fitted on them); ``share above`` it is what reports
and ``--fail-on-novelty`` compare.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from dragons.errors import DragonsError

METHOD = "mahalanobis-pca-l2"
# Principal directions kept: 0.45 MB of model.json for Lite0. Measured on hymenoptera vs
# flowers5 (AUROC): 32 0.90, 64 0.983, 128 0.980, 240 0.980 (bench_novelty.py --refit).
DIM = 64
# Shrinkage of the tied covariance towards its mean variance (as Ledoit-Wolf does):
# with a few hundred training images the smallest eigenvalues are noise, and
# inverted they would dominate every distance.
SHRINK = 0.1


@dataclass
class Stats:
    """Sufficient statistics of features (float64): they add up across ranks and batches."""

    count: np.ndarray  # (C,) images per class
    sums: np.ndarray  # (C, D) feature sums per class
    outer: np.ndarray  # (D, D) sum of f f^T over every image

    @classmethod
    def of(cls, feats: np.ndarray, labels: np.ndarray, num_classes: int) -> Stats:
        """Statistics of raw body features (scaled to unit length here, as :meth:`Novelty.score` does)."""
        f = np.asarray(feats, dtype=np.float64)
        f = unit(f.reshape(len(labels), f.shape[-1]))
        y = np.asarray(labels, dtype=np.int64)
        onehot = np.zeros((len(y), num_classes))
        onehot[np.arange(len(y)), y] = 1.0
        return cls(onehot.sum(0), onehot.T @ f, f.T @ f)

    def __add__(self, other: Stats) -> Stats:
        return Stats(self.count + other.count, self.sums + other.sums, self.outer + other.outer)

    def all_reduce(self) -> Stats:
        """The sums over every training rank (a collective when there are several)."""
        import torch  # heavy: only training workers reduce
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        c, d = self.sums.shape
        flat = torch.from_numpy(np.concatenate([self.count, self.sums.ravel(), self.outer.ravel()]))
        dist.all_reduce(flat)
        v = flat.numpy()
        return Stats(v[:c], v[c : c + c * d].reshape(c, d), v[c + c * d :].reshape(d, d))


def _encode(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "float32_b64": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode(d: dict[str, Any], what: str) -> np.ndarray:
    try:
        shape = tuple(int(s) for s in d["shape"])
        a = np.frombuffer(base64.b64decode(d["float32_b64"]), dtype="<f4")
        return a.reshape(shape).astype(np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise DragonsError(
            f"model.json's novelty.{what} is malformed ({exc}): retrain the model, or delete its "
            "'novelty' key to score without novelty"
        ) from None


@dataclass
class Novelty:
    """A fitted scorer: ``score(features)`` -> distance to the nearest class mean."""

    offset: np.ndarray  # (D,) the training features' mean
    proj: np.ndarray  # (D, k) projection and whitening in one
    centers: np.ndarray  # (C, k) class means, projected and whitened
    fitted_on: int
    unwhite: np.ndarray | None = None  # (k, k): z @ unwhite = P^T (f - m), for the residual
    residual_var: float | None = None  # the discarded directions' mean within-class variance (None: no residual)
    threshold_p95: float | None = None
    threshold_from: str = ""  # "valid" or "train": whose novelty the threshold is the 95th percentile of

    @property
    def dim(self) -> int:
        return int(self.proj.shape[0])

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Novelty (float64) of each row of ``feats`` (N, D)."""
        centered = unit(np.asarray(feats, dtype=np.float32)) - self.offset
        return distance(centered, centered @ self.proj, self.centers, self.unwhite, self.residual_var).astype(
            np.float64
        )

    def share_above(self, novelty: np.ndarray) -> float | None:
        if self.threshold_p95 is None or len(novelty) == 0:
            return None
        return float(np.mean(np.asarray(novelty) > self.threshold_p95))

    def to_meta(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "dim": self.dim,
            "k": int(self.proj.shape[1]),
            "classes": len(self.centers),
            "fitted_on": int(self.fitted_on),
            "threshold_p95": self.threshold_p95,
            "threshold_from": self.threshold_from,
            "offset": _encode(self.offset),
            "proj": _encode(self.proj),
            "centers": _encode(self.centers),
            "unwhite": _encode(self.unwhite) if self.unwhite is not None else None,
            "residual_var": self.residual_var,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> Novelty | None:
        """The scorer in an artifact's ``model.json`` (its ``meta``), or None when it has none."""
        nov = (meta or {}).get("novelty")
        if not nov:
            return None
        if nov.get("method") != METHOD:
            raise DragonsError(
                f"model.json's novelty method {nov.get('method')!r} is not one this dragons knows "
                f"({METHOD}): upgrade dragons, or delete the 'novelty' key to score without novelty"
            )
        out = cls(
            _decode(nov["offset"], "offset"),
            _decode(nov["proj"], "proj"),
            _decode(nov["centers"], "centers"),
            int(nov.get("fitted_on", 0)),
            _decode(nov["unwhite"], "unwhite") if nov.get("unwhite") else None,
            float(nov["residual_var"]) if nov.get("residual_var") else None,
            nov.get("threshold_p95"),
            str(nov.get("threshold_from", "")),
        )
        if out.offset.shape != (out.dim,) or out.centers.shape[1] != out.proj.shape[1]:
            raise DragonsError(
                "model.json's novelty matrices do not fit together: retrain the model, or delete its "
                "'novelty' key to score without novelty"
            )
        return out


def unit(feats: Any) -> Any:
    """Rows scaled to unit length (numpy or torch alike; a zero row stays zero)."""
    if hasattr(feats, "clamp_min"):
        return feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def _nonneg(x: Any) -> Any:
    return x.clamp_min(0) if hasattr(x, "clamp_min") else np.maximum(x, 0)


def distance(centered: Any, z: Any, centers: Any, unwhite: Any | None, residual_var: float | None) -> Any:
    """Novelty from ``centered = f - m`` and ``z = centered @ proj`` (numpy or torch alike):
    the whitened distance to the nearest class center (``|z|^2 - 2 z c + |c|^2``, one matrix
    product), plus the residual off the kept directions over its variance when there is one."""
    d2 = (z * z).sum(1)[:, None] - 2 * z @ centers.T + (centers * centers).sum(1)[None, :]
    m = d2.min(1)
    m = _nonneg(m.values if hasattr(m, "values") else m)  # torch's min returns (values, indices)
    if unwhite is not None and residual_var:
        kept = z @ unwhite
        m = m + _nonneg((centered * centered).sum(1) - (kept * kept).sum(1)) / residual_var
    return m.sqrt() if hasattr(m, "sqrt") else np.sqrt(m)


def fit(stats: Stats, dim: int = DIM, shrink: float = SHRINK) -> Novelty:
    """The scorer from summed statistics: principal directions of all features,
    then the within-class (tied) covariance there, shrunk, inverted and folded in."""
    n = float(stats.count.sum())
    if n < 2:
        raise DragonsError(f"novelty statistics need at least 2 training images, got {int(n)}")
    present = stats.count > 0
    m = stats.sums.sum(0) / n
    total = stats.outer / n - np.outer(m, m)
    evals, evecs = np.linalg.eigh((total + total.T) / 2)
    k = max(1, min(dim, int(n) - 1, len(evals)))
    p = evecs[:, np.argsort(evals)[::-1][:k]]  # (D, k), the directions of most variance first
    means = np.where(present[:, None], stats.sums / np.maximum(stats.count, 1)[:, None], m)
    # Tied covariance: the total scatter less the class means' share, over n.
    within = stats.outer - (means * stats.count[:, None]).T @ means
    cov = p.T @ (within / n) @ p
    cov = (cov + cov.T) / 2
    ridge = max(float(np.trace(cov)) / k, 1e-12)
    cov = (1 - shrink) * cov + shrink * ridge * np.eye(k)
    # precision = L L^T with L = V diag(1/sqrt(lambda)): whitening folds into the projection.
    w, v = np.linalg.eigh(cov)
    white = v / np.sqrt(np.maximum(w, 1e-12 * ridge))
    proj = p @ white
    centers = ((means - m) @ proj)[present]
    # The within-class variance the kept directions leave, spread over the rest (probabilistic PCA's sigma^2).
    rest = len(evals) - k
    residual_var = (float(np.trace(within) / n - np.trace(p.T @ (within / n) @ p)) / rest) if rest else 0.0
    residual = residual_var > 1e-12 * ridge
    return Novelty(
        m.astype(np.float32),
        proj.astype(np.float32),
        centers.astype(np.float32),
        int(n),
        np.linalg.pinv(white).astype(np.float32) if residual else None,
        residual_var if residual else None,
    )


def with_threshold(nov: Novelty, held_out: np.ndarray | None, train: np.ndarray) -> Novelty:
    """Set ``threshold_p95``: the 95th percentile of held-out novelty, else the training images'."""
    scores, source = (held_out, "valid") if held_out is not None and len(held_out) else (train, "train")
    nov.threshold_p95 = float(np.percentile(scores, 95)) if len(scores) else None
    nov.threshold_from = source
    return nov


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The probability that an outside row scores above an inside row (ties count half):
    the area under the ROC curve with ``outside`` as positives."""
    a, b = np.asarray(inside, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    if not len(a) or not len(b):
        raise ValueError("auroc needs rows on both sides")
    allv = np.concatenate([a, b])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    rb = ranks[len(a) :].sum()
    return float((rb - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))
