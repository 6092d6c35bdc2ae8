"""Ray job entry point: fine-tune a model (`ray job submit -- python jobs/train.py ...`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working_dir

from dragons.cli import run_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    # `dragons train`'s own flags (--verbose too), empty AWS_* unset, errors as `error:` lines.
    return run_command("train", sys.argv[1:] if argv is None else argv, prog="jobs/train.py")


if __name__ == "__main__":
    sys.exit(main())
