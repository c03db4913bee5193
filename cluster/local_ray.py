"""Starting or joining Ray from this process: the reachability check that fails in
seconds, the private single-machine Ray bound to loopback, and Ray tasks as a `map_fn`
for `trainctl prepare --address` (data_pipeline never imports Ray itself)."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Callable, Iterator

from data_pipeline.errors import DataError
from data_pipeline.prefetch import prefetched


def check_reachable(address: str) -> None:
    """A HOST:PORT Ray address that nothing answers on fails here in seconds (ray.init
    would wait for minutes)."""
    if "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise DataError(f"--address {address}: no Ray cluster answers there ({e}): start one or check the address") from None


@contextlib.contextmanager
def private_ray_on_loopback():
    """Around the ray.init that starts a private Ray: its processes listen on 127.0.0.1
    only. On Linux Ray takes the machine's outward address as the node address and its
    gRPC servers (GCS, raylet, workers, object manager) listen on every interface, so
    anyone on the network could reach a laptop's job. Ray's single-machine mode (its
    default on macOS and Windows) uses 127.0.0.1; the processes ray.init starts inherit
    the variable, and this process's copy of it was read when ray was imported."""
    import ray._private.ray_constants as ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before_env, before = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ.pop("RAY_ADDRESS", None)  # a stray RAY_ADDRESS would join another cluster
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:  # a `ray start` this process runs later must still be able to join nodes
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before_env


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
            check_reachable(address)
            try:
                if address == "local":
                    with private_ray_on_loopback():
                        ray.init(include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise DataError(f"--address {address}: no Ray cluster there ({str(e).splitlines()[0]}): start one or check the address") from None
        task = ray.remote(num_cpus=1)(fn)
        window = 2 * max(int(ray.cluster_resources().get("CPU", 1)), 1)
        try:
            for _, ref in prefetched(items, lambda item: task.remote(item, *args), window):
                yield ray.get(ref)
        finally:
            if owned:
                ray.shutdown()

    return map_fn
