"""The ``dragons`` command line: one sub-command per job, torchvision-reference style.

Each sub-command has a ``get_*_parser()`` and a function that turns parsed
arguments into one library call, so ``jobs/*.py`` reuse them unchanged. A
:class:`DragonsError` becomes ``error: ...`` on stderr and exit status 2, with no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

from dragons.errors import DragonsError


def guarded(fn: Callable[[], int | None]) -> int:
    try:
        return int(fn() or 0)
    except DragonsError as exc:
        from dragons.storage import redact

        print(f"error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse that raises DragonsError-style exit 2 with the valid choices listed."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _lr(value: str) -> float:
    if value == "auto":
        return 0.0
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr must be a number or 'auto', got {value!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError("--lr must be positive (or 'auto')")
    return v


def _auto(name: str, sentinel: float) -> Any:
    """A number, or the word 'auto' (the field's sentinel: the recipe decides)."""
    cast = int if isinstance(sentinel, int) else float

    def parse(value: str) -> Any:
        if value == "auto":
            return sentinel
        try:
            return cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} must be a number or 'auto', got {value!r}") from None

    return parse


def _add_dataclass_args(p: argparse.ArgumentParser, cls: Any, skip: set[str], help_from: dict[str, str]) -> None:
    """Flags from a config dataclass: one source of truth for names and defaults."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        h = help_from.get(f.name, "")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=h)
        elif f.name in getattr(cls, "AUTO_FIELDS", {}):
            p.add_argument(flag, type=_auto(f.name, cls.AUTO_FIELDS[f.name]), default=default, help=h, metavar=f.name.upper() + "|auto")
        elif f.name == "lr":
            p.add_argument(flag, type=_lr, default=default, help=h + " ('auto' runs the lr finder)")
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            p.add_argument(flag, type=typ, default=default, help=h, metavar=f.name.upper())


def _field_help(cls: Any) -> dict[str, str]:
    """The comment beside each dataclass default becomes its --help text."""
    import inspect
    import re

    src = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [^=]+=[^#\n]+#\s*(.+)$", src, re.M)}


# ----- train / lr-find -------------------------------------------------------------
def get_train_parser(prog: str = "dragons train") -> argparse.ArgumentParser:
    from dragons.models.registry import list_archs
    from dragons.preprocess import AUGMENT_PRESETS
    from dragons.train.config import TrainConfig

    p = _Parser(prog=prog, description="Fine-tune a pretrained CNN on an image folder with Ray Train.")
    p.add_argument("--data", required=True, help="image folder: path, file:// or s3://bucket/prefix with train/<class>/ and valid/<class>/")
    p.add_argument("--out", required=True, help="where to write the model artifact (path or s3://)")
    helps = _field_help(TrainConfig)
    helps["arch"] = f"backbone, one of: {', '.join(list_archs())}"
    helps["augment"] = f"augmentation preset, one of: {', '.join(AUGMENT_PRESETS)}"
    _add_dataclass_args(p, TrainConfig, {"data", "out", "lr_find_only"}, helps)
    return p


def get_lr_find_parser(prog: str = "dragons lr-find") -> argparse.ArgumentParser:
    from dragons.train.config import TrainConfig

    p = _Parser(prog=prog, description="Exponential learning-rate sweep; saves a loss-vs-rate plot and prints a suggestion.")
    p.add_argument("--data", required=True, help="image folder (path or s3://)")
    p.add_argument("--arch", default="efficientnet_lite0", help="backbone name")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=TrainConfig.crop_pct, help="centre crop as a share of the base square (as in train)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--valid-pct", type=float, default=0.2)
    p.add_argument("--plot", default="lr_find.png", help="where to save the plot (path or s3://)")
    return p


def train_main(args: argparse.Namespace) -> int:
    from dragons.train.config import TrainConfig
    from dragons.train.run import train

    cfg = TrainConfig.from_dict(vars(args))
    train(cfg)
    return 0


def lr_find_main(args: argparse.Namespace) -> int:
    import tempfile

    from dragons import storage
    from dragons.report import plot_lr_find
    from dragons.train.config import TrainConfig
    from dragons.train.run import train

    cfg = TrainConfig.from_dict({**vars(args), "lr_find_only": True, "lr": 0.0, "report": False})
    out = train(cfg)
    info = out["lr_find"]
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "lr_find.png")
        plot_lr_find(info["lrs"], info["losses"], info["suggestion"], local)
        with open(local, "rb") as f:
            storage.write_bytes(args.plot, f.read())
    print(f"suggested lr: {info['suggestion']:.2e}  (plot: {args.plot})")
    return 0


# ----- evaluate / predict ----------------------------------------------------------
def get_evaluate_parser(prog: str = "dragons evaluate") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Validation metrics and an HTML interpretation report for a model artifact.")
    p.add_argument("--model", required=True, help="model artifact (path or s3://)")
    p.add_argument("--data", required=True, help="image folder whose valid/ split is evaluated")
    p.add_argument("--report", default=None, help="report directory (path or s3://); default <model>/report")
    p.add_argument("--tta", type=int, default=0, help="test-time augmentation views (0 = off)")
    p.add_argument("--valid-pct", type=float, default=0.2)
    return p


def evaluate_main(args: argparse.Namespace) -> int:
    from dragons import storage
    from dragons.evaluate import evaluate

    m = evaluate(args.model, args.data, args.report or storage.join(args.model, "report"), tta=args.tta, valid_pct=args.valid_pct)
    print(f"accuracy {m['accuracy']:.4f}  log_loss {m['log_loss']:.4f}  ece {m['ece']:.4f}  errors {m['errors']}/{m['n']}")
    for name, pc in m["per_class"].items():
        print(f"  {name:<16} precision {pc['precision']:.3f}  recall {pc['recall']:.3f}  support {pc['support']}")
    print(f"report {m['report']}")
    return 0


def get_predict_parser(prog: str = "dragons predict") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Print each image's class probabilities (no Ray needed).")
    p.add_argument("--model", required=True, help="model artifact (path or s3://)")
    p.add_argument("--tta", type=int, default=0)
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("images", nargs="+", help="image paths or s3:// URIs")
    return p


def predict_main(args: argparse.Namespace) -> int:
    from dragons.artifact import load
    from dragons.evaluate import predict_uris

    art = load(args.model)
    probs, errors = predict_uris(art, list(args.images), tta=args.tta)
    failed = 0
    for uri, p, err in zip(args.images, probs, errors):
        if err:
            failed += 1
            row: dict[str, Any] = {"uri": uri, "label": None, "error": err}
        else:
            top = int(p.argmax())
            row = {"uri": uri, "label": art.classes[top], "score": round(float(p[top]), 6),
                   **{f"p_{c}": round(float(v), 6) for c, v in zip(art.classes, p)}}
        if args.format == "json":
            print(json.dumps(row))
        elif err:
            print(f"{uri}\terror: {err}")
        else:
            print(f"{uri}\t{row['label']}\t" + "\t".join(f"{c}={float(v):.4f}" for c, v in zip(art.classes, p)))
    return 1 if failed else 0


# ----- s3 --------------------------------------------------------------------------
def get_s3_parser(prog: str = "dragons s3") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="A local S3-compatible endpoint (moto) on 127.0.0.1.")
    sub = p.add_subparsers(dest="s3_cmd", required=True)
    serve = sub.add_parser("serve", help="run the endpoint until interrupted")
    serve.add_argument("--port", type=int, default=9000)
    serve.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    return p


def s3_main(args: argparse.Namespace) -> int:
    import time

    from dragons import s3server

    server = s3server.start(args.port)
    server.apply_env()
    for b in args.bucket:
        s3server.create_bucket(b)
    print(f"S3 endpoint on {server.endpoint}; in another shell:\n"
          f"  export AWS_ENDPOINT_URL={server.endpoint} AWS_ACCESS_KEY_ID={server.env['AWS_ACCESS_KEY_ID']} "
          f"AWS_SECRET_ACCESS_KEY=<any> AWS_REGION={server.env['AWS_REGION']}", flush=True)
    try:
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "train": (get_train_parser, train_main),
    "lr-find": (get_lr_find_parser, lr_find_main),
    "evaluate": (get_evaluate_parser, evaluate_main),
    "predict": (get_predict_parser, predict_main),
    "s3": (get_s3_parser, s3_main),
}


def _register_late() -> None:
    """Commands whose modules live elsewhere register here (keeps this file small).

    Imported at call time (score_cli builds on this module's parser), and never
    guarded: a broken import must fail loudly, not make ``score``, ``query`` and
    ``demo`` vanish as "unknown command".
    """
    from dragons import score_cli

    COMMANDS.update(score_cli.COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    _register_late()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dragons <command> [options]\n\ncommands: " + ", ".join(COMMANDS) + "\n\n'dragons <command> --help' for each.")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    make_parser, run = COMMANDS[cmd]
    args = make_parser().parse_args(rest)
    return guarded(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
