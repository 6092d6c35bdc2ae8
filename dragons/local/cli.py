"""CLI wiring for the local tooling: ``dragons s3`` (a moto S3 endpoint) and ``dragons demo``.

Both need the ``local`` extra (``pip install 'dragons[local]'``); this module
imports without it, so ``dragons --help`` lists them everywhere.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

from dragons.cliargs import Parser, add_config_args, config_from
from dragons.local import s3server
from dragons.local.s3server import ServeConfig


def get_s3_parser(prog: str = "dragons s3") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="A local S3-compatible endpoint (moto) on 127.0.0.1.")
    sub = p.add_subparsers(dest="s3_cmd", required=True)

    serve = sub.add_parser("serve", help="run the endpoint until interrupted", formatter_class=p.formatter_class)
    add_config_args(serve, ServeConfig)
    return p


def s3_main(args: argparse.Namespace) -> int:
    cfg = config_from(s3server.ServeConfig, args)
    server = s3server.start(cfg.port)
    server.apply_env()
    for b in cfg.bucket:
        s3server.create_bucket(b)
    print(
        f"S3 endpoint on {server.endpoint}; in another shell:\n"
        f"  export AWS_ENDPOINT_URL={server.endpoint} AWS_ACCESS_KEY_ID={server.env['AWS_ACCESS_KEY_ID']} "
        f"AWS_SECRET_ACCESS_KEY=<any> AWS_REGION={server.env['AWS_REGION']}",
        flush=True,
    )
    try:
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def get_demo_parser(prog: str = "dragons demo") -> argparse.ArgumentParser:
    from dragons.local.demo import DemoConfig

    p = Parser(prog=prog, description="End to end on embedded defaults: local S3, draw data, train, score, query.")
    add_config_args(p, DemoConfig)
    return p


def demo_main(args: argparse.Namespace) -> int:
    from dragons.local.demo import DemoConfig, run_demo

    run_demo(config_from(DemoConfig, args))
    return 0


COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[Any], int]]] = {
    "demo": (get_demo_parser, demo_main),
    "s3": (get_s3_parser, s3_main),
}
