"""Ray job entry point: fine-tune a model (`ray job submit -- python jobs/train.py ...`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working_dir

from dragons.cli import get_train_parser, train_main  # noqa: E402
from dragons.cliargs import guarded  # noqa: E402
from dragons.storage import drop_empty_aws_env  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    drop_empty_aws_env()  # AWS_*="" from the node's env or runtime_env means unset (dragons.storage)
    args = get_train_parser("jobs/train.py").parse_args(argv)
    return guarded(lambda: train_main(args))


if __name__ == "__main__":
    sys.exit(main())
