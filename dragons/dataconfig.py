"""How an image becomes a model input, decided once per model (timm's ``pretrained_cfg``).

The recipe resolves it at training (:func:`dragons.train.recipe.resolve` picks
the size and crop), training writes it into ``model.json`` (``data_config``),
and every reader (the Predictor, the scoring pipeline's decoders, reports)
takes it from there. No torch: decode workers read it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Share of the base square the evaluation crop keeps (timm's ``crop_pct``).
# torchvision's classic 87.5% (resize 256, crop 224) leaves the small subjects
# of everyday photos (an ant on a wall) smaller than the network likes, and
# random resized crops make them look larger in training than at test time
# (FixRes, Touvron et al. 2019). 70% did better on held-out splits of train/,
# same pixels per pass, so scoring costs the same (docs/training.md, "How the defaults were chosen").
DEFAULT_CROP_PCT = 0.7
# Artifacts written before model.json recorded its base square were cropped at 87.5%.
LEGACY_CROP_PCT = 0.875


@dataclass(frozen=True)
class DataConfig:
    image_size: int  # the square crop the network sees
    base_size: int  # the square images are decoded to (and shipped as): image_size / crop_pct
    crop_pct: float  # evaluation centre crop as a share of the base square
    mean: tuple[float, ...]  # per-channel normalisation of [0, 1] pixels
    std: tuple[float, ...]

    @classmethod
    def create(cls, image_size: int, crop_pct: float, mean: tuple[float, ...], std: tuple[float, ...]) -> DataConfig:
        return cls(int(image_size), int(round(image_size / crop_pct)), float(crop_pct), tuple(mean), tuple(std))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> DataConfig:
        """A model.json's data config; older artifacts kept it as loose keys."""
        if "data_config" in meta:
            d = meta["data_config"]
            return cls(
                int(d["image_size"]), int(d["base_size"]), float(d["crop_pct"]), tuple(d["mean"]), tuple(d["std"])
            )
        size = int(meta["image_size"])
        base = int(meta.get("base_size") or round(size / LEGACY_CROP_PCT))
        norm = meta.get("normalization") or {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        return cls(size, base, size / base, tuple(norm["mean"]), tuple(norm["std"]))
