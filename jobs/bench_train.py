"""Training benchmark: the default recipe on hymenoptera with 2 CPU workers.

    python jobs/bench_train.py                      # defaults, scored on val/
    python jobs/bench_train.py --tta 4              # plus the TTA figure
    python jobs/bench_train.py --holdout            # tune on 20% of train/, never val/
    python jobs/bench_train.py --holdout --seeds 1,2,3,4,5   # five seeded holdouts, errors summed
    python jobs/bench_train.py --set epochs=3 --set lr=1e-3   # try other settings

Prints valid accuracy, errors and wall time from command to artifact (Ray start
included). Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()  # "from command": before torch and Ray are imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tta", type=int, default=0)
    p.add_argument("--holdout", action="store_true", help="validate on a seeded 20%% of train/ (for choosing defaults)")
    p.add_argument("--seeds", default="", help="comma-separated seeds: one run per seed (with --holdout: one split each), totals printed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    p.add_argument("--json", default="")
    return p


def main(args: argparse.Namespace) -> dict:
    from dragons.train.config import TrainConfig

    if not Path(args.data).is_dir() and not args.data.startswith("s3://"):
        raise SystemExit(f"error: {args.data} is missing (the shared hymenoptera data set)")
    overrides: dict = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        if not hasattr(TrainConfig, k):
            raise SystemExit(f"error: --set {kv}: unknown field {k!r}; see `dragons train --help`")
        overrides[k] = type(getattr(TrainConfig, k))(v) if not isinstance(getattr(TrainConfig, k), bool) else v in ("1", "true", "True")
    if not args.seeds:
        return _one(args, overrides)
    figs = [_one(args, {**overrides, "seed": int(s)}) for s in args.seeds.split(",")]
    total = {"errors": sum(f["errors"] for f in figs), "n_valid": sum(f["n_valid"] for f in figs),
             "valid_loss_mean": round(sum(f["valid_loss"] for f in figs) / len(figs), 4),
             "per_seed_errors": [f["errors"] for f in figs], "wall_s_mean": round(sum(f["wall_s"] for f in figs) / len(figs), 1),
             "split": figs[0]["split"], "seeds": args.seeds, "overrides": overrides}
    print("TOTAL " + json.dumps(total), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"total": total, "runs": figs}, indent=2))
    return total


def _one(args: argparse.Namespace, overrides: dict) -> dict:
    from dragons.train.config import TrainConfig
    from dragons.train.run import train

    t0 = time.perf_counter() if args.seeds else T0
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=args.data, out=f"{tmp}/model", workers=args.workers, tta=args.tta, ignore_valid=args.holdout,
                          report=False, **overrides)
        meta = train(cfg)
    wall = time.perf_counter() - t0
    m = meta["metrics"]
    n = meta["data"]["n_valid"]
    fig = {"valid_accuracy": round(m["valid_accuracy"], 4), "valid_loss": round(m["valid_loss"], 4), "errors": round((1 - m["valid_accuracy"]) * n), "n_valid": n,
           "wall_s": round(wall, 1), "split": "holdout 20% of train/" if args.holdout else "val/", "overrides": overrides}
    if "valid_accuracy_tta" in m:
        fig.update({"valid_accuracy_tta": round(m["valid_accuracy_tta"], 4), "tta": args.tta})
    print(json.dumps(fig), flush=True)
    if args.json and not args.seeds:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return fig


if __name__ == "__main__":
    main(get_args_parser().parse_args())
