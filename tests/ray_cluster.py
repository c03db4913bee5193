"""A real two-node Ray cluster on this machine, for tests: a head started with
`ray start --head` and a second node joined to it in its own process group (so a test can
kill the whole node), with token authentication on and a token made for the test.

Ray maps 127.0.0.1 to the machine's outward address, so the nodes take other loopback
addresses: the head 127.0.0.2, the second node 127.0.0.3.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cli_helpers import env


@dataclass
class Cluster:
    address: str  # the GCS, HOST:PORT, for `ray.init` and `cluster.address`
    dashboard: str | None  # the Jobs API, http://HOST:PORT
    node: subprocess.Popen  # the second node's `ray start --block`
    env: dict[str, str]  # RAY_AUTH_MODE and RAY_AUTH_TOKEN for clients


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join_node(address: str, cluster_env: dict[str, str], cpus: int = 1) -> subprocess.Popen:
    """A node on 127.0.0.3 joining the cluster at `address`, in its own process group (a test
    kills it whole: `ray start --block`, its raylet and the workers on it)."""
    ray = str(Path(sys.executable).parent / "ray")
    agent = f"--dashboard-agent-listen-port={_free_port('127.0.0.3')}"  # see two_node_cluster
    return subprocess.Popen(
        [ray, "start", f"--address={address}", "--node-ip-address=127.0.0.3", f"--num-cpus={cpus}", agent, "--block"],
        env=env(**cluster_env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@contextlib.contextmanager
def two_node_cluster(head_cpus: int = 2, node_cpus: int = 1, dashboard: bool = False) -> Iterator[Cluster]:
    ray = str(Path(sys.executable).parent / "ray")
    port = _free_port("127.0.0.2")
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    # PATH: jobs run `trainctl`, which lies beside this Python
    cluster_env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    address = f"127.0.0.2:{port}"
    head = [
        ray,
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.2",
        f"--num-cpus={head_cpus}",
        f"--temp-dir={temp}",
        # Each node's dashboard agent on a port of its own: Ray's fixed 52365 is taken when
        # another Ray runs on this machine (a second test process's cluster), and a Jobs
        # submission then finds "No available agent to submit job".
        f"--dashboard-agent-listen-port={_free_port('127.0.0.2')}",
    ]
    url = None
    if dashboard:
        dport = _free_port("127.0.0.2")
        head += ["--include-dashboard=true", "--dashboard-host=127.0.0.2", f"--dashboard-port={dport}"]
        url = f"http://127.0.0.2:{dport}"
    else:
        head.append("--include-dashboard=false")
    # The GCS declares a node dead after 5 failed health checks, 3 s apart by default (a
    # killed node's job waited ~15 s for that); 1 s apart here, each allowed 2 s.
    health = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000"}
    subprocess.run(head, env=env(**cluster_env, **health), check=True, capture_output=True, timeout=120)
    node = join_node(address, cluster_env, node_cpus)
    probe = (
        "import ray, time\nray.init(address='%s', logging_level='ERROR')\nfor _ in range(120):\n"
        "    if sum(n['Alive'] for n in ray.nodes()) == 2: break\n    time.sleep(0.5)\n"
        "print(sum(n['Alive'] for n in ray.nodes()))" % address
    )
    try:
        alive = subprocess.run(
            [sys.executable, "-c", probe], env=env(**cluster_env), capture_output=True, text=True, timeout=120
        )
        assert alive.stdout.strip().endswith("2"), alive.stderr[-2000:]
        yield Cluster(address, url, node, cluster_env)
    finally:
        stop(temp, address, node)
        shutil.rmtree(temp, ignore_errors=True)


def stop(temp: str, address: str, node: subprocess.Popen) -> None:
    """SIGKILL to this cluster's processes alone, as `ray stop --force` would (which kills
    every Ray process on the machine, another job's or test run's too): the second node's
    tree, whatever names the cluster's temp dir or GCS address (GCS, raylets, dashboard,
    monitors, client server), and every process under those (the workers). Twice, for what a
    raylet started while the first pass killed."""
    import psutil

    for _ in range(2):
        found: dict[int, psutil.Process] = {}
        try:
            found.update(
                {p.pid: p for p in [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]}
            )
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["cmdline"]):
            if temp in " ".join(p.info["cmdline"] or []) or address in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
        for p in list(found.values()):
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        found.pop(os.getpid(), None)
        for p in found.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(found.values()), timeout=30)
    if node.poll() is None:
        node.wait(timeout=30)
