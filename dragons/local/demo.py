"""``dragons demo``: the whole system on embedded defaults, in a few minutes.

Starts a local S3 endpoint (moto on 127.0.0.1), draws two dragon classes
(Drogon and Viserion) plus a few broken files, uploads them, trains with two
Ray Train workers, scores the archive into a Delta Lake table, then simulates
a second night: new photos arrive and an ``--incremental`` run scores only
those. It prints the per-run summary from the table's commit log. With
``--data`` it trains on a real image folder and scores its validation split.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from dragons import storage
from dragons.errors import DragonsError
from dragons.local import s3server
from dragons.score.export import format_table

BUCKET = "dragons-demo"


@dataclass
class DemoConfig:
    data: str = ""  # an image folder (path or s3://) to use instead of drawing dragons
    workdir: str = "dragons_demo"  # local folder for the drawn data and the logs
    epochs: int = 1  # unfrozen fine-tuning epochs


def run_demo(cfg: DemoConfig) -> None:
    data, workdir, epochs = cfg.data, cfg.workdir, cfg.epochs
    from dragons.local.synth import write_bad_files, write_dataset
    from dragons.score.pipeline import ScoreConfig, score
    from dragons.score.query import run_sql
    from dragons.train.config import TrainConfig
    from dragons.train.run import train

    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    server = None
    if data.startswith("s3://") and storage.s3_endpoint() is None and storage.aws_env("AWS_ACCESS_KEY_ID") is None:
        raise DragonsError(f"--data {data}: set AWS_* variables for that bucket (or use a local folder)")
    if not data.startswith("s3://"):
        server = s3server.start()
        server.apply_env()  # before Ray starts, so every worker talks to the same endpoint
        print(f"local S3 endpoint {server.endpoint} (moto)", flush=True)
    try:
        if not data:
            local = os.path.join(workdir, "data")
            if not os.path.isdir(os.path.join(local, "train")):
                counts = write_dataset(local, ["drogon", "viserion"], n_train=100, n_valid=30, seed=7)
                write_dataset(
                    os.path.join(workdir, "unlabelled"), ["drogon", "viserion"], n_train=60, n_valid=0, seed=8
                )
                write_bad_files(os.path.join(workdir, "unlabelled", "broken"))
                print(
                    f"drew {sum(counts.values())} labelled dragon photos (+120 unlabelled, 11 unusual/broken files) in {local}",
                    flush=True,
                )
            s3server.create_bucket(BUCKET)
            n = s3server.upload_tree(local, BUCKET, "dragons")
            n += s3server.upload_tree(os.path.join(workdir, "unlabelled"), BUCKET, "archive/2026-11-28")
            print(f"uploaded {n} objects to s3://{BUCKET}/", flush=True)
            data_uri, score_input = f"s3://{BUCKET}/dragons", f"s3://{BUCKET}/archive"
        else:
            data_uri = data
            valid = next(
                (storage.join(data, d) for d in ("valid", "val") if storage.exists(storage.join(data, d))), None
            )
            score_input = valid or data
            if server is not None:
                s3server.create_bucket(BUCKET)
        out_root = f"s3://{BUCKET}" if server is not None else storage.join(data, "_dragons")
        model_uri, table_uri = f"{out_root}/models/demo", f"{out_root}/tables/scores"

        print("\n== train (Ray Train, 2 workers)", flush=True)
        meta = train(TrainConfig(data=data_uri, out=model_uri, workers=2, epochs=epochs)).meta
        print("\n== score night 1 (Ray Data: model actors that read and decode -> Delta commits in parts)", flush=True)
        log_file = os.path.join(workdir, "score-demo.log")
        manifest = score(
            ScoreConfig(
                model=model_uri,
                input=score_input,
                output=table_uri,
                run_id="night-1",
                incremental=True,
                log_file=log_file,
            )
        )
        if server is not None:
            new_dir = os.path.join(workdir, "unlabelled-night2")
            if not os.path.isdir(new_dir):
                write_dataset(new_dir, ["drogon", "viserion"], n_train=8, n_valid=0, seed=9)
            added = s3server.upload_tree(new_dir, BUCKET, "archive/2026-11-29")
            print(
                f"\n== night 2: {added} new photos arrived under {score_input}/2026-11-29; "
                "score --incremental scores only those",
                flush=True,
            )
        else:
            print("\n== night 2: nothing new in the folder; score --incremental skips everything", flush=True)
        manifest = score(
            ScoreConfig(
                model=model_uri,
                input=score_input,
                output=table_uri,
                run_id="night-2",
                incremental=True,
                log_file=log_file,
            )
        )
        # Two of the queries a user would run (any SELECT works; see `dragons query --help`),
        # narrow enough for one screen: the runs from the commit log, then the rows a
        # person looks at first (errors, then the least sure).
        print(
            "\n== query: the table's runs (dragons query --table ...), then errors and the least sure rows", flush=True
        )
        print(format_table(run_sql(table_uri)))  # no SQL: the runs summary, as `dragons query --table` prints it
        print(
            format_table(
                run_sql(
                    table_uri,
                    "SELECT regexp_extract(uri, '[^/]+$') AS file, label, round(score, 3) AS score, "
                    "CASE WHEN length(error) > 64 THEN left(error, 63) || '…' ELSE error END AS error "
                    "FROM latest ORDER BY error NULLS LAST, score LIMIT 7",
                )
            )
        )
        report = storage.join(model_uri, "report", "index.html")
        local_report = os.path.join(workdir, "report")
        storage.download_dir(storage.join(model_uri, "report"), local_report)
        print(
            f"\nmodel   {model_uri}  (valid accuracy {meta['metrics']['valid_accuracy']:.3f}, version {meta['version']})"
        )
        total = run_sql(table_uri, "SELECT count(*) AS n, count(error) AS e FROM latest").to_pylist()[0]
        print(
            f"table   {table_uri}  (Delta Lake, version {manifest['version']}: {total['n']} objects, {total['e']} errors; "
            f"night 2 listed {manifest['listed']}, skipped {manifest['skipped']}, scored {manifest['rows']})"
        )
        print(f"report  {report}  (copied to {os.path.join(local_report, 'index.html')})")
        print(f"log     {os.path.join(workdir, 'score-demo.log')}")
        print(f"demo finished in {time.perf_counter() - t0:.0f}s", flush=True)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if server is not None:
            server.stop()
