"""The training loop: one worker function, the same under Ray Train, torchrun, or alone.

`train_worker(config_dict)` reads top to bottom: join the process group, build the data,
the model and the engine, resume if a checkpoint exists, then loop with plain
`if step % every == 0` blocks for logging, evaluation and checkpoints. `train_step` is
split out so a test can drive it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from data_pipeline import Loader, MixedStream, RawOptions, TokenStream, eval_batches, tokenizer_from_dict
from trainer import checkpoint, perf
from trainer.config import JobConfig
from trainer.engine import build_engine, import_deepspeed
from trainer.generate import continue_prompts
from trainer.model import ModelConfig, Transformer, document_segments
from trainer.tracking import Tracker, duration, progress_line, run_id, summary_table, warn


def model_config(cfg: JobConfig) -> ModelConfig:
    return ModelConfig(**cfg.model.model_dump())


def raw_options(cfg: JobConfig) -> RawOptions:
    """How to read data.path if it names raw-text shards."""
    return RawOptions(cfg.data.tokenizer, cfg.data.text_field, cfg.data.allow_pipe)


def data_paths(cfg: JobConfig) -> list[str]:
    return [s.path for s in cfg.data.sources] if cfg.data.sources else [cfg.data.path]


def build_stream(cfg: JobConfig, rank: int, world: int) -> TokenStream | MixedStream:
    """This rank's training stream: one dataset, or several mixed by weight."""
    d, t = cfg.data, cfg.train
    common = dict(grad_accum_steps=cfg.accum_steps, seed=t.seed, shuffle_buffer=d.shuffle_buffer, on_error=d.on_error,
                  raw=raw_options(cfg))
    if d.sources:
        return MixedStream([(s.path, s.weight) for s in d.sources], d.seq_len, t.micro_batch_size, rank, world, **common)
    return TokenStream(d.path, "train", d.seq_len, t.micro_batch_size, rank, world, **common)


def run_dir(cfg: JobConfig) -> Path:
    """The run's local folder: metrics, W&B files, attempts, and its checkpoints (or, with an
    object-store storage_path, their local mirror)."""
    c = cfg.checkpoint
    return Path(c.local_path if checkpoint.is_url(c.storage_path) else c.storage_path) / cfg.name


def checkpoint_store(cfg: JobConfig) -> checkpoint.Store:
    c = cfg.checkpoint
    url = f"{c.storage_path.rstrip('/')}/{cfg.name}/checkpoints" if checkpoint.is_url(c.storage_path) else None
    return checkpoint.Store(run_dir(cfg) / "checkpoints", url)


def setup_distributed(cfg: JobConfig) -> tuple[int, int, int]:
    """Join (or make) the process group; returns (rank, world_size, local_rank).

    Under Ray Train the group already exists (TorchConfig made it); under torchrun the
    env:// variables are set; a plain process becomes a group of one.
    """
    if not dist.is_initialized() and "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed = import_deepspeed(cfg.cluster.use_gpu)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.cluster.use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world != cfg.cluster.num_workers:
        raise ValueError(f"cluster.num_workers={cfg.cluster.num_workers} but {world} processes joined; set cluster.num_workers={world}")
    if cfg.cluster.use_gpu:
        torch.cuda.set_device(local_rank)
    return rank, world, local_rank


def forward(engine, batch: torch.Tensor, eot: int | None):
    """(logits, loss) for a (B, T+1) batch; with `eot`, attention stays inside each document."""
    idx = batch[:, :-1]  # (B, T)
    return engine(idx, batch[:, 1:], None if eot is None else document_segments(idx, eot))


def train_step(engine, batches: Iterator[torch.Tensor], accum_steps: int, device: torch.device,
               eot: int | None = None, poison: bool = False, timer: perf.StepTimer | None = None) -> float:
    """One optimizer step over `accum_steps` micro batches; returns this rank's mean loss.
    `eot` turns on document masking; `timer` adds the seconds of each part (waiting for
    data, forward+backward, optimizer); `poison` (a test hook) makes the loss NaN, so the
    gradients and then the weights go NaN as they would in a real divergence."""
    timer = timer or perf.StepTimer(cuda=False)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(accum_steps):
        with timer("data", host=True):
            batch = next(batches)
        batch = batch.to(device, non_blocking=True)  # (B, T+1)
        with timer("forward_backward"):
            _, loss = forward(engine, batch, eot)
            if poison:
                loss = loss * float("nan")
            engine.backward(loss)
        with timer("optimizer"):
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        total += loss.detach()
    return total.item() / accum_steps  # one synchronisation per step, not one per micro batch


