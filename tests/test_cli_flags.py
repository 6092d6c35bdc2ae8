"""One flag per idea: a field is spelled, limited and explained the same way in every
command that has it, and jobs/*.py take exactly the flags of their `dragons` command.

Ties together what dragons.cliargs owns (FLAG_NAMES, CHOICES, help from the config
dataclasses' comments, --verbose) and the table commands' shared flags.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from dragons.cli import COMMANDS
from dragons.cliargs import CHOICES, FLAG_NAMES, field_help

REPO = Path(__file__).resolve().parents[1]


def _actions() -> list[tuple[str, argparse.Action]]:
    """Every (command, action) of every `dragons` command, sub-commands included."""
    out: list[tuple[str, argparse.Action]] = []

    def walk(name: str, p: argparse.ArgumentParser) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    walk(f"{name} {sub}", sp)
            elif a.dest != "help":
                out.append((name, a))

    for name, (make_parser, _) in COMMANDS.items():
        walk(name, make_parser())
    return out


def test_a_field_is_the_same_flag_in_every_command() -> None:
    spelled: dict[str, set[str]] = {}
    for _, a in _actions():
        if a.option_strings:  # the flag itself (a boolean's --no-X aside)
            spelled.setdefault(a.dest, set()).add(a.option_strings[0])
    assert {d: s for d, s in spelled.items() if len(s) > 1} == {}
    for dest, flag in FLAG_NAMES.items():  # each rename is used, and used everywhere
        assert spelled.get(dest) == {flag}, dest


def test_fixed_choices_and_help_everywhere() -> None:
    where: dict[str, set[str]] = {}
    for cmd, a in _actions():
        assert (a.help or "").strip(), f"dragons {cmd} {a.option_strings or a.dest} has no help"
        if a.dest in CHOICES:
            assert list(a.choices or []) == CHOICES[a.dest], (cmd, a.dest)
            where.setdefault(a.dest, set()).add(cmd)
    assert where == {"use_gpu": {"train", "score"}, "decode": {"train", "score"}}


def test_help_text_survives_wrapped_defaults() -> None:
    """A default the formatter wrapped over three lines keeps its comment as help."""
    from dragons.score.config import ScoreConfig

    helps = field_help(ScoreConfig)
    assert helps["use_gpu"].startswith("auto = GPUs the cluster has")
    assert helps["skip_memory_limit"].startswith("DuckDB memory")
    assert helps["gpu_wait_s"].startswith("seconds to wait")


def test_every_command_says_verbose() -> None:
    have = {cmd for cmd, a in _actions() if a.option_strings == ["--verbose"]}
    assert have >= set(COMMANDS)


def test_reading_commands_share_table_and_limits() -> None:
    by_cmd: dict[str, set[str]] = {}
    for cmd, a in _actions():
        by_cmd.setdefault(cmd, set()).update(a.option_strings)
    for cmd in ("query", "report", "export", "table"):
        assert "--table" in by_cmd[cmd], cmd
    for cmd in ("query", "report", "export"):
        assert {"--timeout", "--memory-limit", "--threads"} <= by_cmd[cmd], cmd


@pytest.mark.parametrize("job,cmd", [("train", "train"), ("score", "score")])
def test_job_scripts_take_their_commands_flags(job: str, cmd: str) -> None:
    """jobs/*.py run through dragons.cli.run_command: the same parser, --verbose included."""
    p = subprocess.run(
        [sys.executable, str(REPO / "jobs" / f"{job}.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    flags = {a.option_strings[0] for c, a in _actions() if c == cmd and a.option_strings}
    assert "--verbose" in flags
    missing = {f for f in flags if f not in p.stdout}
    assert not missing and f"usage: jobs/{job}.py" in p.stdout
