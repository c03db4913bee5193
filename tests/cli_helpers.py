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
    """`python -m launcher.cli ARGS` in its own process: its exit status, stdout and stderr.
    The process is forked from a server that has imported torch and DeepSpeed once for the
    session (`forked`), not started from nothing: ~2 s less for each command that trains,
    exports or loads a model (3.8 s -> 1.8 s a tiny --no-ray run, measured on the 2-core VM).
    TRAINCTL_TESTS_SUBPROCESS=1 starts a plain `python -m launcher.cli` instead."""
    if os.environ.get("TRAINCTL_TESTS_SUBPROCESS") == "1":
        return subprocess.run(
            command(*args), cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
        )
    return forked(list(args), Path(cwd), env(**extra_env), timeout)


# What the fork server imports once: what makes a trainctl process slow to start, and reads
# nothing from the environment a test varies when imported (not ray, wandb, transformers or
# huggingface_hub, whose settings are read at import: each child imports those itself).
PRELOAD = ["torch", "deepspeed", "launcher.cli", "trainer.loop", "cli_helpers"]


@functools.cache
def _fork_server():
    """The multiprocessing fork server of this test session, started with the environment a
    plain `python -m launcher.cli` would import torch under (no OMP_NUM_THREADS: libgomp
    reads it when torch loads; each child sets its own thread count) and DS_ACCELERATOR=cpu
    (DeepSpeed reads it at import; trainer/engine.py sets the same)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    saved = dict(os.environ)
    try:
        os.environ.pop("OMP_NUM_THREADS", None)
        os.environ["DS_ACCELERATOR"] = "cpu"
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return ctx


def _run_forked(args: list[str], cwd: str, environ: dict, out_path: str, err_path: str) -> None:
    """In the forked child: become `python -m launcher.cli ARGS` run in `cwd` with `environ`,
    its output into the two files, and exit with its status (Python's 1 and a traceback on
    an exception escaping it, as a plain process)."""
    import atexit
    import multiprocessing
    import runpy
    import traceback

    for fd, path in ((1, out_path), (2, err_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    multiprocessing.set_start_method("fork", force=True)  # a plain process's default (the server's child has its own)
    if environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
    sys.argv = [str(REPO / "launcher" / "cli.py"), *args]
    sys.modules.pop("launcher.cli", None)  # as under `python -m`: the module runs as __main__ alone
    try:
        runpy.run_module("launcher.cli", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - what the interpreter does with it
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # a plain process runs them at exit; multiprocessing's child does not
    sys.stdout.flush()
    sys.stderr.flush()
    if code is None or isinstance(code, int):
        os._exit(code or 0)
    print(code, file=sys.stderr, flush=True)
    os._exit(1)


def forked(args: list[str], cwd: Path, environ: dict, timeout: float) -> subprocess.CompletedProcess:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="trainctl-cli-") as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        proc = _fork_server().Process(target=_run_forked, args=(args, str(cwd), environ, out, err))
        proc.start()
        try:
            proc.join(timeout)
        except BaseException:  # the test ends meanwhile (pytest-timeout): the child with it, as subprocess.run
            proc.kill()
            proc.join()
            raise
        if proc.exitcode is None:
            # what it printed, in the test's report: TimeoutExpired's message leaves it out
            print(f"trainctl {' '.join(args)} ran past {timeout} s; its stdout:\n{_read(out)[-4000:]}")
            print(f"its stderr:\n{_read(err)[-4000:]}", file=sys.stderr)
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(command(*args), timeout, _read(out), _read(err))
        return subprocess.CompletedProcess(command(*args), proc.exitcode, _read(out), _read(err))


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


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
