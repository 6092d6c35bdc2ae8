"""The training configuration: one typed dataclass, a comment on each default."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from dragons.capacity import DECODE_CHOICES, GPU_WAIT_S, USE_GPU_CHOICES, check_flags
from dragons.errors import DragonsError
from dragons.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from dragons.models.registry import ArchSpec

# Mixed precision (--amp); the first is the default. dragons.predictor.amp_dtype
# maps a choice to a dtype for training and, from the artifact, for inference.
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


# Fields whose default means "decide from the data" (dragons.train.recipe); the
# CLI accepts the word "auto" for them.
AUTO: dict[str, float] = {
    "image_size": 0,
    "crop_pct": 0.0,
    "epochs": -1,
    "head_views": -1,
    "lr_mult": 0.0,
    "label_smoothing": -1.0,
}
# The augmentation preset's "decide from the data" value (a name, not a number).
AUTO_AUGMENT = "auto"


@dataclass
class TrainConfig:
    data: str = ""  # image folder: local path, file:// or s3://bucket/prefix
    labels: str = ""  # labels table or uri,label[,split] CSV/Parquet, alone or with --data: overrides folder labels
    out: str = ""  # where the model artifact (model.pt + model.json + report/) is written
    storage: str = ""  # Ray Train run storage for checkpoints; "" = <out>/_runs
    name: str = ""  # run name under storage; "" = derived from --out (so --resume finds it)
    arch: str = "efficientnet_lite0"  # a registry name; the only one with offline ImageNet weights
    weights: str = "imagenet"  # imagenet | none | path/S3 URI of an ImageNet-layout state dict
    image_size: int = (
        0  # crop fed to the network; 0 = auto: 224 for photos, the data's own resolution below 320 px (recipe.py)
    )
    crop_pct: float = 0.0  # evaluation centre crop as a share of the base square (side image_size / crop_pct); 0 = auto: 0.7 at 224 px (beat 0.875 on held-out splits), 0.875 for small images
    workers: int = 0  # Ray Train workers; 0 = one per GPU, else as many as the CPUs fit
    use_gpu: str = USE_GPU_CHOICES[
        0
    ]  # auto = GPUs the cluster has or its autoscaler adds (waiting --gpu-wait), else CPUs; yes = fail without GPUs; no = CPUs only
    gpu_wait_s: float = GPU_WAIT_S  # seconds to wait for the GPU nodes of an autoscaling cluster (one per worker) before giving up on them
    batch_size: int = 16  # per worker; on CPU small batches are faster per image and give more steps
    precompute: bool = True  # fit the head on body features computed once (the notebook's trick)
    head_epochs: int = 20  # passes over the cached features; each costs milliseconds
    head_views: int = -1  # augmented views of each training image precomputed for the head, besides the plain one (a forward pass each); -1 = auto: 4 when the head is the whole recipe, else 0
    freeze_epochs: int = 1  # epochs with the body frozen on augmented images (only without precompute)
    epochs: int = -1  # unfrozen fine-tuning epochs; -1 = auto: 0 below 1000 training images (the head alone did as well), then a few (recipe.py, docs/training.md)
    lr: float = (
        1e-3  # base learning rate (the head gets head_lr_scale x); chosen on held-out splits; 0 = "auto" (lr finder)
    )
    head_lr_scale: float = 5.0  # the precomputed head trains on fixed features: it takes a larger rate
    lr_mult: float = 0.0  # discriminative rates: early layers get lr / lr_mult (fastai's slice); 0 = auto: 1 for 1,000 or more small images (their early filters must adapt: docs/training.md), else 10
    bn_stats: bool = False  # BatchNorm in train mode while fine-tuning (per-batch statistics, running ones updated); off = frozen BN, the standard for EfficientNet transfer: at per-worker batch 16 train mode wrecked the head's fit (docs/training.md)
    freeze_early: bool = False  # keep the early half of the body frozen while fine-tuning: no backward through it (epochs ~25% shorter on CPU); cost ~1 point of flowers5 valid accuracy with lr_mult 10 (docs/training.md)
    recompute_early: bool = True  # fine-tuning on CPU: keep only each early block's input and recompute its activations in the backward pass (the same gradients): ~0.12 GB less per worker at 128 px, batch 16, for ~10% longer steps; GPU workers keep them (docs/training.md)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    label_smoothing: float = (
        -1.0
    )  # cross-entropy label smoothing; -1 = auto: 0.1 when the body is fine-tuned, 0 for a head alone
    augment: str = AUTO_AUGMENT  # augmentation preset (head views, fine-tuning): none | light | default | strong; auto = light for a head alone, default when the body is fine-tuned
    tta: int = 0  # test-time augmentation views for the final validation pass (0 = off)
    valid_pct: float = 0.2  # held-out share when there is no valid/ folder (or with ignore_valid)
    ignore_valid: bool = False  # hold out valid_pct of train/ even if valid/ exists (for tuning)
    seed: int = 42  # seeds the split, the head init and augmentation
    class_weights: bool = False  # weight the loss by inverse class frequency (imbalanced data)
    max_failures: int = 0  # worker failures Ray Train recovers from, restarting at the last checkpoint
    resume: bool = False  # continue the run named `name` from its last checkpoint
    amp: str = AMP_CHOICES[0]  # auto (bf16/fp16 on GPU, off on CPU) | bf16 | fp16 | off; scoring uses the model's
    report: bool = True  # write the evaluation report (HTML + PNGs) beside the artifact
    decode: str = DECODE_CHOICES[
        0
    ]  # auto = in the training workers on CPU clusters (threads beside the model: no decode processes, ~0.25 GB less on 2 workers), in separate Ray Data decode actors beside GPU workers; model | separate force one
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard for decoding
    max_images: int = (
        0  # cap every pass (precompute, epochs, validation) at this many images, through the same data path (0 = all)
    )
    progress_s: float = 15.0  # seconds between two progress lines of a long step (decode, precompute, epochs)
    log_file: str = ""  # the run's log (terminal output, workers' lines included); "" = logs/train-<run name>.log, copied to <out>/train.log
    no_progress_timeout_s: float = 300.0  # a stalled Ray Data stage fails after this, with a message

    AUTO_FIELDS: ClassVar[dict[str, float]] = AUTO

    def validate(self, artifact: bool = True) -> ArchSpec:
        """Fail on the first setting out of range, in the flags' words; returns the
        --arch's registry entry (an unknown one fails first, listing the choices).
        dragons.train.plan.prepare is the one caller on the way to training.

        ``artifact``: the run writes a model, so --out is required (not dragons lr-find's sweep).
        """
        from dragons.models.registry import get_spec
        from dragons.preprocess import AUGMENT_PRESETS

        spec = get_spec(self.arch)
        if self.augment != AUTO_AUGMENT:
            if self.augment not in AUGMENT_PRESETS:
                raise DragonsError(
                    f"unknown augmentation preset {self.augment!r}; choose one of: "
                    f"{', '.join([AUTO_AUGMENT, *AUGMENT_PRESETS])}"
                )
        checks = [
            (
                self.image_size >= 32 or self.image_size == AUTO["image_size"],
                "--image-size must be at least 32 (or auto)",
            ),
            (
                0.3 <= self.crop_pct <= 1.0 or self.crop_pct == AUTO["crop_pct"],
                "--crop-pct must be between 0.3 and 1.0 (or auto)",
            ),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.workers >= 0, "--workers must be 0 (auto) or more"),
            (
                self.epochs >= -1 and self.head_epochs >= 0 and self.freeze_epochs >= 0,
                "epoch counts must be >= 0 (or auto)",
            ),
            (self.lr >= 0, "--lr must be a positive number or 'auto'"),
            (self.lr_mult >= 1 or self.lr_mult == AUTO["lr_mult"], "--lr-mult must be >= 1 (or auto)"),
            (
                0 <= self.label_smoothing < 1 or self.label_smoothing == AUTO["label_smoothing"],
                "--label-smoothing must be in [0, 1) (or auto)",
            ),
            (self.amp in AMP_CHOICES, f"--amp must be one of: {', '.join(AMP_CHOICES)}"),
            (self.tta >= 0, "--tta must be >= 0"),
            (self.head_views >= -1, "--head-views must be >= 0 (or auto)"),
            (self.progress_s > 0, "--progress-s must be positive"),
            (self.max_images >= 0, "--max-images must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise DragonsError(msg)
        check_flags(self.use_gpu, self.gpu_wait_s, self.decode)
        if not self.data and not self.labels:
            raise DragonsError("--data or --labels is required: an image folder, a labels table or a uri,label file")
        if artifact and not self.out:
            raise DragonsError("--out is required: where to write the model artifact (local path or s3://...)")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def unresolved(self) -> list[str]:
        """Fields still at ``auto``: dragons.train.recipe.resolve decides them from the data."""
        out = [k for k, v in AUTO.items() if getattr(self, k) == v]
        return out + (["augment"] if self.augment == AUTO_AUGMENT else [])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
