"""Command-line plumbing shared by every ``dragons`` command.

Flags come from the command's config dataclass: the field name is the flag, the
field's default is the flag's default (shown in ``--help``), and the comment
beside the default is its help. One place for each default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from typing import Any, Callable, Iterable

from dragons import signals
from dragons.capacity import DECODE_CHOICES, USE_GPU_CHOICES
from dragons.errors import DragonsError

# The same field is the same flag in every command that has it. Fields whose flag is
# not their own name (the parsed value keeps the field's name: ``args.timeout_s``):
FLAG_NAMES = {"gpu_wait_s": "--gpu-wait", "timeout_s": "--timeout", "commit_interval_s": "--commit-interval"}
# Fields with a fixed set of values (the config's own validate() checks them too, for job configs):
CHOICES = {"use_gpu": USE_GPU_CHOICES, "decode": DECODE_CHOICES}


def guarded(fn: Callable[[], int | None]) -> int:
    """Run a command: a DragonsError is ``error: ...`` and exit 2, with no traceback.

    SIGTERM, SIGINT and SIGHUP stop it (dragons.signals, whose handlers are
    installed for exactly this call): everything on the way out runs (the GPU
    request is withdrawn), then one ``error: stopped by SIGTERM ...`` line, the Ray
    driver shut down (its actors with it), and exit 128 + signal (143, 130, 129).
    """
    with signals.stop_on_signals():
        try:
            try:
                return int(fn() or 0)
            except DragonsError as exc:
                from dragons.storage import redact

                print(f"error: {redact(str(exc))}", file=sys.stderr, flush=True)
                return 2
        except signals.Stopped as stop:  # outside: a stop while the error above is printed is a stop too
            return signals.finish(stop)
        except KeyboardInterrupt:  # Python's own Ctrl-C: guarded outside the main thread, where no handler is set
            print("interrupted", file=sys.stderr)
            return 130


class _Formatter(argparse.HelpFormatter):
    """Shows each option's default after its help (argparse's own version also
    prints ``(default: None)`` for positionals and required options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if "%(default)" in h or not action.option_strings or action.required:
            return h
        if action.default in (None, "", [], argparse.SUPPRESS) or action.default is False:
            return h
        return h + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with ``error:`` lines (exit 2, the valid choices listed) and defaults in --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        # Every command, jobs/*.py included (dragons.cli.run_command sets runlog.VERBOSE_ENV from it).
        self.add_argument(
            "--verbose", action="store_true", help="also show Ray's own lines on the terminal (the run's log has them)"
        )

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def lr_type(value: str) -> float:
    """A positive learning rate, or 'auto' (0: the lr finder decides)."""
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
            raise argparse.ArgumentTypeError(
                f"--{name.replace('_', '-')} must be a number or 'auto', got {value!r}"
            ) from None

    return parse


def field_help(cls: Any) -> dict[str, str]:
    """The comment beside each dataclass default becomes its --help text.

    Read with the tokenizer, not a line pattern: a formatter may wrap a long
    default over several lines, the comment on any of them.
    """
    src = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments.setdefault(tok.start[0], tok.string[1:].strip())
    out: dict[str, str] = {}
    for node in ast.parse(src).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            text = next(
                (comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments), ""
            )
            # argparse expands %-formats in help texts: a comment's "10%" must stay text.
            out[node.target.id] = text.replace("%", "%%")
    return out


def add_config_args(
    p: argparse.ArgumentParser | Any,
    cls: Any,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    helps: dict[str, str] | None = None,
    required: Iterable[str] = (),
    choices: dict[str, list[str]] | None = None,
) -> None:
    """Flags for the fields of config dataclass ``cls`` (``only`` those, in that order, if given).

    ``p`` may be a parser or an argument group. A field's flag is its name
    (``--image-size``) unless :data:`FLAG_NAMES` says otherwise; ``choices`` adds
    value lists for fields that :data:`CHOICES` does not know (one command's own).
    """
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = list(only) if only is not None else [n for n in by_name if n not in set(skip)]
    text = {**field_help(cls), **(helps or {})}
    required = set(required)
    for name in names:
        f = by_name[name]
        flag = FLAG_NAMES.get(name) or "--" + name.replace("_", "-")
        meta = flag.lstrip("-").replace("-", "_").upper()  # --gpu-wait GPU_WAIT
        kw: dict[str, Any] = {"dest": name, "help": text.get(name, "")}
        allowed = {**CHOICES, **(choices or {})}.get(name)
        if allowed:
            kw["choices"] = allowed
        if name in required:
            kw["required"] = True
        else:
            kw["default"] = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[operator]
        typ = str(f.type)
        if typ == "list[str]":  # a repeatable flag: --bucket a --bucket b
            p.add_argument(flag, action="append", metavar=meta, **kw)
        elif typ in ("bool", "<class 'bool'>"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif name in getattr(cls, "AUTO_FIELDS", {}):
            p.add_argument(
                flag,
                type=_auto(name, cls.AUTO_FIELDS[name]),
                metavar=meta + "|auto",
                **kw,
            )
        elif name == "lr":
            kw["help"] += " ('auto' runs the lr finder)"
            p.add_argument(flag, type=lr_type, **kw)
        else:
            cast = {"int": int, "float": float, "str": str}.get(typ.replace("<class '", "").rstrip("'>"), str)
            extra: dict[str, Any] = {} if "choices" in kw else {"metavar": meta}
            p.add_argument(flag, type=cast, **extra, **kw)


def config_from(cls: Any, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of ``cls`` from the parsed flags that name its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in {**vars(args), **overrides}.items() if k in names})
