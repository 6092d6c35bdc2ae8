"""Novelty benchmark: does ``novelty`` tell images the model never saw the like of?

    python benchmarks/bench_novelty.py                        # train hymenoptera at defaults into --out, then measure
    python benchmarks/bench_novelty.py --model /tmp/dragons-novelty-hymenoptera   # an existing artifact
    python benchmarks/bench_novelty.py --smallest             # seconds: an ImageNet body, a few images (the suite)

In-distribution: hymenoptera's 153 ``val/`` photos (ants, bees); out of
distribution: flowers5's 868 ``valid/`` photos. Both are scored through the one
inference path (``dragons.predictor.predict_rows``) and the figures are:

* AUROC of ``novelty`` (flowers as positives; target >= 0.95);
* AUROC of max-softmax, ``1 - max p``, on the same images in the same run (the
  baseline a confidence threshold gives);
* the share of flowers the model is sure of (top probability >= 0.9): what
  confidence alone would let through;
* the share of each set above the artifact's ``threshold_p95`` (for hymenoptera
  ~5% by construction: the threshold is the 95th percentile of these very
  validation images' novelty, as training measures it).

Measured 2026-12-07 on 2 busy CPU cores, hymenoptera trained at defaults (valid
accuracy 0.967): AUROC novelty 0.982, AUROC 1 - max p 0.879; 59.7% of the
flowers get a top probability >= 0.9, 98.2% of them are above the threshold.

``--refit DIM:SHRINK`` (repeatable) refits the statistics on hymenoptera's
``train/`` features here with other settings and reports their AUROC too: how
the defaults in dragons.novelty were chosen. Not a test: figures depend on the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

from dragons import artifact, novelty
from dragons.images import decode_to_base
from dragons.predictor import Predictor, predict_rows

IMAGE_EXT = (".jpg", ".jpeg", ".png")


def images_under(root: Path, limit: int = 0) -> tuple[list[str], list[str]]:
    """(paths, class folder names) of every image under ``root/<class>/``, sorted; ``limit`` per class."""
    paths, labels = [], []
    for cls in sorted(d.name for d in root.iterdir() if d.is_dir()):
        files = sorted(f for f in (root / cls).iterdir() if f.suffix.lower() in IMAGE_EXT)
        for f in files[: limit or None]:
            paths.append(str(f))
            labels.append(cls)
    return paths, labels


def fit_here(
    art: artifact.Artifact,
    paths: list[str],
    labels: list[str],
    dim: int,
    shrink: float,
    held_out: np.ndarray | None = None,
) -> novelty.Novelty:
    """Statistics fitted on ``paths``' eval-view features with this process's predictor (what training does)."""
    pred = Predictor.from_artifact(art)
    base = art.data.base_size
    feats = np.concatenate(
        [
            pred.features(np.stack([decode_to_base(Path(p).read_bytes(), base) for p in paths[i : i + 32]]))
            for i in range(0, len(paths), 32)
        ]
    )
    y = np.array([art.classes.index(c) for c in labels])
    nov = novelty.fit(novelty.Stats.of(feats, y, len(art.classes)), dim=dim, shrink=shrink)
    return novelty.with_threshold(nov, None, nov.score(feats))


def smallest_model(out: str, per_class: int) -> str:
    """A Lite0 with its ImageNet body and an unfitted head at 64 px, with statistics fitted here on a few
    hymenoptera training images: the whole path in seconds."""
    import torch

    from dragons.dataconfig import DataConfig
    from dragons.models.registry import build_model, get_spec

    torch.manual_seed(0)
    spec = get_spec("efficientnet_lite0")
    classes = ["ants", "bees"]
    model = build_model("efficientnet_lite0", 2, weights="imagenet").eval()
    meta = {
        "arch": "efficientnet_lite0",
        "classes": classes,
        "metrics": {},
        "data_config": DataConfig.create(64, 0.875, spec.mean, spec.std).to_dict(),
    }
    artifact.save(out, model, meta)
    paths, labels = images_under(SHARED / "hymenoptera" / "train", per_class)
    nov = fit_here(artifact.load(out), paths, labels, novelty.DIM, novelty.SHRINK)
    artifact.save(out, model, {**meta, "novelty": nov.to_meta()})
    return out


def train_model(out: str, workers: int) -> str:
    from dragons.train.config import TrainConfig
    from dragons.train.run import train

    train(TrainConfig(data=str(SHARED / "hymenoptera"), out=out, workers=workers))
    return out


def measure(model: str, per_class: int, refits: list[tuple[int, float]]) -> dict:
    art = artifact.load(model)
    if art.meta.get("novelty") is None:
        raise SystemExit(f"{model} has no novelty statistics (model.json's 'novelty'): train it with this dragons")
    ins, _ = images_under(SHARED / "hymenoptera" / "val", per_class)
    outs, _ = images_under(SHARED / "flowers5" / "valid", per_class)
    t0 = time.perf_counter()
    p_in, n_in, e_in = predict_rows(art, ins)
    p_out, n_out, e_out = predict_rows(art, outs)
    score_s = time.perf_counter() - t0
    assert n_in is not None and n_out is not None
    if any(e_in) or any(e_out):
        raise SystemExit(f"unreadable images: {[e for e in e_in + e_out if e][:3]}")
    nov = novelty.Novelty.from_meta(art.meta)
    assert nov is not None
    msp_in, msp_out = 1 - p_in.max(1), 1 - p_out.max(1)
    res = {
        "model": model,
        "n_in": len(ins),
        "n_out": len(outs),
        "score_s": round(score_s, 1),
        "novelty": {k: v for k, v in art.meta["novelty"].items() if not isinstance(v, dict)},  # not the matrices
        "model_json_bytes": len(json.dumps(art.meta, indent=2, sort_keys=True)),
        "auroc_novelty": novelty.auroc(n_in, n_out),
        "auroc_max_softmax": novelty.auroc(msp_in, msp_out),
        "flowers_top_p_ge_0.9": float(np.mean(p_out.max(1) >= 0.9)),
        "hymenoptera_top_p_ge_0.9": float(np.mean(p_in.max(1) >= 0.9)),
        "share_above_threshold_in": nov.share_above(n_in),
        "share_above_threshold_out": nov.share_above(n_out),
        "valid_accuracy": (art.meta.get("metrics") or {}).get("valid_accuracy"),
    }
    if refits:
        paths, labels = images_under(SHARED / "hymenoptera" / "train", per_class)
        res["refits"] = {}
        pred = Predictor.from_artifact(art)
        base = art.data.base_size

        def feats(ps: list[str]) -> np.ndarray:
            return np.concatenate(
                [
                    pred.features(np.stack([decode_to_base(Path(p).read_bytes(), base) for p in ps[i : i + 32]]))
                    for i in range(0, len(ps), 32)
                ]
            )

        f_in, f_out = feats(ins), feats(outs)
        for dim, shrink in refits:
            r = fit_here(art, paths, labels, dim, shrink)
            res["refits"][f"{dim}:{shrink}"] = {
                "auroc": novelty.auroc(r.score(f_in), r.score(f_out)),
                "k": int(r.proj.shape[1]),
            }
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="an existing artifact (with novelty statistics); default: train one")
    p.add_argument("--out", default="/tmp/dragons-novelty-hymenoptera", help="where to train the model")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--smallest", action="store_true", help="seconds: ImageNet body at 64 px, 8 images a class")
    p.add_argument("--refit", action="append", default=[], metavar="DIM:SHRINK", help="refit here with these settings")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args()
    refits = [(int(a.split(":")[0]), float(a.split(":")[1])) for a in args.refit]
    t0 = time.perf_counter()
    if args.smallest:
        with tempfile.TemporaryDirectory() as tmp:
            res = measure(smallest_model(os.path.join(tmp, "model"), 8), 8, refits)
    else:
        model = args.model or train_model(args.out, args.workers)
        res = measure(model, 0, refits)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=2))
    print(
        f"AUROC novelty {res['auroc_novelty']:.4f}  AUROC 1-max p {res['auroc_max_softmax']:.4f}  "
        f"flowers with top p >= 0.9: {res['flowers_top_p_ge_0.9']:.1%}  above threshold: hymenoptera "
        f"{res['share_above_threshold_in']:.1%}, flowers {res['share_above_threshold_out']:.1%}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
