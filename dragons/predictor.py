"""The one inference path: uint8 base squares -> class probabilities.

Training's validation, ``evaluate``, ``predict`` and the scoring actors all call
:class:`Predictor`, so the eval view, TTA, precision and layout are decided in one
place and the same artifact gives the same probabilities everywhere (tested to
1e-5 on CPU: tests/test_score.py, ``_same_probabilities_from_evaluate_and_predict``;
the temperature: tests/test_calibration.py).

Two ways to build one:

* :meth:`Predictor.from_artifact` for a saved model: batch-norm folded into the
  convolutions (one pass over memory less per layer; the weights never change
  again), ``channels_last``, on the GPU when there is one, bf16 autocast there,
  and the artifact's calibration temperature applied to every probability.
* ``Predictor(model, ...)`` around a model that is still training: no folding
  (its weights change every step), the trainer's own autocast.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dragons import storage
from dragons.errors import DragonsError
from dragons.images import ImageError, decode_to_base

from dragons.preprocess import blend_tta, eval_batch, to_tensor, tta_batches


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast precision on ``device`` for an --amp choice (train.config.AMP_CHOICES;
    an artifact records the one it was trained with), for training and
    inference alike; None = full precision. On CPU autocast is slower than fp32
    without AMX, and bf16 would move probabilities by ~1e-3: CPU paths stay fp32."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class Predictor:
    """Maps uint8 base squares (NHWC numpy or NCHW tensor) to float32 probabilities."""

    def __init__(self, model: nn.Module, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device | None = None, tta: int = 0, amp_dtype: torch.dtype | None = None,
                 temperature: float = 1.0) -> None:
        self.model = model
        # Calibration (dragons.calibration): the final probabilities, TTA blended
        # or not, become softmax(log p / T). 1 = raw softmax (a model in training).
        self.temperature = float(temperature)
        self.image_size, self.mean, self.std = image_size, mean, std
        self.device = device or next(model.parameters()).device
        self.tta = tta
        # None = full precision. On CPU autocast is slower than fp32 without AMX,
        # and bf16 would move probabilities by ~1e-3: CPU paths stay fp32.
        self.amp_dtype = amp_dtype
        # The classifier's last layer says how many classes (an empty batch still has columns).
        self.num_classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features

    @classmethod
    def from_artifact(cls, art: Any, device: torch.device | None = None, tta: int = 0, threads: int = 0) -> "Predictor":
        """A frozen, fused predictor for a saved artifact (``dragons.artifact.Artifact``)."""
        from dragons.models.fuse import fuse_for_inference

        device = device or default_device()
        if device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        model = fuse_for_inference(art.model.eval()).to(device).to(memory_format=torch.channels_last).eval()
        # The precision the model was trained (and validated) with.
        amp = amp_dtype(device, str((art.meta.get("config") or {}).get("amp", "auto")))
        data = art.data
        return cls(model, data.image_size, data.mean, data.std, device=device, tta=tta, amp_dtype=amp,
                   temperature=art.temperature)

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor, tta: int | None = None) -> torch.Tensor:
        """Probabilities (float32, on the model's device) for a batch of base squares.

        ``tta`` overrides the predictor's own number of augmented views.
        """
        views_n = self.tta if tta is None else tta
        x = to_tensor(images, self.device)
        if len(x) == 0:
            return torch.zeros(0, self.num_classes, device=self.device)
        # Eval mode here, not restored after: a trainer sets its own modes (frozen
        # BatchNorm among them) at the start of each epoch.
        self.model.eval()
        with self._autocast():
            p = self.model(eval_batch(x, self.image_size, self.mean, self.std)).float().softmax(1)
            if views_n:
                views = [self.model(v).float().softmax(1)
                         for v in tta_batches(x, self.image_size, self.mean, self.std, views_n)]
                p = blend_tta(p, views)
        if self.temperature != 1.0:  # a scalar: the argmax never changes
            p = (p.clamp_min(1e-12).log() / self.temperature).softmax(1)
        return p

    def numpy(self, images: np.ndarray | torch.Tensor, tta: int | None = None) -> np.ndarray:
        return self(images, tta).cpu().numpy()


@dataclass
class PredictConfig:
    """``dragons predict``'s settings."""


    model: str = ""  # model artifact (path or s3://)
    tta: int = 0  # test-time augmentation views (0 = off)
    format: str = "text"  # text (tab-separated) or json (one object per line)


def predict_uris(art: Any, uris: list[str], tta: int = 0, batch_size: int = 32) -> tuple[np.ndarray, list[str]]:
    """Class probabilities for each URI in-process (no Ray); errors are returned per row."""
    predictor = Predictor.from_artifact(art, tta=tta)
    probs = np.full((len(uris), len(art.classes)), np.nan, dtype=np.float32)
    errors = [""] * len(uris)

    def load(i: int) -> np.ndarray | None:
        try:
            return decode_to_base(storage.read_bytes(uris[i]), art.data.base_size)
        except (ImageError, DragonsError) as exc:
            errors[i] = str(exc)
            return None

    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes without the GIL
        for start in range(0, len(uris), batch_size):
            ids = list(range(start, min(len(uris), start + batch_size)))
            imgs = list(pool.map(load, ids))
            ok = [i for i, im in zip(ids, imgs) if im is not None]
            if ok:
                probs[ok] = predictor.numpy(np.stack([im for im in imgs if im is not None]))
    return probs, errors
