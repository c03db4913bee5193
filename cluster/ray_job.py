"""Where a job runs: connecting to Ray and running the worker function with Ray Train.

This is the only place (with launcher/) that imports ray. The training loop knows
nothing of Ray: `run_on_ray` takes the worker function as an argument and hands each
worker the resolved config as a plain dict.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from trainer.config import ClusterSection

# Ray reports usage to its maintainers unless told not to; a training job should not
# phone home, and CI machines have no route out anyway.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class JobFailed(RuntimeError):
    """A worker raised; the message carries the worker's own error."""


@dataclass
class Connection:
    address: str
    started_here: bool


def connect(cluster: ClusterSection) -> Connection:
    """Join the cluster named by `cluster.address`, or start a private one.

    'local' starts a Ray sized to the job on this machine (no dashboard); 'auto' joins
    the cluster `ray start` made here; anything else is a cluster address.
    """
    import ray

    if cluster.address == "local":
        os.environ.pop("RAY_ADDRESS", None)  # a stray RAY_ADDRESS would join another cluster
        needed = cluster.num_workers * cluster.cpus_per_worker
        ray.init(
            runtime_env={"env_vars": worker_env(cluster)},
            num_cpus=needed,
            num_gpus=cluster.num_workers if cluster.use_gpu else 0,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
        return Connection("local", True)
    ray.init(address=cluster.address, runtime_env={"env_vars": worker_env(cluster)}, log_to_driver=True, logging_level="WARNING")
    return Connection(cluster.address, False)


def worker_env(cluster: ClusterSection) -> dict[str, str]:
    """Environment for every worker: DeepSpeed's accelerator (read once, at import) and the user's extras."""
    # Ray Train's print patch tees each print to its logger once stdout is wrapped (W&B wraps
    # rank 0's), so every progress line would reach the console twice.
    env = {"DS_ACCELERATOR": "cuda" if cluster.use_gpu else "cpu", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env.update(cluster.env)
    return env


def run_on_ray(train_fn: Callable[[dict], None], config: dict[str, Any], cluster: ClusterSection,
               name: str, storage_path: str) -> None:
    """Run `train_fn(config)` on `cluster.num_workers` Ray Train workers and wait.

    Raises JobFailed with the worker's error when training fails after the allowed
    restarts (`cluster.max_failures`).
    """
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=cluster.num_workers,
            use_gpu=cluster.use_gpu,
            resources_per_worker={"CPU": cluster.cpus_per_worker, **({"GPU": 1} if cluster.use_gpu else {})},
            placement_strategy=cluster.placement,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cluster.max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise JobFailed(_worker_error(str(e))) from None


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failed)): (.+)$")


def _worker_error(text: str) -> str:
    """The worker's own exception line from Ray's error text, e.g. 'ValueError: boom'."""
    for line in (ln.strip() for ln in text.splitlines()):
        m = _EXC_LINE.match(line)
        if m and not m.group(1).startswith("ray."):
            return line
    return text.strip().splitlines()[-1] if text.strip() else "training failed"


def shutdown(conn: Connection) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
