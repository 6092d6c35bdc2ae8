"""The ``dragons`` command line: one sub-command per job, torchvision-reference style.

Each sub-command has a ``get_*_parser()`` (flags generated from its config
dataclass, ``dragons.cliargs``) and a ``*_main`` that turns parsed arguments
into one library call, so ``jobs/*.py`` reuse them unchanged. A
:class:`DragonsError` becomes ``error: ...`` on stderr and exit status 2, with no
traceback; anything else is a bug and keeps its traceback. Scoring's commands
live with scoring (``dragons.score.cli``) and are imported here directly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from typing import Any, Callable, Sequence

from dragons.cliargs import Parser, add_config_args, guarded
from dragons.errors import require_plotting
from dragons.local import cli as local_cli
from dragons.loop import cli as loop_cli
from dragons.runlog import VERBOSE_ENV
from dragons.score import cli as score_cli

# TrainConfig's fields by argument group (the rest: cluster, faults and logs).
TRAIN_IO = ("data", "labels", "out", "storage", "name", "resume", "report", "valid_pct", "ignore_valid", "max_pixels")
TRAIN_RECIPE = (
    "arch",
    "weights",
    "image_size",
    "crop_pct",
    "batch_size",
    "precompute",
    "head_epochs",
    "head_views",
    "freeze_epochs",
    "epochs",
    "lr",
    "head_lr_scale",
    "lr_mult",
    "bn_stats",
    "freeze_early",
    "recompute_early",
    "weight_decay",
    "label_smoothing",
    "augment",
    "tta",
    "seed",
    "class_weights",
    "amp",
)


# ----- train / lr-find -------------------------------------------------------------
def get_train_parser(prog: str = "dragons train") -> argparse.ArgumentParser:
    from dragons.models.registry import list_archs
    from dragons.preprocess import AUGMENT_PRESETS
    from dragons.train.config import TrainConfig

    p = Parser(prog=prog, description="Fine-tune a pretrained CNN on an image folder with Ray Train.")
    helps = {
        "data": "image folder: path, file:// or s3://bucket/prefix with train/<class>/ and valid/<class>/ "
        "(optional with --labels)",
        # Checked by the library (its error lists the choices), so a job config gets the same message.
        "arch": f"backbone, one of: {', '.join(list_archs())}",
        "augment": f"augmentation preset, one of: {', '.join(AUGMENT_PRESETS)}; or auto (the default): "
        "light for a head alone, default when the body is fine-tuned",
    }
    add_config_args(p.add_argument_group("data and output"), TrainConfig, only=TRAIN_IO, required=("out",), helps=helps)
    add_config_args(p.add_argument_group("model and recipe"), TrainConfig, only=TRAIN_RECIPE, helps=helps)
    add_config_args(
        p.add_argument_group("cluster, faults and logs"),
        TrainConfig,
        skip={*TRAIN_IO, *TRAIN_RECIPE},
    )
    return p


def get_lr_find_parser(prog: str = "dragons lr-find") -> argparse.ArgumentParser:
    from dragons.models.registry import list_archs
    from dragons.train.config import TrainConfig

    p = Parser(
        prog=prog, description="Exponential learning-rate sweep; saves a loss-vs-rate plot and prints a suggestion."
    )
    add_config_args(
        p,
        TrainConfig,
        only=("data", "arch", "weights", "image_size", "crop_pct", "batch_size", "workers", "valid_pct", "seed"),
        required=("data",),
        helps={"arch": f"backbone, one of: {', '.join(list_archs())}"},
    )
    p.add_argument("--plot", default="lr_find.png", help="where to save the plot (path or s3://)")
    return p


def train_main(args: argparse.Namespace) -> int:
    from dragons.train.config import TrainConfig
    from dragons.train.run import train

    train(TrainConfig.from_dict(vars(args)))
    return 0


def lr_find_main(args: argparse.Namespace) -> int:
    from dragons import storage
    from dragons.train.config import TrainConfig
    from dragons.train.run import find_lr

    require_plotting("lr-find's plot")  # before the sweep, not after it
    from dragons.report import plot_lr_find

    found = find_lr(TrainConfig.from_dict({**vars(args), "lr": 0.0, "report": False}))
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "lr_find.png")
        plot_lr_find(found.lrs, found.losses, found.suggestion, local)
        with open(local, "rb") as f:
            storage.write_bytes(args.plot, f.read())
    print(f"suggested lr: {found.suggestion:.2e}  (plot: {args.plot})")
    return 0


# ----- evaluate / predict ----------------------------------------------------------
def get_evaluate_parser(prog: str = "dragons evaluate") -> argparse.ArgumentParser:
    from dragons.evaluate import EvaluateConfig

    p = Parser(prog=prog, description="Validation metrics and an HTML interpretation report for a model artifact.")
    add_config_args(p, EvaluateConfig, required=("model", "data"))
    return p


def evaluate_main(args: argparse.Namespace) -> int:
    from dragons import storage
    from dragons.evaluate import evaluate
    from dragons.loop import versions

    # ROOT@prod: the report goes beside the version it evaluates, not into a folder named "ROOT@prod".
    default = storage.join(versions.resolve(args.model).dir, "report")
    result = evaluate(
        args.model, args.data, args.report or default, tta=args.tta, valid_pct=args.valid_pct, seed=args.seed
    )
    m = result.metrics
    print(
        f"accuracy {m['accuracy']:.4f}  log_loss {m['log_loss']:.4f}  ece {m['ece']:.4f}  errors {m['errors']}/{m['n']}"
    )
    for name, pc in m["per_class"].items():
        print(f"  {name:<16} precision {pc['precision']:.3f}  recall {pc['recall']:.3f}  support {pc['support']}")
    print(f"report {result.report}")
    return 0


def get_predict_parser(prog: str = "dragons predict") -> argparse.ArgumentParser:
    from dragons.predictor import PredictConfig

    p = Parser(prog=prog, description="Print each image's class probabilities (no Ray needed).")
    add_config_args(p, PredictConfig, required=("model",), choices={"format": ["text", "json"]})
    p.add_argument("images", nargs="+", help="image paths or s3:// URIs")
    return p


def predict_main(args: argparse.Namespace) -> int:
    import numpy as np

    from dragons.artifact import load
    from dragons.columns import prediction_columns
    from dragons.predictor import predict_rows

    art = load(args.model)
    probs, novelty, errors = predict_rows(art, list(args.images), tta=args.tta)
    cols = prediction_columns(art.classes, probs, errors, novelty)
    failed = 0
    for i, (uri, p, err) in enumerate(zip(args.images, probs, errors)):
        failed += bool(err)
        # The scores table's row layout; numbers to 6 places, none on an error row.
        row: dict[str, Any] = {
            "uri": uri,
            **{
                k: (
                    None
                    if isinstance(v[i], float) and np.isnan(v[i])
                    else round(float(v[i]), 6)
                    if isinstance(v[i], float)
                    else v[i]
                )
                for k, v in cols.items()
            },
        }
        if args.format == "json":
            print(json.dumps(row))
        elif err:
            print(f"{uri}\terror: {err}")
        else:
            print(
                f"{uri}\t{row['label']}\t"
                + "\t".join(f"{c}={float(v):.4f}" for c, v in zip(art.classes, p))
                + ("" if novelty is None else f"\tnovelty={float(novelty[i]):.2f}")
            )
    return 1 if failed else 0


COMMANDS: dict[str, tuple[Callable[..., argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "train": (get_train_parser, train_main),
    "lr-find": (get_lr_find_parser, lr_find_main),
    "evaluate": (get_evaluate_parser, evaluate_main),
    "predict": (get_predict_parser, predict_main),
    **score_cli.COMMANDS,
    **loop_cli.COMMANDS,
    **local_cli.COMMANDS,
}


def usage() -> str:
    """``dragons --help``: one line per command, the first sentence of its own description."""
    width = max(len(c) for c in COMMANDS)
    lines = []
    for name, (make_parser, _) in COMMANDS.items():
        text = re.sub(r"\s*\([^)]*\)", "", (make_parser().description or "").split(". ")[0]).rstrip(".")
        lines.append(f"  {name:<{width}}  {text}")
    return (
        "usage: dragons <command> [options]\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n'dragons <command> --help' for each; --verbose (any command) also shows Ray's own lines."
    )


def run_command(cmd: str, argv: Sequence[str], prog: str | None = None) -> int:
    """One command, the same way for ``dragons <cmd>`` and ``jobs/*.py`` (``prog``: the
    name its usage shows): empty ``AWS_*`` unset, flags parsed, ``--verbose``, and a
    :class:`DragonsError` as one ``error:`` line and exit 2."""
    from dragons.storage import drop_empty_aws_env

    # First: AWS_ENDPOINT_URL="" (how env files and Secrets write "not set") is
    # real AWS for pyarrow and boto3 but a crash in delta-rs; unset it for all.
    drop_empty_aws_env()
    make_parser, run = COMMANDS[cmd]
    args = (make_parser(prog) if prog else make_parser()).parse_args(list(argv))
    if args.verbose:  # Ray's own worker lines on the terminal too (they are always in the log)
        os.environ[VERBOSE_ENV] = "1"
    return guarded(lambda: run(args))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
