"""`hybriddit exec -- CMD ...`: run a command where the local stack is reachable (its namespace and env)."""

from __future__ import annotations

import argparse
import os

from infra.local.netns import loopback_command, set_loopback_env
from infra.local.stack import LocalStack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after `--`")


def run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else list(args.cmd)
    if not cmd:
        raise SystemExit("hybriddit exec: give a command after `--`, e.g. hybriddit exec -- ray status")
    os.environ.update(LocalStack.from_env().client_env(missing_ok=True))
    set_loopback_env()
    argv = loopback_command(cmd)
    os.execvp(argv[0], argv)
