"""Encode an image+caption corpus into a latent cache on Ray.

    ray job submit -- python pipelines/encode_latents.py --config configs/encode/<name>.yaml [--set k=v]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# `ray job submit` runs this file as a script, where the repository root need not be importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from services.config import ConfigError, load_config  # noqa: E402

# The summary is one JSON line after this prefix, so scripts can find it in the job log.
SUMMARY_PREFIX = "encode summary: "


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under configs/encode/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--limit", type=int, help="encode at most this many units")
    parser.add_argument("--units", nargs="+", metavar="PATTERN", help="only units whose names match these globs")
    parser.add_argument("--overwrite", action="store_true", help="redo units that already finished")
    parser.add_argument("--break-lease", action="store_true",
                        help="take the output's writer lease even if another job holds it (only if that job is dead)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.config import EncodeJobConfig

    overrides = list(args.set)
    if args.limit is not None:
        overrides.append(f"limit={args.limit}")
    if args.units:
        overrides.append(f"units={json.dumps(args.units)}")
    if args.overwrite:
        overrides.append("overwrite=true")
    if args.break_lease:
        overrides.append("lease.break_lease=true")
    try:
        job = load_config(EncodeJobConfig, args.config, overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    import ray

    from pipelines.graph import run_on_ray

    ray.init()  # the cluster from RAY_ADDRESS (set by `ray job submit`), else a local one
    summary = run_on_ray(job)
    print(SUMMARY_PREFIX + summary.model_dump_json())
    if summary.units_failed:
        print(f"{len(summary.units_failed)} unit(s) did not finish; run the same command again to redo them",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
