"""`hybriddit stack up|down|status|env`: the local S3 + Ray stack, on loopback only."""

from __future__ import annotations

import argparse
import json
import logging

from infra.local.netns import reexec_on_loopback
from infra.local.stack import LocalStack, StackSettings
from services.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status", "env"])
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a stack setting, e.g. --set s3_port=9333 --set ray.num_cpus=2",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray worker nodes beside the head, each with its own raylet, object store and CPUs "
        "(the setting workers.count)",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    reexec_on_loopback()
    overrides = args.overrides + ([f"workers.count={args.workers}"] if args.workers is not None else [])
    stack = LocalStack(load_config(StackSettings, None, overrides))
    if args.action == "env":
        # Shell lines for `eval "$(hybriddit stack env)"`; asked for explicitly, never logged.
        for key, value in stack.client_env().items():
            print(f"export {key}={value}")
        return 0
    result = {"up": stack.up, "down": stack.down, "status": stack.status}[args.action]()
    print(json.dumps(result, indent=2))
    if args.action == "up":
        prometheus = result["prometheus"]
        print(
            f"\nRay dashboard: {result['ray']['dashboard']}\n"
            f"Prometheus: {prometheus['url'] if prometheus['running'] else 'not running (not installed)'}\n"
            f"Point a shell at the stack with: source {result['env_file']}  (or: hybriddit exec -- CMD)"
        )
    return 0
