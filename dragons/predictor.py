"""The one inference path: uint8 base squares -> class probabilities.

Training's validation, ``evaluate``, ``predict`` and the scoring actors all call
:class:`Predictor`, so the eval view, TTA, precision and layout are decided in one
place and the same artifact gives the same probabilities everywhere (tested to
1e-5 on CPU, tests/test_predictor.py).

Two ways to build one:

* :meth:`Predictor.from_artifact` for a saved model: batch-norm folded into the
  convolutions (one pass over memory less per layer; the weights never change
  again), ``channels_last``, on the GPU when there is one, bf16 autocast there.
* ``Predictor(model, ...)`` around a model that is still training: no folding
  (its weights change every step), the trainer's own autocast.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from dragons.preprocess import blend_tta, eval_batch, to_tensor, tta_batches


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """Maps uint8 base squares (NHWC numpy or NCHW tensor) to float32 probabilities."""

    def __init__(self, model: nn.Module, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device | None = None, tta: int = 0, amp_dtype: torch.dtype | None = None) -> None:
        self.model = model
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
        amp = torch.bfloat16 if device.type == "cuda" else None
        return cls(model, art.image_size, art.mean, art.std, device=device, tta=tta, amp_dtype=amp)

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
        return p

    def numpy(self, images: np.ndarray | torch.Tensor, tta: int | None = None) -> np.ndarray:
        return self(images, tta).cpu().numpy()
