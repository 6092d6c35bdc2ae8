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
from dragons.models.fuse import fuse_for_inference
from dragons.novelty import Novelty, distance, unit
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

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | None = None,
        tta: int = 0,
        amp_dtype: torch.dtype | None = None,
        temperature: float = 1.0,
        novelty: Novelty | None = None,
    ) -> None:
        self.model = model
        # What the model does not know (dragons.novelty): the eval view's body features
        # against the training statistics, one (batch, D) x (D, k) product. None: no statistics.
        self.novelty = novelty
        self._nov: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
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
        device = device or default_device()
        if device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        model = fuse_for_inference(art.model.eval()).to(device).to(memory_format=torch.channels_last).eval()
        # The precision the model was trained (and validated) with.
        amp = amp_dtype(device, str((art.meta.get("config") or {}).get("amp", "auto")))
        data = art.data
        return cls(
            model,
            data.image_size,
            data.mean,
            data.std,
            device=device,
            tta=tta,
            amp_dtype=amp,
            temperature=art.temperature,
            novelty=Novelty.from_meta(art.meta),
        )

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _novelty_of(self, feats: torch.Tensor) -> torch.Tensor | None:
        if self.novelty is None:
            return None
        nov = self.novelty
        if self._nov is None:  # the statistics on the model's device, once
            self._nov = tuple(
                torch.from_numpy(a).to(self.device) if a is not None else None  # type: ignore[assignment]
                for a in (nov.offset, nov.proj, nov.centers, nov.unwhite)
            )
        assert self._nov is not None
        offset, proj, centers, unwhite = self._nov
        if feats.shape[1] != offset.shape[0]:
            raise DragonsError(
                f"the model's novelty statistics are for {offset.shape[0]} features but its body gives "
                f"{feats.shape[1]}: the artifact is inconsistent; retrain it"
            )
        centered = unit(feats.float()) - offset
        return distance(centered, centered @ proj, centers, unwhite, nov.residual_var)

    def _plain(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, body features or None) of the eval view; features where the model is a body and a head."""
        body, head = getattr(self.model, "body", None), getattr(self.model, "head", None)
        if body is None or head is None:
            return self.model(x), None
        feats = body(x)
        return head(feats), feats

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor, tta: int | None = None) -> torch.Tensor:
        """Probabilities (float32, on the model's device) for a batch of base squares.

        ``tta`` overrides the predictor's own number of augmented views.
        """
        return self.predict(images, tta)[0]

    @torch.inference_mode()
    def predict(
        self, images: np.ndarray | torch.Tensor, tta: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(probabilities, novelty) for a batch: novelty (float32, from the eval view) is None
        when the model has no novelty statistics."""
        views_n = self.tta if tta is None else tta
        x = to_tensor(images, self.device)
        if len(x) == 0:
            empty = torch.zeros(0, device=self.device) if self.novelty is not None else None
            return torch.zeros(0, self.num_classes, device=self.device), empty
        # Eval mode here, not restored after: a trainer sets its own modes (frozen
        # BatchNorm among them) at the start of each epoch.
        self.model.eval()
        with self._autocast():
            logits, feats = self._plain(eval_batch(x, self.image_size, self.mean, self.std))
            p = logits.float().softmax(1)
            if views_n:
                views = [
                    self.model(v).float().softmax(1)
                    for v in tta_batches(x, self.image_size, self.mean, self.std, views_n)
                ]
                p = blend_tta(p, views)
        if self.temperature != 1.0:  # a scalar: the argmax never changes
            p = (p.clamp_min(1e-12).log() / self.temperature).softmax(1)
        # In fp32, outside autocast: a bf16 product would move distances by ~1%.
        nov = self._novelty_of(feats) if feats is not None else None
        return p, nov

    @torch.inference_mode()
    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """The eval view's body features (float32, N x D): what novelty statistics are fitted on."""
        body = getattr(self.model, "body", None)
        if body is None:
            raise TypeError("features need a model made of a body and a head (dragons.models.registry.Classifier)")
        x = to_tensor(images, self.device)
        self.model.eval()
        with self._autocast():
            return body(eval_batch(x, self.image_size, self.mean, self.std)).float().cpu().numpy()

    def numpy(self, images: np.ndarray | torch.Tensor, tta: int | None = None) -> np.ndarray:
        return self(images, tta).cpu().numpy()

    def numpy_with_novelty(
        self, images: np.ndarray | torch.Tensor, tta: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        p, nov = self.predict(images, tta)
        return p.cpu().numpy(), (nov.float().cpu().numpy() if nov is not None else None)


@dataclass
class PredictConfig:
    """``dragons predict``'s settings."""

    model: str = ""  # model artifact (path or s3://)
    tta: int = 0  # test-time augmentation views (0 = off)
    format: str = "text"  # text (tab-separated) or json (one object per line)


def predict_uris(art: Any, uris: list[str], tta: int = 0, batch_size: int = 32) -> tuple[np.ndarray, list[str]]:
    """Class probabilities for each URI in-process (no Ray); errors are returned per row."""
    probs, _, errors = predict_rows(art, uris, tta, batch_size)
    return probs, errors


def predict_rows(
    art: Any, uris: list[str], tta: int = 0, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(probabilities, novelty, errors) per URI in-process (no Ray). Novelty is NaN on an
    error row, and None for an artifact without novelty statistics."""
    predictor = Predictor.from_artifact(art, tta=tta)
    probs = np.full((len(uris), len(art.classes)), np.nan, dtype=np.float32)
    novelty = np.full(len(uris), np.nan) if predictor.novelty is not None else None
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
                p, nov = predictor.numpy_with_novelty(np.stack([im for im in imgs if im is not None]))
                probs[ok] = p
                if novelty is not None and nov is not None:
                    novelty[ok] = nov
    return probs, novelty, errors
