"""What one rank trains with, and how it is built: the process group, the data stream and
its share of the validation set, the model in its DeepSpeed engine, the saver, and rank 0's
tracker and meter. The loop (loop.py) receives a built `Worker` and only reads it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline import BatchStream, Loader, MixedStream, RawOptions, dataset_stream, val_share
from trainer import checkpoint, hf, lora, patches, perf
from trainer.config import JobConfig, redact_text
from trainer.engine import build_engine, deepspeed_config, import_deepspeed
from trainer.model import Transformer
from trainer.run_folder import Attempt, RunFolder, record_attempt, restore_history
from trainer.saver import Saver
from trainer.targets import Targets
from trainer.tracking import Tracker


def raw_options(cfg: JobConfig) -> RawOptions:
    """How to read data.path if it names raw-text shards."""
    return RawOptions(cfg.data.tokenizer, cfg.data.text_field, cfg.data.allow_pipe)


def data_paths(cfg: JobConfig) -> list[str]:
    return [s.path for s in cfg.data.sources] if cfg.data.sources else [cfg.data.path]


def build_stream(cfg: JobConfig, rank: int, world: int) -> BatchStream:
    """This rank's training stream: one dataset (`dataset_stream`: a TokenStream, or a ShardStream
    for raw-text shards), or several mixed by weight (MixedStream)."""
    d, t = cfg.data, cfg.train
    common = dict(
        grad_accum_steps=cfg.accum_steps,
        seed=t.seed,
        shuffle_buffer=d.shuffle_buffer,
        on_error=d.on_error,
        raw=raw_options(cfg),
    )
    if d.sources:
        return MixedStream(
            [(s.path, s.weight) for s in d.sources], d.seq_len, t.micro_batch_size, rank, world, lanes=d.lanes, **common
        )
    return dataset_stream(d.path, "train", d.seq_len, t.micro_batch_size, rank, world, lanes=d.lanes, **common)


@dataclass
class ValSet:
    """This rank's share of the validation set, in micro batches: of each source, the first
    train.eval_sequences windows of its val split (the same set for any number of ranks,
    micro batch and accumulation), rank r taking a contiguous share of each (rank 0 the
    largest; data_pipeline.validation)."""

    batches: list[torch.Tensor]  # (<= micro_batch_size, T+1) int64 each, the last one maybe shorter
    sequences: int  # in the whole set, every rank's and source's: 0 = nothing to validate on
    forwards: int  # micro batches every rank runs, the largest share's (ZeRO-3 gathers the weights in each)
    filler: torch.Tensor  # (1, T+1): the forward of a rank whose share has fewer batches (its loss unused)


def build_val(cfg: JobConfig, rank: int, world: int) -> ValSet:
    """This rank's share of every source's validation windows, cut into micro batches."""
    t, d = cfg.train, cfg.data
    shares = [
        val_share(path, "val", d.seq_len, rank, world, t.eval_sequences, d.on_error, raw_options(cfg))
        for path in data_paths(cfg)
    ]
    rows = torch.cat([torch.from_numpy(s.rows.astype("int64")) for s in shares])  # (n, T+1)
    largest = sum(-(-s.total // world) for s in shares)  # rank 0's rows (before any skipped chunk)
    return ValSet(
        list(rows.split(t.micro_batch_size)) if len(rows) else [],
        sum(s.total for s in shares),
        -(-largest // t.micro_batch_size),
        torch.zeros((1, d.seq_len + 1), dtype=torch.int64),
    )


def make_targets(cfg: JobConfig, tokenizer: dict) -> Targets:
    """How this run's rows become targets: flagged (chat, prompt-completion) datasets train
    only their flagged tokens; `data.document_masking` (default: on for flagged datasets)
    keeps attention inside each example or document."""
    from data_pipeline import open_dataset

    flags = next(
        (m["flags"] for m in (open_dataset(p, raw_options(cfg)) for p in data_paths(cfg)) if m.get("flags")), None
    )
    d = cfg.data
    masking = d.document_masking if d.document_masking is not None else flags is not None
    return Targets(
        eot=tokenizer["eot"] if masking else None, flags=flags, train_on=d.train_on, segments=masking and bool(flags)
    )


def base_sha256(cfg: JobConfig, rank: int, latest: Path | None) -> str:
    """The LoRA base's weights hash: on a resume the checkpoint's (the launcher has just
    checked the base against it), else computed by rank 0 and known to every rank (a
    failure too: no rank is left waiting in a collective)."""
    if latest is not None and (saved := checkpoint.meta(latest).get("lora")):
        return saved["base_sha256"]
    box = [None, None]
    if rank == 0:
        try:
            box[0] = hf.weights_sha256(cfg.model.init_from)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[1] = f"cannot hash model.init_from={cfg.model.init_from}: {e}"
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise hf.HFError(box[1])
    return box[0]


def build_model(cfg: JobConfig, resuming: bool) -> Transformer:
    """The model to train: `model.init_from`'s weights (read shard by shard), or a seeded
    random init; with `train.lora`, adapters on the frozen pre-trained weights. A full
    fine-tuning resume reads neither (the checkpoint overwrites every weight); a LoRA
    resume reads the base (its checkpoints hold only the adapters)."""
    load = hf.load_model
    if cfg.train.zero_stage == 3:  # each rank holds only its partition, even while loading
        load = partial(hf.load_model_partitioned, ds_config=deepspeed_config(cfg))
    if cfg.train.lora is not None:
        base = load(cfg.model, cfg.model.init_from)
        # The adapters' init from the seed alone: under ZeRO-3's zero.Init the base's random
        # init (overwritten by the file's weights) draws from the generator first.
        torch.manual_seed(cfg.train.seed)
        return lora.apply(base, cfg.train.lora)
    if cfg.model.init_from and not resuming:
        return load(cfg.model, cfg.model.init_from)
    if cfg.model.init_from and cfg.train.zero_stage == 3:  # a resume of a large model: partitioned from the start
        deepspeed = import_deepspeed(cfg.cluster.use_gpu, cfg.tracking.verbose)
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg)):
            return Transformer(cfg.model)
    return Transformer(cfg.model)


def rendezvous_env(rank: int, world: int, port: int, gpus: list[list[str]] | None = None) -> dict[str, str]:
    """torch.distributed's env:// variables for one rank of a group on this machine; with
    `gpus` (each rank's GPU ids, as Ray assigned them), every rank sees the group's GPUs
    (as Ray Train sets them, so NCCL can use peer access between them) and takes its own by
    LOCAL_RANK (tests/test_worker_group.py)."""
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
    }
    if gpus is not None:
        visible = sorted(
            {g for ids in gpus for g in ids}, key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else 0, g)
        )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
        env["LOCAL_RANK"] = str(visible.index(gpus[rank][0]))
    return env


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface, the one holding 127.0.0.1 (lo on
    Linux, lo0 on macOS); None if none does."""
    import psutil  # DeepSpeed's and Ray's dependency

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    return None


def collectives_on_loopback(env: MutableMapping[str, str] = os.environ) -> None:
    """When every rank of the group to be made is on this machine (WORLD_SIZE ==
    LOCAL_WORLD_SIZE: a private Ray's actors, a sweep's trial, `--no-ray` alone or under
    torchrun on one node), gloo's and NCCL's sockets go on the loopback interface
    (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME): gloo otherwise listens on the address the
    machine's hostname resolves to, and NCCL's bootstrap on its first outward interface,
    open to the network. A value already set (the shell, cluster.env) is kept; a group
    across machines (a joined cluster, a multi-node torchrun) is left alone. `env`: the
    process's environment."""
    local = env.get("LOCAL_WORLD_SIZE")
    if local is None or local != env.get("WORLD_SIZE") or (name := loopback_interface()) is None:
        return
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.setdefault(variable, name)


def setup_distributed(cfg: JobConfig) -> tuple[int, int, int]:
    """Join (or make) the process group; returns (rank, world_size, local_rank).

    Under Ray Train (a joined cluster) the group already exists (TorchConfig made it); a
    private Ray's actors (cluster/worker_group.py) and torchrun set the env:// variables; a
    plain process becomes a group of one, its store on a port it holds from the moment it
    is chosen (`patches.hold_port`: DeepSpeed's import comes between). A group on one
    machine keeps its collectives on the loopback interface (`collectives_on_loopback`), and
    rank 0's store listens on 127.0.0.1 alone when that is the address
    (`patches.rendezvous_on_loopback`; torchrun's ranks use torchrun's store).
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(rendezvous_env(0, 1, patches.hold_port()))
        collectives_on_loopback()
        patches.rendezvous_on_loopback()
    deepspeed = import_deepspeed(cfg.cluster.use_gpu, cfg.tracking.verbose)
    # cluster.collective_timeout_s, as Ray Train's TorchConfig has it on a joined cluster (ray_job.torch_config)
    timeout = timedelta(seconds=cfg.cluster.collective_timeout_s)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.cluster.use_gpu else "gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world != cfg.cluster.num_workers:
        raise ValueError(
            f"cluster.num_workers={cfg.cluster.num_workers} but {world} processes joined; set cluster.num_workers={world}"
        )
    if cfg.cluster.use_gpu:
        torch.cuda.set_device(local_rank)
    return rank, world, local_rank


def resume_point(cfg: JobConfig, store: checkpoint.Store) -> Path | None:
    """The checkpoint to start from, the same on every rank (rank 0 decides: ranks must not
    read a shared folder at different moments and disagree). The run's own latest wins;
    `--resume PATH` (another run's checkpoint) applies until the run has one of its own,
    so rerunning the same command after a preemption or a restart continues the run.
    From an object store, each machine downloads it once."""
    found = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        found = store.latest()
        if found is None and cfg.checkpoint.resume_from is not None:
            found = Path(cfg.checkpoint.resume_from)
    if dist.is_initialized():
        box = [None if found is None else str(found)]
        dist.broadcast_object_list(box, src=0)
        found = None if box[0] is None else Path(box[0])
        if found is not None and store.url is not None and found.parent == store.root:
            found = store.fetch(found.name)
    return found


@dataclass
class Worker:
    """What one rank trains with: built once by `start`, then read by the loop's helpers."""

    cfg: JobConfig
    rank: int
    world: int
    device: torch.device
    folder: Path
    store: checkpoint.Store
    stream: Loader
    val: ValSet  # this rank's share of the validation set, every source's in order
    tokenizer: dict
    targets: Targets  # how rows become targets: loss flags, document masking
    hf_base: dict | None = None  # model.init_from: its path and small files, kept in checkpoints for export
    lora: dict | None = None  # train.lora: the adapters' settings and the base's hash, kept in checkpoints
    engine: Any = None
    saver: Saver | None = None
    tracker: Tracker | None = None  # rank 0's
    val_losses: list[tuple[int, float]] = field(default_factory=list)


def start(cfg: JobConfig, run: RunFolder) -> tuple[Worker, Path | None]:
    """Join the group and build the data, the model and the engine in the run folder `run`;
    returns the worker and the checkpoint to resume from (None: a new run)."""
    t = cfg.train
    rank, world, local_rank = setup_distributed(cfg)
    folder, store = run.path, run.store
    if rank == 0:
        store.root.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(cfg.to_yaml())
    # Data: every rank reads the same global order and keeps its own slice of each batch.
    stream = Loader(build_stream(cfg, rank, world), cfg.data.num_workers, pin_memory=cfg.cluster.use_gpu)
    tokenizer = stream.manifest["tokenizer"]
    val = build_val(cfg, rank, world)
    w = Worker(
        cfg,
        rank,
        world,
        torch.device(f"cuda:{local_rank}" if cfg.cluster.use_gpu else "cpu"),
        folder,
        store,
        stream,
        val,
        tokenizer,
        make_targets(cfg, tokenizer),
    )
    torch.manual_seed(t.seed)  # the same seed on every rank gives the same initial weights
    latest = resume_point(cfg, store)
    reshard = latest is not None and checkpoint.needs_resharding(latest, world, t.zero_stage)
    w.engine = build_engine(build_model(cfg, resuming=latest is not None), cfg, universal=reshard)
    # Checkpoints keep the base's URL without its password (export and generate read a URL with
    # `user:***@` with the credentials of the environment or ~/.netrc, or take --base).
    base = redact_text(cfg.model.init_from) if cfg.model.init_from else None
    if cfg.model.init_from:
        w.hf_base = {"path": base, "files": hf.base_files(cfg.model.init_from)}
    if t.lora is not None:
        w.lora = {**t.lora.model_dump(), "base": base, "base_sha256": base_sha256(cfg, rank, latest)}
    w.saver = Saver(
        w.engine, store, rank, cfg.checkpoint.keep, background=cfg.checkpoint.async_save, frozen=t.lora is None
    )
    return w, latest


def start_tracking(w: Worker, step: int, latest: Path | None) -> tuple[perf.Meter, Attempt | None]:
    """The throughput meter on every rank; on rank 0 the tracker, this start of the workers
    recorded (and reported when it is a restart), and the run's facts."""
    cfg = w.cfg
    attempt = None
    if w.rank == 0:
        floor = -1
        if latest is not None and latest.parent == w.store.root:  # the run's own (not --resume's branch point)
            if restored := restore_history(w.folder, latest):
                print(f"trainctl: {', '.join(restored)} taken back from {latest.name}", flush=True)
            floor = checkpoint.meta(latest).get("wandb_sent", -1)
        w.tracker = Tracker(cfg, w.folder, resume_step=step, wandb_floor=floor)
        attempt = record_attempt(w.folder, step, latest)
        if attempt.restarts:
            print(
                f"trainctl: restart {attempt.restarts} of this job: resumed at step {step}, {attempt.lost_s:.0f} s "
                "lost since that checkpoint",
                flush=True,
            )
            w.tracker.log({"restarts": attempt.restarts, "time_lost_s": attempt.lost_s}, step, event=True)
    peak, peak_source = perf.device_peak_tflops(cfg.cluster.peak_tflops, cfg.cluster.use_gpu)
    if not cfg.cluster.use_gpu and not cfg.cluster.peak_tflops:
        (peak,) = perf.mean_over_ranks([peak], w.device)  # measured on every rank at once, as they train
    flops = perf.flops_per_token(cfg.model, cfg.data.seq_len, cfg.train.lora)
    tokens_per_step = cfg.global_batch * cfg.data.seq_len
    meter = perf.Meter(
        flops,
        w.world,
        tokens_per_step,
        peak,
        w.device,
        step,
        *((attempt.launched_at, attempt.launched_step) if attempt else ()),
        peak_source=peak_source,
    )
    if w.rank == 0:
        w.tracker.describe(
            {
                "flops_per_token": flops,
                "peak_tflops_per_worker": peak,
                "peak_source": peak_source,
                "tokens_per_step": tokens_per_step,
                "tokenizer": w.tokenizer,
            }
        )
    return meter, attempt
