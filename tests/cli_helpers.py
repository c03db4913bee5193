"""Running the real `trainctl` command from tests: in a subprocess, with this checkout on
PYTHONPATH and W&B quiet (its mode comes from the job file, not from the caller's shell);
independent runs at once (`together`); a command refused before anything starts in this
process (`trainctl_here`)."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "tests" / "data" / "tinyshakespeare.txt"  # the one test corpus, inside the repo


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


def torchrun(script: str, *args: str, nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` of a script on `nproc` local ranks, its store on a free
    127.0.0.1 port (torchrun's --master_port=0 leaves the workers waiting at rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={port}", script, *args]  # fmt: skip


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", **extra}
    out.pop("WANDB_MODE", None)
    out.pop("WANDB_SERVICE", None)  # set by an in-process wandb.init: a child would use this process's W&B service
    return out


# One thread for torch's CPU kernels in each process a test starts (OMP_NUM_THREADS=1, as Ray
# gives each worker of cpus_per_worker 1 and torchrun each rank), for a module's autouse
# fixture to set: two threads per process on 2 cores, beside any other busy process (a
# second run started at once, another job on the machine), make each parallel region of
# the tiny test models wait for a descheduled thread. Measured on this 2-core machine with a
# niced benchmark beside: 40 steps of a 2-layer model 24.5 s on 2 threads, 0.26 s on 1;
# the nan test's 3 runs 41.8 s -> 17.3 s, with every loss the same (== to the last bit).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def trainctl(*args: str, cwd, timeout: float = 420, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(*args), cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


def trainctl_here(*args: str, cwd) -> subprocess.CompletedProcess:
    """`trainctl ARGS` in this process (launcher.cli.main, in `cwd`), for a command that stops
    on a user's mistake before anything starts: its exit status (main's return, or the
    SystemExit of an argparse error), stdout and stderr, as trainctl() returns them, without
    a Python start and the imports (each module keeps real subprocess checks of exit 2)."""
    from launcher.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["trainctl", *args], code, out.getvalue(), err.getvalue())


def together(*calls: Callable[[], T]) -> list[T]:
    """Independent commands at the same time (each call in its own thread, typically a
    trainctl(...) run), their results in order: on 2 cores one run's Python start and imports
    overlap the other's."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def outward_address() -> str | None:
    """An IPv4 address of this machine other than a loopback one, or None."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


@functools.cache
def _can_unshare() -> bool:
    try:
        return subprocess.run(UNSHARE + ["true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


UNSHARE = ["unshare", "--user", "--map-root-user", "--uts"]
SET_HOSTNAME = "import os, socket, sys; socket.sethostname(sys.argv[1]); os.execv(sys.argv[2], sys.argv[2:])"


def hostname_outward(cmd: list[str]) -> tuple[list[str], bool]:
    """`cmd` in a namespace of its own (user and UTS: no privileges needed) whose hostname
    is this machine's outward address, so that what binds to the address the hostname
    resolves to (gloo, by default) binds to the network, as on a machine whose hostname is
    in DNS (here /etc/hosts maps it to 127.0.0.1, which hides the difference); and whether
    it is. Where that cannot be (no unshare, user namespaces off, no outward address), `cmd`
    as it is and False."""
    address = outward_address()
    if address is None or not _can_unshare():
        return cmd, False
    return [*UNSHARE, sys.executable, "-c", SET_HOSTNAME, address, *cmd], True


def _ip(text: str) -> str:
    """An address as text, an IPv4-mapped IPv6 one as its IPv4 address, a zone left off."""
    import ipaddress

    address = ipaddress.ip_address(text.split("%")[0])
    return str(getattr(address, "ipv4_mapped", None) or address)


def trainctl_watched(*args: str, cwd, timeout: float = 420) -> tuple[subprocess.CompletedProcess, dict[int, set[str]]]:
    """trainctl(...) with its hostname outward (`hostname_outward`), sampling every 0.5 s
    the addresses its process tree (the private Ray it starts included) could be reached on
    and talks to itself over: its listening TCP sockets and unconnected UDP ones, and its
    TCP connections to an address of this machine (between its own processes: Ray's, the
    ranks'). Not a connection out (Ray's UDP probe for the node's address, which sends
    nothing, is one). Returns the result and {pid: {"IP PROCESS-NAME", ...}}."""
    import psutil

    mine = {_ip(a.address) for addresses in psutil.net_if_addrs().values() for a in addresses if a.family in INET}
    cmd, _ = hostname_outward(command(*args))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, set[str]] = {}

    def within(c) -> bool:
        if c.type == socket.SOCK_STREAM:
            return c.status == psutil.CONN_LISTEN or bool(c.raddr) and _ip(c.raddr.ip) in mine
        return not c.raddr

    with ThreadPoolExecutor(1) as pool:  # the pipes drain while this thread samples
        out = pool.submit(proc.communicate, timeout=timeout)
        while not out.done():
            try:
                tree = {p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                break
            tree[proc.pid] = psutil.Process(proc.pid)
            for pid, p in tree.items():  # per process: a system-wide scan reads every process's fds
                try:
                    seen.setdefault(pid, set()).update(
                        f"{_ip(c.laddr.ip)} {p.name()}" for c in p.net_connections("inet") if c.laddr and within(c)
                    )
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            time.sleep(0.5)
        stdout, stderr = out.result()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), seen


INET = (socket.AF_INET, socket.AF_INET6)
