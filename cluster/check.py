"""`trainctl cluster check`: is this cluster ready for a long job?

Alive nodes with their CPUs, GPUs and memory; whether the job's storage path can be
written from every node (a task pinned to each node writes, reads back and deletes a
probe file); and a short all-reduce over the job's workers (gloo on CPU, NCCL on GPU)
that reports its bus bandwidth, so a slow or broken network shows before the job starts.
The workers start as the job's would: Ray Train on a joined cluster, and on a private Ray
(`cluster.address: local`: this machine) the plain actors of cluster/worker_group.py.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from trainer import patches
from trainer.config import JobConfig


@dataclass
class NodeReport:
    node_id: str
    address: str
    cpus: float
    gpus: float
    memory_gb: float
    storage: str  # "ok" or why not


def _probe_storage(path: str) -> str:
    """Write, read back and delete a small file under `path` (a folder or an fsspec URL)."""
    import socket
    import uuid

    name = f".trainctl-check-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    data = os.urandom(64)
    try:
        if "://" in path:
            import fsspec

            fs, root = fsspec.core.url_to_fs(path)
            fs.pipe_file(f"{root}/{name}", data)
            ok = fs.cat_file(f"{root}/{name}") == data
            fs.rm(f"{root}/{name}")
        else:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, name)
            with open(probe, "wb") as f:
                f.write(data)
            with open(probe, "rb") as f:
                ok = f.read() == data
            os.remove(probe)
        return "ok" if ok else "read back different bytes"
    except Exception as e:  # noqa: BLE001 - reported per node
        return f"not writable ({getattr(e, 'strerror', None) or e})"


def nodes_and_storage(storage_path: str, timeout_s: float = 60) -> list[NodeReport]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe_storage)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(storage_path)
        for n in alive
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    reports = []
    for n, ref in zip(alive, refs):
        res = n.get("Resources", {})
        storage = ray.get(ref) if ref in ready else f"no answer within {timeout_s:g} s"
        reports.append(
            NodeReport(
                n["NodeID"][:12],
                n.get("NodeManagerAddress", "?"),
                res.get("CPU", 0),
                res.get("GPU", 0),
                res.get("memory", 0) / 2**30,
                storage,
            )
        )
    return reports


def _allreduce_worker(config: dict) -> None:
    """Each worker: time all-reduces of a `mb`-MB float32 tensor; rank 0 reports. Under Ray
    Train the process group exists; a private Ray's actors join theirs as a job's ranks do
    (trainer/build.py: env:// on 127.0.0.1, the collectives on the loopback interface)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from trainer.build import collectives_on_loopback

        collectives_on_loopback()
        dist.init_process_group("nccl" if config["use_gpu"] else "gloo", timeout=timedelta(seconds=config["timeout_s"]))
    if config["use_gpu"]:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if config["use_gpu"] else torch.device("cpu")
    n = config["mb"] * 2**20 // 4
    x = torch.ones(n, device=device)
    dist.all_reduce(x)  # warm-up: connections made
    if config["use_gpu"]:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(config["rounds"]):
        dist.all_reduce(x)
    if config["use_gpu"]:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / config["rounds"]
    world = dist.get_world_size()
    # bus bandwidth (as nccl-tests reports it): each rank sends and receives 2(W-1)/W of the buffer
    busbw = n * 4 * 2 * (world - 1) / world / seconds / 1e9
    if dist.get_rank() == 0:
        result = {"busbw_gbs": busbw, "seconds": seconds, "correct": x[0].item() == world ** (config["rounds"] + 1)}
        if isinstance(config["results"], str):  # a file on this machine (a private Ray's)
            with open(config["results"], "w") as f:
                json.dump(result, f)
        else:  # Ray Train V2 keeps reported metrics only with a checkpoint: a queue brings them back
            config["results"].put(result)


def allreduce(cfg: JobConfig, mb: int = 16, rounds: int = 5) -> dict:
    """The all-reduce over the job's workers, started the way the job's would be: on a
    private Ray (`cluster.address: local`) plain Ray actors (cluster/worker_group.py), on a
    joined cluster Ray Train with the job's TorchConfig (`ray_job.torch_config`)."""
    from cluster.ray_job import check_placeable, scaling_config, torch_config

    c = cfg.cluster
    check_placeable(c)
    config = {"mb": mb, "rounds": rounds, "use_gpu": c.use_gpu, "timeout_s": c.collective_timeout_s}
    if c.address == "local":
        import tempfile

        from cluster.worker_group import run_once

        with tempfile.TemporaryDirectory(prefix="trainctl-check-") as tmp:  # the actors are on this machine
            config["results"] = os.path.join(tmp, "allreduce.json")
            run_once(_allreduce_worker, config, c)
            with open(config["results"]) as f:
                return json.load(f)
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    config["results"] = results = Queue(actor_options={"num_cpus": 0})
    trainer = patches.ray_trainer_without_datasets(TorchTrainer)(
        _allreduce_worker,
        train_loop_config=config,
        scaling_config=scaling_config(c),
        run_config=RunConfig(
            name=f"trainctl-check-{int(time.time())}", storage_path=os.path.join(os.path.expanduser("~"), "ray_results")
        ),
        torch_config=torch_config(c),
    )
    trainer.fit()
    return results.get(timeout=60)


def render(nodes: list[NodeReport], storage_path: str, net: dict | None, cfg: JobConfig) -> str:
    lines = [
        f"{len(nodes)} alive nodes:",
        f"  {'NODE':<13} {'ADDRESS':<16} {'CPUS':>5} {'GPUS':>5} {'MEMORY':>10}  STORAGE",
    ]
    for n in nodes:
        lines.append(
            f"  {n.node_id:<13} {n.address:<16} {n.cpus:>5g} {n.gpus:>5g} {n.memory_gb:>7.1f} GiB  {n.storage}"
        )
    lines.append(
        f"storage {storage_path}: "
        + ("writable from every node" if all(n.storage == "ok" for n in nodes) else "NOT writable from every node")
    )
    if net is not None:
        backend = "nccl" if cfg.cluster.use_gpu else "gloo"
        how = "worker actors on this machine's loopback" if cfg.cluster.address == "local" else cfg.cluster.placement
        lines.append(
            f"all-reduce over {cfg.cluster.num_workers} workers ({backend}, {how}): "
            f"{net['busbw_gbs']:.3f} GB/s bus bandwidth, {net['seconds'] * 1e3:.1f} ms per 16 MB"
            + ("" if net["correct"] else "; WRONG RESULT")
        )
    return "\n".join(lines)
