"""Every use trainctl makes of another library's private internals, in one place.

Each function below names the versions it was written for and why no public API does
the job. `TARGETS` lists the private names they rely on; tests/test_patches.py checks
that each still exists in the installed libraries, so an upgrade that removes one fails
in CI with the patch's name instead of silently changing a user's job. Nothing here runs
at import: a caller applies a patch where it needs it. The Ray ones import Ray inside
and are called only from cluster/ (trainer/ itself never imports Ray).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

# (patch, module, attribute path inside it, the versions it was written for)
TARGETS = [
    ("rendezvous_on_loopback", "torch.distributed.rendezvous", "_create_c10d_store", "torch 2.4-2.13"),
    ("rendezvous_on_loopback", "torch.distributed.rendezvous", "_torchelastic_use_agent_store", "torch 2.4-2.13"),
    ("ray_single_machine_mode", "ray._private.ray_constants", "ENABLE_RAY_CLUSTER", "ray 2.40-2.60"),
    ("ray_single_machine_mode", "ray._private.ray_constants", "ENABLE_RAY_CLUSTERS_ENV_VAR", "ray 2.40-2.60"),
    ("ray_single_machine_mode", "ray._private.parameter", "RayParams.__init__", "ray 2.40-2.60"),
    (
        "ray_single_machine_mode",
        "ray._private.ray_constants",
        "DEFAULT_DASHBOARD_AGENT_LISTEN_PORT",
        "ray 2.40-2.60",
    ),
    ("skip_deepspeed_shm_op", "deepspeed.ops", "__compatible_ops__", "deepspeed 0.16-0.19"),
    (
        "ray_log_dispatcher",
        "ray._private.ray_logging",
        "global_worker_stdstream_dispatcher.add_handler",
        "ray 2.40-2.60",
    ),
    (
        "ray_log_dispatcher",
        "ray._private.ray_logging",
        "global_worker_stdstream_dispatcher.remove_handler",
        "ray 2.40-2.60",
    ),
    ("ray_log_printer", "ray._private.worker", "print_to_stdstream", "ray 2.40-2.60"),
    ("set_load_universal", "deepspeed.runtime.config", "DeepSpeedConfig", "deepspeed 0.16-0.19"),
    (
        "fix_zero3_universal_load",
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3",
        "deepspeed 0.19",
    ),
    ("ray_torch_backend", "ray.train.torch.config", "_TorchBackend.on_start", "ray 2.40-2.60"),
    ("ray_trainer_without_datasets", "ray.train.v2._internal.callbacks", "DatasetsCallback", "ray 2.60"),
    (
        "ray_trainer_without_datasets",
        "ray.train.v2.api.data_parallel_trainer",
        "DataParallelTrainer._create_default_callbacks",
        "ray 2.60",
    ),
    ("ray_upload_limit", "ray._private.runtime_env.packaging", "GCS_STORAGE_MAX_SIZE", "ray 2.40-2.60"),
    ("ray_upload_matchers", "ray._private.runtime_env.packaging", "_get_excludes", "ray 2.40-2.60"),
    ("ray_upload_matchers", "ray._private.runtime_env.packaging", "get_excludes_from_ignore_files", "ray 2.40-2.60"),
]


# Listening sockets bound before rank 0's store is made, by port (`hold_port`): the store
# takes its socket from here instead of binding the port only when it starts.
_HELD: dict[int, socket.socket] = {}


def hold_port(listener: socket.socket | None = None) -> int:
    """A port on 127.0.0.1 for rank 0's rendezvous store, bound and listening from now on
    in this process (`listener`, or a new socket on a free port), so nothing can take it
    while torch and DeepSpeed import: rank 0's store (`rendezvous_on_loopback`) serves on
    this very socket (TCPStore's `master_listen_fd`). The others' connections wait in its
    backlog until then. Returns the port."""
    if listener is None:
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    port = listener.getsockname()[1]
    _HELD[port] = listener
    return port


def rendezvous_on_loopback() -> None:
    """torch 2.4-2.13. Rank 0 serves torch's rendezvous store (TCPStore), which listens on
    every interface whatever address it is given; when that address is the loopback one (a
    private local Ray, `--no-ray` alone), listen there only, on the socket `hold_port`
    bound when the port was chosen if there is one (binding it only now could find it
    taken). torch has no option for the listening address, so its private store factory
    is wrapped. Idempotent."""
    import importlib

    # `import torch.distributed.rendezvous as …` would give the function of that name
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create = rendezvous._create_c10d_store
    if getattr(create, "__name__", "") == "create_store":
        return

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or hostname not in ("127.0.0.1", "localhost") or rendezvous._torchelastic_use_agent_store():
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        listener = _HELD.pop(port, None) or socket.create_server(("127.0.0.1", port), backlog=128)
        return rendezvous.TCPStore(
            host_name=hostname,
            port=port,
            world_size=world_size,
            is_master=True,
            timeout=timeout,
            multi_tenant=True,
            master_listen_fd=listener.detach(),
            use_libuv=use_libuv,
        )

    rendezvous._create_c10d_store = create_store


@contextlib.contextmanager
def ray_single_machine_mode() -> Iterator[None]:
    """ray 2.40-2.60. Around the ray.init that starts a private Ray: its processes listen
    on 127.0.0.1 only. On Linux Ray takes the machine's outward address as the node address
    and its gRPC servers listen on every interface; its single-machine mode (the default on
    macOS and Windows) uses 127.0.0.1. The processes ray.init starts read the variable;
    this process read its copy into ray_constants when ray was imported, so both are set,
    and both restored after (a later `ray start` here must still be able to join nodes).

    And its dashboard agent's HTTP port is left to the system: Ray's default is the fixed
    52365, which a second Ray on the machine (another job, a sweep, a `ray start`) already
    holds; the agent then retries the bind 6 times before going on without it, and the
    raylet waits for it: ray.init took 6.8-7.0 s instead of 2.7-3.1 s beside another Ray
    (measured on the 2-core VM). A private Ray has no dashboard, so nothing reads the port.
    ray.init has no argument for it (`RayParams` takes it), hence the wrap."""
    import ray._private.parameter as parameter
    import ray._private.ray_constants as ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before_env, before = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ.pop("RAY_ADDRESS", None)  # a stray RAY_ADDRESS would join another cluster
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    params_init = parameter.RayParams.__init__

    def any_agent_port(self, *args, **kwargs):
        params_init(self, *args, **kwargs)
        if self.dashboard_agent_listen_port == ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT:
            self.dashboard_agent_listen_port = 0  # the system's choice of a free port

    parameter.RayParams.__init__ = any_agent_port
    try:
        yield
    finally:
        parameter.RayParams.__init__ = params_init
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before_env


def skip_deepspeed_shm_op(deepspeed) -> None:
    """deepspeed 0.16-0.19, CPU only. DeepSpeed's shared-memory all-reduce serves only its
    inference path, yet init_distributed builds it: a ~30 s g++ compile on a machine's first
    run and a "built successfully" line. Marking it incompatible in the op table skips it.
    (Not on GPUs: the op does not exist there, and the lookup would probe every op.)"""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def ray_log_dispatcher():
    """ray 2.40-2.60. The driver's dispatcher of forwarded worker output: trainctl replaces
    Ray's printing handler ("ray_print_logs") with its own, which keeps the console to
    trainctl's lines and sends the rest to the run's log file. Ray has no public hook."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    return global_worker_stdstream_dispatcher


RAY_PRINT_HANDLER = "ray_print_logs"  # the name Ray registers its printing handler under


def ray_log_printer() -> Callable[[dict], None]:
    """ray 2.40-2.60. Ray's own printing of forwarded worker output (the handler it registers
    as RAY_PRINT_HANDLER: `(TrainWorker pid=...)` prefixes, its deduplication, autoscaler
    events only), for `--verbose`, which gets every line through it, each redacted first."""
    import functools

    from ray._private.worker import print_to_stdstream

    return functools.partial(print_to_stdstream, ignore_prefix=False)


def set_load_universal(engine, on: bool) -> None:
    """deepspeed 0.16-0.19. DeepSpeed reads `load_universal_checkpoint` from its config at
    each load, but only sets it when the engine is built: an engine built to load a
    universal checkpoint (a resharded resume) must later roll back to checkpoints of its own
    world size, and the reverse."""
    engine._config.load_universal_checkpoint = on


@contextlib.contextmanager
def fix_zero3_universal_load(engine) -> Iterator[None]:
    """deepspeed 0.19. ZeRO-3's universal-checkpoint load
    (`DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3`)
    (1) gives every optimizer param group the hyperparameters of the checkpoint's group 0
    ("generally ... the same"): with weight decay for matrices and none for norms, the norms
    were decayed; (2) puts one and the same `step` tensor in every group's Adam state, which
    torch's AdamW increments in place once per group, so the bias correction ran ahead. A
    resharded ZeRO-3 resume drifted by 3e-3 in 10 steps; with both undone it is `==`. Each
    group keeps its own values other than the learning rate, which is the checkpoint's
    scheduler's last one for that group (mup and completep give groups their own: group 0's
    would train the hidden matrices at the embedding's rate for the first step), and each
    state its own step. Stages 1 and 2 load both right; this changes nothing there."""
    inner = getattr(engine.optimizer, "optimizer", None)
    groups = getattr(inner, "param_groups", None) or []
    before = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
    yield
    for group, own in zip(groups, before):
        group.update(own)
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and len(scheduler.get_last_lr()) == len(groups):
        for group, lr in zip(groups, scheduler.get_last_lr()):
            group["lr"] = lr
    for state in getattr(inner, "state", {}).values():
        if hasattr(state.get("step"), "clone"):
            state["step"] = state["step"].clone()


def ray_torch_backend(before_start: Callable[[], None], backend: str, timeout_s: float):
    """ray 2.40-2.60. Ray Train's TorchConfig (`backend`, collectives timing out after
    `timeout_s`) whose backend runs `before_start` in every worker before torch's process
    group is made (to apply rendezvous_on_loopback there). Ray Train takes no hook for
    that; its private backend class is subclassed."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute(before_start)
            super().on_start(worker_group, backend_config)

    class Config(TorchConfig):
        @property
        def backend_cls(self):
            return Backend

    return Config(backend=backend, timeout_s=timeout_s)


def ray_trainer_without_datasets(trainer_cls):
    """ray 2.60 (Train v2). `trainer_cls` (TorchTrainer) without its Ray Datasets manager
    (trainctl passes no Ray Datasets), one more Ray process importing Ray Data on the job's
    cores while the workers start. Ray Train takes no option for it;
    `_create_default_callbacks` is private."""
    from ray.train.v2._internal.callbacks import DatasetsCallback

    class WithoutDatasets(trainer_cls):
        def _create_default_callbacks(self):
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, DatasetsCallback)]

    return WithoutDatasets


def ray_upload_limit() -> int:
    """ray 2.40-2.60. The largest working directory the Jobs API accepts (read, not
    changed: `submit` refuses a bigger one before uploading)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return GCS_STORAGE_MAX_SIZE


def ray_upload_matchers():
    """ray 2.40-2.60. Ray's own matchers of what a runtime_env upload leaves out: the
    `excludes` patterns (`_get_excludes`) and each folder's .gitignore/.rayignore. Read, not
    changed: `submit` checks and sizes exactly what Ray will upload."""
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    return _get_excludes, get_excludes_from_ignore_files


def resolve(module: str, attribute: str) -> Any:
    """The object at `module`.`attribute` (dotted), AttributeError/ImportError if gone."""
    import importlib

    obj = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj
