"""Starting or joining Ray from this process: the reachability check that fails in
seconds, Ray's usage reporting off, and Ray tasks as a `map_fn` for `trainctl prepare
--address` (data_pipeline never imports Ray itself). The private Ray's loopback binding
is trainer/patches.py's `ray_single_machine_mode`."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.prefetch import prefetched
from trainer import patches


def check_reachable(address: str) -> None:
    """A HOST:PORT Ray address that nothing answers on fails here in seconds (ray.init
    would wait for minutes)."""
    if "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise DataError(
            f"--address {address}: no Ray cluster answers there ({e}): start one or check the address"
        ) from None


def no_usage_stats() -> None:
    """Before this process starts or joins Ray: Ray reports usage to its maintainers unless
    told not to; a training job does not phone home (and CI machines have no route out)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def ray_mapper(address: str) -> Callable[..., Iterator[Any]]:
    """map_fn(fn, items, *args) for data_pipeline.prepare: fn(item, *args) of each item as
    a one-CPU Ray task on the cluster at `address` (auto, HOST:PORT, ray://..., or local
    for a private one), results in order, two tasks per cluster CPU in flight. Ray starts
    (or is joined) when the first result is asked for, and a Ray started here stops at the
    end. The cluster's nodes must see the paths in `items` (shared storage)."""

    def map_fn(fn: Callable[..., Any], items: list, *args) -> Iterator[Any]:
        import ray

        owned = not ray.is_initialized()
        if owned:
            no_usage_stats()
            check_reachable(address)
            try:
                if address == "local":
                    with patches.ray_single_machine_mode():
                        ray.init(include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise DataError(
                    f"--address {address}: no Ray cluster there ({str(e).splitlines()[0]}): start one or check the address"
                ) from None
        task = ray.remote(num_cpus=1)(fn)
        window = 2 * max(int(ray.cluster_resources().get("CPU", 1)), 1)
        try:
            for _, ref in prefetched(items, lambda item: task.remote(item, *args), window):
                yield ray.get(ref)
        finally:
            if owned:
                ray.shutdown()

    return map_fn