@torch.no_grad()
def evaluate(engine, batches: list[torch.Tensor], device: torch.device, eot: int | None = None) -> float:
    """Mean validation loss over every rank's batches."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        _, loss = forward(engine, batch, eot)
        total += torch.tensor([loss.item(), 1.0], dtype=torch.float64, device=device)
    engine.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


PREEMPT = "PREEMPT"  # a file in the run folder: the launcher got SIGTERM, save and stop
LAUNCH = "launch.json"  # written by the launcher: when this invocation started (restarts are counted from it)


class StopRequest:
    """A request to save and stop at the next step boundary: SIGTERM to this process (when
    the worker runs on the main thread: alone or under torchrun), or the PREEMPT file the
    launcher writes when it gets SIGTERM (under Ray, whose workers run the loop in a
    thread). Every rank checks after each step and they agree in one all-reduce."""

    def __init__(self, folder: Path):
        self.file, self.signalled = folder / PREEMPT, False
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread
            pass

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def requested(self) -> bool:
        return self.signalled or self.file.exists()


class Diverged(RuntimeError):
    """The loss went non-finite or spiked more often than train.max_rollbacks allows."""


SPIKE_WINDOW = 20  # steps whose mean loss a spike is measured against
VAL_SAMPLES, VAL_PROMPT_TOKENS, VAL_SAMPLE_TOKENS = 2, 32, 64  # validation samples logged at each evaluation


def loss_alarm(loss: float, recent: deque, factor: float | None) -> str | None:
    """Why a step's loss (the mean over ranks) must not stand, or None."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if factor is not None and len(recent) == recent.maxlen:
        mean = sum(recent) / len(recent)
        if loss > factor * mean:
            return f"the loss {loss:.4f} is {loss / mean:.1f}x the mean of the last {len(recent)} steps ({mean:.4f})"
    return None


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
class Attempt:
    restarts: int  # restarts of the workers so far in this invocation
    lost_s: float  # seconds lost to the last one: from the save of the checkpoint it resumed from until now
    launched_at: float  # when this invocation of `trainctl run` started (wall clock)
    launched_step: int  # the step its first attempt started at


def record_attempt(folder: Path, step: int, ckpt: Path | None) -> Attempt:
    """Note this start of the workers in the run folder and say where it stands."""
    started = json.loads((folder / LAUNCH).read_text())["started_at"] if (folder / LAUNCH).exists() else time.time()
    attempts = folder / "attempts.jsonl"
    with open(attempts, "a") as f:
        f.write(json.dumps({"at": time.time(), "step": step}) + "\n")
    mine = [row for row in map(json.loads, attempts.read_text().splitlines()) if row["at"] >= started]
    restarts = len(mine) - 1
    lost = time.time() - checkpoint.meta(ckpt).get("saved_at", time.time()) if restarts and ckpt is not None else 0.0
    return Attempt(restarts, lost, started, mine[0]["step"])


