"""The commands that talk to a cluster: `submit`, `status`, `list`, `logs` and `stop` through
its Jobs API (cluster/jobs.py), and `cluster check` (cluster/check.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launcher.exits import FAILED
from launcher.job import UsageError


def cmd_submit(args: argparse.Namespace) -> int:
    """Validate the job here, then hand it to the cluster's Jobs API with the working directory."""
    from urllib.parse import urlparse

    from cluster.jobs import cluster_data_overrides, dashboard_address, local_data_outside, submit
    from launcher.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config never reaches the cluster
    address = dashboard_address(args.address, cfg.cluster.address)
    workdir = Path.cwd()
    config_path = Path(args.config).resolve()
    if not config_path.is_relative_to(workdir):
        raise UsageError(
            f"{args.config} is outside the working directory {workdir}, which is what gets uploaded: "
            "run submit from a folder that holds the config"
        )
    if not args.shared_data and (problem := local_data_outside(cfg, workdir)):
        raise UsageError(problem)  # a job that would not find its data never reaches the cluster
    # on the cluster: the data where it is there, and the job's own Ray
    overrides = [*args.overrides, *cluster_data_overrides(cfg, workdir), "cluster.address=auto"]
    if (os.environ.get("WANDB_MODE") or cfg.tracking.mode) == "online" and not os.environ.get("WANDB_API_KEY"):
        print(
            "trainctl: warning: tracking.mode is online but WANDB_API_KEY is not set in this shell: the job logs to W&B "
            "offline (`wandb sync` its run folder later)",
            file=sys.stderr,
        )
        overrides.append("tracking.mode=offline")
    url = urlparse(address)
    if (
        url.scheme == "http"
        and url.hostname not in ("127.0.0.1", "localhost", "::1")
        and os.environ.get("RAY_AUTH_MODE") != "token"
    ):
        print(
            f"trainctl: warning: {address} is a remote cluster over plain HTTP without token authentication: anyone who "
            "reaches it can run code there (set RAY_AUTH_MODE=token on the cluster and here)",
            file=sys.stderr,
        )
    if "://" not in cfg.checkpoint.storage_path and Path(cfg.checkpoint.storage_path).is_relative_to(workdir):
        print(
            "trainctl: warning: checkpoint.storage_path is inside the uploaded folder: on the cluster it is the job's "
            "temporary copy; give a shared path or an object-store URL to keep the checkpoints",
            file=sys.stderr,
        )
    job = submit(
        address, workdir, str(config_path.relative_to(workdir)), overrides, cfg.name, cfg.checkpoint.preempt_grace_s
    )
    print(
        f"trainctl: submitted job {job.job_id} (run '{cfg.name}') to {address}\n"
        f"  dashboard: {job.dashboard}\n"
        f"  follow it: trainctl logs {job.job_id} --address {address} --follow"
    )
    print(job.job_id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.jobs import dashboard_address, status

    state, message = status(dashboard_address(args.address, None), args.job_id)
    print(f"{args.job_id}: {state}" + (f" ({message})" if message else ""))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from cluster.jobs import dashboard_address, list_jobs

    rows = list_jobs(dashboard_address(args.address, None))
    print(f"{'JOB':<28} {'STATUS':<10} {'RUN':<20} STARTED")
    for job_id, state, name, started in rows:
        print(f"{job_id:<28} {state:<10} {name:<20} {started}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from cluster.jobs import dashboard_address, logs

    final = logs(dashboard_address(args.address, None), args.job_id, args.follow)
    if final:
        print(f"trainctl: job {args.job_id} ended: {final}", file=sys.stderr)
        return 0 if final == "SUCCEEDED" else FAILED
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from cluster.jobs import dashboard_address, stop

    print(f"{args.job_id}: {stop(dashboard_address(args.address, None), args.job_id)}")
    return 0


def cmd_cluster_check(args: argparse.Namespace) -> int:
    from cluster.check import allreduce, nodes_and_storage, render
    from cluster.ray_job import NotPlaceable, connect, shutdown
    from launcher.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():  # only overrides were given
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    if args.address:
        cfg.cluster.address = args.address
    if "://" in cfg.cluster.address and not cfg.cluster.address.startswith("ray://"):
        raise UsageError(
            f"cluster check needs the cluster's Ray address (HEAD:6379, auto or ray://HEAD:10001), or local for "
            f"this machine, not {cfg.cluster.address!r}: it runs a small job from here"
        )
    conn = connect(cfg.cluster, worker_logs=False, verbose=cfg.tracking.verbose)
    try:
        nodes = nodes_and_storage(cfg.checkpoint.storage_path)
        try:
            net = allreduce(cfg)
        except NotPlaceable as e:
            raise UsageError(str(e)) from None
    finally:
        shutdown(conn)
    print(render(nodes, cfg.checkpoint.storage_path, net, cfg))
    bad = [n.node_id for n in nodes if n.storage != "ok"]
    if bad or not net["correct"]:
        print(
            "trainctl: cluster check failed: "
            + ("storage not writable from " + ", ".join(bad) if bad else "the all-reduce gave a wrong result"),
            file=sys.stderr,
        )
        return FAILED
    return 0
