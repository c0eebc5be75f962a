"""The train job: `ray job submit -- python trainer/train.py --config configs/train/<name>.yaml [--set k=v]`.

Resolves the cache once on the driver, then runs `trainer.loop.TrainingRun` on every Ray Train worker
(DDP over NCCL on GPUs, gloo on CPUs). A resubmitted job resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python trainer/train.py` from the repo root under `ray job submit`
    sys.path.insert(0, str(REPO_ROOT))

from services import storage  # noqa: E402
from services.config import dump_config, load_config  # noqa: E402
from services.third_party_notices import QUIET_TORCHAO_ENV  # noqa: E402
from trainer.config import TrainJobConfig  # noqa: E402

logger = logging.getLogger("trainer.train")

# Passed to the workers so that they reach the same S3 with the same retry policy and stay quiet about optional
# torchao kernels, and so that Ray Train's own actors (its placement-group cleaner asks the state API) find this
# cluster on a host that runs several. Keys are not among them: a runtime_env is shown in the dashboard, and every
# node of a cluster gets its credentials from its own environment (the local stack's head, a Kubernetes Secret).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS",
                 storage.RETRY_DEADLINE_ENV, *QUIET_TORCHAO_ENV,
                 "TORCHINDUCTOR_CACHE_DIR", "GLOO_SOCKET_IFNAME", "RAY_ADDRESS")


def worker_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    for name, value in QUIET_TORCHAO_ENV.items():
        env.setdefault(name, value)
    return env


def train_loop_per_worker(loop_config: dict) -> None:
    """One DDP rank under Ray Train: metrics go to `ray.train.report` and the Ray metrics of services.metrics."""
    import ray.train
    import ray.train.torch

    from services.metrics import TrainMetrics
    from trainer.loop import RankContext, TrainingRun

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = TrainJobConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    metrics = TrainMetrics(rank)

    def report(values: dict[str, float]) -> None:
        if "loss" in values:
            metrics.step(int(values["step"]), values["loss"], values["grad_norm"], values["lr"],
                         values["steps_per_second"], values["samples_per_second"], values["data_wait_fraction"])
        ray.train.report(values)

    run = TrainingRun(config, loop_config["cache"], RankContext(rank, world_size, ray.train.torch.get_device()),
                      reporter=report, on_checkpoint=metrics.checkpoint_seconds, on_skipped=metrics.samples_skipped)
    summary = run.run()
    if rank == 0:
        print("TRAIN_SUMMARY " + json.dumps(summary), flush=True)
    if len(set(summary["replica_fingerprints"])) > 1:
        raise RuntimeError(f"DDP ranks diverged: weight fingerprints {summary['replica_fingerprints']}")


def fit(config: TrainJobConfig):
    """Resolve the cache and run the Ray Train job; returns Ray's Result."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.inputs import check_teacher, resolve_cache

    cache = resolve_cache(config)
    if config.teacher is not None:
        logger.info("distilling from teacher %s", check_teacher(config, cache))
    logger.info("training on %d shards (%d samples), validating on %d shards", len(cache.train_shards),
                sum(shard.num_samples for shard in cache.train_shards), len(cache.validation_shards))
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": worker_env()})
    scaling = config.scaling
    torch_trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "cache": cache},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=scaling.resources_per_worker or None),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(name=config.run_name, storage_path=config.ray_storage_path,
                             failure_config=FailureConfig(max_failures=scaling.max_failures)),
    )
    return torch_trainer.fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (configs/train/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. max_steps=10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(TrainJobConfig, args.config, args.set)
    logger.info("effective config:\n%s", dump_config(config))
    result = fit(config)
    logger.info("finished: %s", result.metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
