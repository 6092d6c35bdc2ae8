"""Ray job entry point: bulk scoring (`ray job submit -- python jobs/score.py ...`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working_dir

from dragons.cliargs import guarded  # noqa: E402
from dragons.score.cli import get_score_parser, score_main  # noqa: E402
from dragons.storage import drop_empty_aws_env  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    drop_empty_aws_env()  # AWS_*="" from the node's env or runtime_env means unset (dragons.storage)
    args = get_score_parser("jobs/score.py").parse_args(argv)
    return guarded(lambda: score_main(args))


if __name__ == "__main__":
    sys.exit(main())
