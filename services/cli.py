"""`hybriddit`: one entry point whose subcommands live next to the code they drive."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help)
SUBCOMMANDS = {
    "stack": ("infra.local.cli", "start, stop or inspect the local S3 + Ray stack"),
    "exec": ("infra.local.exec_cli", "run a command where the local stack is reachable"),
    "model-info": ("trainer.model_info", "print parameter counts of a model preset as JSON"),
    "status": ("services.cache.status", "print progress of a latent cache from its manifests"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hybriddit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub_parsers = {name: sub.add_parser(name, help=help_text) for name, (_, help_text) in SUBCOMMANDS.items()}
    # Only the chosen subcommand's module is imported: torch/diffusers imports cost seconds.
    module = None
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        module.add_arguments(sub_parsers[argv[0]])
    args = parser.parse_args(argv)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
