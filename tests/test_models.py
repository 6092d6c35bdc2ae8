from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from dragons.errors import DragonsError
from dragons.images import decode_to_base
from dragons.models.registry import build_model, list_archs
from dragons.preprocess import eval_batch, to_tensor


def test_unknown_arch_lists_choices() -> None:
    with pytest.raises(DragonsError) as info:
        build_model("resnet9000", 2)
    for name in ("efficientnet_lite0", "resnet18", "convnext_tiny"):
        assert name in str(info.value)


@pytest.mark.parametrize("arch", list_archs())
def test_every_arch_builds_with_a_fresh_head(arch: str) -> None:
    model = build_model(arch, 3, weights="none").eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 3)
    groups = model.layer_groups()
    assert len(groups) == 3 and all(groups)
    assert sum(len(g) for g in groups) == len(list(model.parameters()))


def test_lite0_imagenet_weights_offline_recognise_ants_and_bees(hymenoptera: Path) -> None:
    """The offline weights are real: ImageNet classes 310 (ant) and 309 (bee)."""
    from dragons.models.registry import get_spec

    spec = get_spec("efficientnet_lite0")
    assert spec.mean == (0.5, 0.5, 0.5)
    model = build_model("efficientnet_lite0", 2)
    # Re-attach an ImageNet classifier from the original file to read ImageNet logits.
    state = spec.imagenet_state()
    fc = torch.nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    files = (
        sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[:6]
        + sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:6]
    )
    x = to_tensor(np.stack([decode_to_base(f.read_bytes(), 256) for f in files]))
    with torch.inference_mode():
        top = fc(model.eval().body(eval_batch(x, 224, spec.mean, spec.std))).argmax(1).tolist()
    hits = sum(t == 310 for t in top[:6]) + sum(t == 309 for t in top[6:])
    assert hits >= 10, top


def test_weights_from_s3_uri(bucket: str) -> None:
    from dragons import storage
    from dragons.models.registry import get_spec

    buf = io.BytesIO()
    torch.save(get_spec("efficientnet_lite0").imagenet_state(), buf)
    storage.write_bytes(f"s3://{bucket}/weights/lite0.pth", buf.getvalue())
    a = build_model("efficientnet_lite0", 2, weights=f"s3://{bucket}/weights/lite0.pth")
    b = build_model("efficientnet_lite0", 2, weights="imagenet")
    assert torch.equal(a.body.net._conv_stem.weight, b.body.net._conv_stem.weight)
    with pytest.raises(DragonsError, match="does not fit resnet18"):
        build_model("resnet18", 2, weights=f"s3://{bucket}/weights/lite0.pth")
    storage.write_bytes(f"s3://{bucket}/weights/junk.pth", b"not a checkpoint")
    with pytest.raises(DragonsError, match="weights_only"):
        build_model("efficientnet_lite0", 2, weights=f"s3://{bucket}/weights/junk.pth")


class _Payload:
    """Unpickling this runs a command: what a planted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> bytes:
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    data = pickle.dumps({"conv1.weight": _Payload(marker)})
    path.write_bytes(data)
    return data


def test_planted_torchvision_checkpoint_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--arch resnet18 --weights imagenet` with a malicious file in the hub cache: refused by hash, never run."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch.hub.get_dir() is $TORCH_HOME/hub
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    marker = tmp_path / "pwned"
    _plant(tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1], marker)
    with pytest.raises(DragonsError, match="does not match the published"):
        build_model("resnet18", 2, weights="imagenet")
    assert not marker.exists()


def test_checkpoint_with_matching_hash_still_loads_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a file whose hash matches its name is unpickled with weights_only=True: the payload never runs."""
    import hashlib

    from dragons.models.registry import load_hub_checkpoint

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    marker = tmp_path / "pwned"
    data = _plant(tmp_path / "tmp.pth", marker)
    prefix = hashlib.sha256(data).hexdigest()[:8]
    _plant(tmp_path / "hub" / "checkpoints" / f"evil-{prefix}.pth", marker)
    with pytest.raises(DragonsError, match="weights_only=True"):
        load_hub_checkpoint(f"https://download.example/models/evil-{prefix}.pth")
    assert not marker.exists()
    # A genuine state dict with a matching hash loads.
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    good = hashlib.sha256(buf.getvalue()).hexdigest()[:8]
    (tmp_path / "hub" / "checkpoints" / f"good-{good}.pth").write_bytes(buf.getvalue())
    assert torch.equal(load_hub_checkpoint(f"https://download.example/good-{good}.pth")["w"], torch.ones(2))
