"""The loop's commands: ``dragons labels import``, ``dragons model list|show|promote``,
``dragons compare``. Each parses its flags and makes one library call
(``dragons.loop.labels``, ``.versions``, ``.compare``); ``dragons.cli`` merges
``COMMANDS`` into its own."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from dragons.cliargs import Parser
from dragons.errors import DragonsError


# ----- labels import -----------------------------------------------------------------
def get_labels_parser(prog: str = "dragons labels") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Bring people's labels back: Label Studio exports (JSON, JSON_MIN, CSV) or a "
        "uri,label file into a Delta labels table.",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="import")
    imp = sub.add_parser("import", help="add an export's annotations to the labels table (a repeat adds nothing)")
    imp.add_argument(
        "--labels", required=True, help="the labels table: a path or s3://bucket/prefix (created if absent)"
    )
    imp.add_argument(
        "--from",
        dest="source",
        required=True,
        help="Label Studio's JSON or JSON_MIN export, its CSV export, or a CSV/Parquet of uri,label",
    )
    imp.add_argument("--model", default="", help="refuse labels this model does not know (ROOT@alias works)")
    imp.add_argument("--new-class", action="store_true", help="admit labels the model does not know (a new class)")
    imp.add_argument("--control", default="", help="the Choices control's name, when the export has several")
    return p


def labels_main(args: argparse.Namespace) -> int:
    from dragons.artifact import read_meta
    from dragons.loop.labels import disagreements, import_labels, latest

    known = list(read_meta(args.model)["classes"]) if args.model else None
    res = import_labels(
        args.labels, args.source, known_classes=known, new_class=args.new_class, control=args.control or None
    )
    print(res.summary())
    if res.version is not None:
        n = disagreements(latest(args.labels))
        if n:
            print(f"{n} image(s) have annotators who disagree: the newest annotation is the label (docs/loop.md)")
    return 0


# ----- model list | show | promote ----------------------------------------------------
def get_model_parser(prog: str = "dragons model") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="A registry's model versions and aliases (list, show, promote). No server: "
        "versions/ and aliases.json beside the models.",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="list|show|promote")
    for name, text in (
        ("list", "the versions, newest first, with metrics and aliases"),
        ("show", "one version (or alias): its model.json, aliases and promotions"),
        ("promote", "point an alias (default prod) at a version; exactly one of two racing wins"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("--registry", required=True, help="the registry root: what `dragons train --out` was given")
        if name == "list":
            s.add_argument("--json", action="store_true", help="print JSON instead of a table")
        else:
            s.add_argument("version", help="a version (or a unique prefix of 6+ characters), or an alias")
        if name == "promote":
            s.add_argument("--alias", default="prod", help="the alias to move")
            s.add_argument("--actor", default="", help="who promotes (history); default $DRAGONS_ACTOR or user@host")
            s.add_argument("--expect", default="", help="refuse unless the alias points at this version now")
    return p


def model_main(args: argparse.Namespace) -> int:
    from dragons.loop import versions

    if args.action == "list":
        infos = versions.list_versions(args.registry)
        print(json.dumps([i.to_dict() for i in infos], indent=2) if args.json else versions.describe(infos))
    elif args.action == "show":
        print(json.dumps(versions.show(args.registry, args.version), indent=2, default=str))
    else:
        p = versions.promote(
            args.registry, args.version, alias=args.alias, actor=args.actor or None, expect=args.expect or None
        )
        print(p.sentence(args.registry))
    return 0


# ----- compare -------------------------------------------------------------------------
def get_compare_parser(prog: str = "dragons compare") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Challenger against champion on the same labelled images: accuracy, per-class "
        "figures, ECE, an exact McNemar test; exits 3 unless B beats A.",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="URI",
        help="twice: the champion A, then the challenger B (ROOT@alias and ROOT@version work)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="labelled images: a folder (valid/ split, or <class>/ folders) or a CSV/Parquet of uri,label",
    )
    p.add_argument("--out", default="", help="where index.html and summary.json go (path or s3://); none: print only")
    p.add_argument("--min-gain", type=float, default=0.0, help="accuracy B must gain over A (0.01 = one point)")
    p.add_argument(
        "--max-p",
        type=float,
        default=1.0,
        help="also require McNemar's p at or below this (1 = significance not required)",
    )
    p.add_argument("--tta", type=int, default=0, help="test-time augmentation views for both models")
    return p


def compare_main(args: argparse.Namespace) -> int:
    from dragons.loop.compare import compare
    from dragons.loop.comparereport import write

    if len(args.model) != 2:
        raise DragonsError(
            f"--model given {len(args.model)} time(s): give it twice, the champion A then the challenger B"
        )
    r = compare(args.model[0], args.model[1], args.data, min_gain=args.min_gain, max_p=args.max_p, tta=args.tta)
    if args.out:
        write(r, args.out)
    for line in r.lines():
        print(line)
    return r.exit_code


COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[Any], int]]] = {
    "labels": (get_labels_parser, labels_main),
    "model": (get_model_parser, model_main),
    "compare": (get_compare_parser, compare_main),
}
