"""Ray job entry point: bulk scoring (`ray job submit -- python jobs/score.py ...`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working_dir

from dragons.cli import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    # `dragons score`'s own flags (--verbose too), empty AWS_* unset, errors as `error:` lines.
    return run_command("score", sys.argv[1:] if argv is None else argv, prog="jobs/score.py")


if __name__ == "__main__":
    sys.exit(main())