def train_worker(config: dict) -> str:
    """Train to train.max_steps; returns "done", or "preempted" when stopped by a request
    (a checkpoint of the last step is saved first)."""
    cfg = JobConfig.model_validate(config)
    t = cfg.train
    rank, world, local_rank = setup_distributed(cfg)
    device = torch.device(f"cuda:{local_rank}" if cfg.cluster.use_gpu else "cpu")
    folder, store = run_dir(cfg), checkpoint_store(cfg)
    ckpt_root = store.root
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(cfg.to_yaml())

    # Data: every rank reads the same global order and keeps its own slice of each batch.
    seq = cfg.data.seq_len
    stream = Loader(build_stream(cfg, rank, world), cfg.data.num_workers, pin_memory=cfg.cluster.use_gpu)
    tokenizer = stream.manifest["tokenizer"]
    eot = tokenizer["eot"] if cfg.data.document_masking else None
    tok = tokenizer_from_dict(tokenizer)
    val = [batch for path in data_paths(cfg)  # every source's validation split, in order
           for batch in eval_batches(path, "val", seq, t.micro_batch_size, rank, world, max_batches=t.eval_batches,
                                     on_error=cfg.data.on_error, raw=raw_options(cfg))]

    # Model: the same seed on every rank gives the same initial weights.
    torch.manual_seed(t.seed)
    latest = resume_point(cfg, store)
    reshard = latest is not None and checkpoint.needs_resharding(latest, world, t.zero_stage)
    engine = build_engine(Transformer(model_config(cfg)), cfg, universal=reshard)
    saver = checkpoint.Saver(engine, store, rank, cfg.checkpoint.keep, background=cfg.checkpoint.async_save)

    step, tokens_seen = 0, 0
    if latest is not None:
        state = checkpoint.load(engine, latest, rank, universal=ckpt_root / f".universal-{latest.name}" if reshard else None)
        stream.load_state_dict(state["data"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        if not (latest / f"rank_{rank:05d}.pt").exists():  # a rank the checkpoint's job did not have
            torch.manual_seed(t.seed + rank + 1_000_003 * step)
        if rank == 0:
            how = f" (written by {checkpoint.meta(latest)['world_size']} workers, resharded to {world})" if reshard else ""
            print(f"trainctl: resumed from {latest} at step {step}{how}", flush=True)
    else:
        torch.manual_seed(t.seed + rank)  # dropout and sampling differ per rank

    tracker = Tracker(cfg, folder, resume_step=step) if rank == 0 else None
    attempt = record_attempt(folder, step, latest) if rank == 0 else None
    if attempt is not None and attempt.restarts:
        print(f"trainctl: restart {attempt.restarts} of this job: resumed at step {step}, {attempt.lost_s:.0f} s lost since "
              "that checkpoint", flush=True)
        tracker.log({"restarts": attempt.restarts, "time_lost_s": attempt.lost_s}, step, event=True)
    peak, peak_source = perf.device_peak_tflops(cfg.cluster.peak_tflops, cfg.cluster.use_gpu)
    if not cfg.cluster.use_gpu and not cfg.cluster.peak_tflops:
        (peak,) = perf.mean_over_ranks([peak], device)  # measured on every rank at once, as they train
    flops = perf.flops_per_token(model_config(cfg), seq)
    tokens_per_step = cfg.global_batch * seq
    meter = perf.Meter(flops, world, tokens_per_step, peak, device, step,
                       *((attempt.launched_at, attempt.launched_step) if attempt else ()))
    if rank == 0:
        tracker.describe({"flops_per_token": flops, "peak_tflops_per_worker": peak, "peak_source": peak_source,
                          "tokens_per_step": tokens_per_step, "tokenizer": tokenizer})
    timer = meter.timer
    stop = StopRequest(folder)
    status = "done"
    batches = iter(stream)
    start_step, t_start = step, time.perf_counter()
    recent: deque[float] = deque(maxlen=SPIKE_WINDOW)  # the last steps' losses, for spike detection
    val_losses: list[tuple[int, float]] = []
    # Rollbacks so far, and a step whose data window is passed over after one (both kept in checkpoints).
    rollbacks, skip_step = (state.get("rollbacks", 0), state.get("skip_step")) if latest is not None else (0, None)
    nan_at = int(os.environ.get("TRAINCTL_TEST_NAN_AT_STEP", 0))  # a test hook: poison this step's loss, once
    profiler = perf.Profiler(t.profile, step, t.max_steps, folder, rank, cfg.cluster.use_gpu)
    checkpoint.barrier()  # every rank starts timing together (rank 0 had more to set up)
    meter.restart_interval(step)  # the first interval starts here, not when the meter was made
    while step < t.max_steps:
        profiler.tick(step + 1)
        if step + 1 == skip_step:  # the window that made the loss diverge: consume it untrained
            for _ in range(cfg.accum_steps):
                next(batches)
            skip_step = None
        position = stream.state_dict()  # where this step's data starts, to name it if it must be skipped
        loss = train_step(engine, batches, cfg.accum_steps, device, eot, poison=step + 1 == nan_at, timer=timer)
        nan_at = 0 if step + 1 == nan_at else nan_at
        # Every rank needs the same verdict on the loss, on a stop request and on whether the
        # checkpoint being written in the background is written everywhere: one all-reduce.
        with timer("sync"):
            loss, stop_votes, written = perf.mean_over_ranks([loss, float(stop.requested()), saver.written()], device)
        if written == 1.0:
            with timer("checkpoint", host=True):
                saver.commit()
        step += 1
        tokens_seen += tokens_per_step

        alarm = loss_alarm(loss, recent, t.spike_factor)
        if alarm is not None:
            rollbacks += 1
            saver.flush()  # a checkpoint still being written was of a good step
            good = resume_point(cfg, store)  # the newest whole checkpoint (or --resume's), agreed by every rank
            if rollbacks > t.max_rollbacks or good is None:
                why = (f"{t.max_rollbacks} rollbacks allowed (train.max_rollbacks)" if good is not None
                       else "no checkpoint to roll back to (save sooner: checkpoint.every)")
                raise Diverged(f"step {step}: {alarm}; {why}: lower train.lr or raise train.warmup_steps")
            reshard = checkpoint.needs_resharding(good, world, t.zero_stage)
            state = checkpoint.load(engine, good, rank, universal=ckpt_root / f".universal-{good.name}" if reshard else None)
            stream.load_state_dict(state["data"])
            batches = iter(stream)
            skip_step, bad_step = step, step
            step, tokens_seen = state["step"], state["tokens_seen"]
            recent.clear()
            meter.restart_interval(step)
            if rank == 0:
                tracker.rewind(step)
                warn(f"step {bad_step}: {alarm}: rolled back to {good} (rollback {rollbacks} of {t.max_rollbacks}); "
                     f"the data of step {bad_step} will be skipped: {json.dumps(position)}")
                with open(folder / "rollbacks.jsonl", "a") as f:
                    f.write(json.dumps({"step": bad_step, "alarm": alarm, "checkpoint": str(good), "skipped": position}) + "\n")
            continue
        recent.append(loss)

        if step % t.log_every == 0 or step == t.max_steps:
            figures = meter.interval(step)
            with meter.aside():  # logging is not a step: every rank leaves its time out (a barrier ends it)
                if rank == 0:
                    m = {"loss": loss, **perf.optimizer_figures(engine, t.precision), **figures, "tokens": tokens_seen,
                         "epoch": stream.epoch, "data_skipped_shards": len(stream.skipped), "rollbacks": rollbacks,
                         **({"data_mix": stream.proportions()} if cfg.data.sources else {})}
                    tracker.log(m, step)
                    eta = (time.perf_counter() - t_start) / (step - start_step) * (t.max_steps - step)
                    print(progress_line(step, t.max_steps, m, eta), flush=True)
                checkpoint.barrier()

        if val and (step % t.eval_every == 0 or step == t.max_steps):
            with meter.aside():  # evaluation is not a step either
                val_loss = evaluate(engine, val, device, eot)
                val_losses.append((step, val_loss))
                if t.sample_tokens:  # a few validation prompts continued, on every rank (ZeRO-3 gathers weights)
                    prompts = val[0][:VAL_SAMPLES, :VAL_PROMPT_TOKENS].to(device)
                    out = continue_prompts(engine.module, prompts, min(t.sample_tokens, VAL_SAMPLE_TOKENS), seed=step)
                if rank == 0:
                    tracker.log({"val_loss": val_loss}, step)
                    if t.sample_tokens:
                        tracker.samples(step, [[tok.decode(p.tolist()), tok.decode(c.tolist())] for p, c in zip(prompts, out)])
                    print(f"step {step:>6}/{t.max_steps} | val_loss {val_loss:.4f}", flush=True)
                checkpoint.barrier()

        preempted = stop_votes > 0
        if step % cfg.checkpoint.every == 0 or step == t.max_steps or preempted:
            rank_state = {"data": stream.state_dict(), "step": step, "tokens_seen": tokens_seen, "rollbacks": rollbacks,
                          "skip_step": skip_step}  # a rollback's pending skip survives a restart
            info = {"zero_stage": t.zero_stage, "world_size": world, "global_batch": cfg.global_batch, "seq_len": seq,
                    "tokens_seen": tokens_seen, "name": cfg.name,
                    "tokenizer": tokenizer, "wandb_run_id": run_id(folder) if rank == 0 else None}
            with timer("checkpoint", host=True):
                saver.save(step, rank_state, info, files={"config.yaml": cfg.to_yaml()})
                if step == t.max_steps or preempted:
                    saver.flush()
        if preempted:
            status = "preempted"
            if rank == 0:
                print(f"trainctl: preempted: stopped at step {step} with a checkpoint; run the same command to resume", flush=True)
            break

    profiler.close(step)
    if rank == 0:
        wall = time.perf_counter() - t_start
        if status == "done":
            print(f"trainctl: done: {step} steps, {tokens_seen:,} tokens in {duration(wall)}", flush=True)
        summary = perf.run_summary(val_losses, tokens_seen, wall, meter, attempt.restarts, peak, peak_source)
        tracker.summarize(summary)
        tracker.finish()
        print(summary_table(summary), flush=True)
    return status
