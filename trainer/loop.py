"""The training loop: one worker function, the same under Ray Train, torchrun, or alone.

`train_worker(config_dict)` builds a `Worker` (process group, data, model, engine, saver,
tracker), restores the newest checkpoint into its `TrainState` if there is one, then
loops: one `train_step`, one all-reduce of the step's verdicts, and plain
`if step % every == 0` blocks that call `log`, `validate` and `save`. A divergence
rolls back through the same `restore` as a resume.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from data_pipeline import Loader, MixedStream, RawOptions, TokenStream, eval_batches, tokenizer_from_dict
from trainer import checkpoint, perf
from trainer.config import JobConfig
from trainer.console import duration, progress_line, summary_table
from trainer.engine import build_engine, import_deepspeed
from trainer.generate import continue_prompts
from trainer.guard import DivergenceGuard
from trainer.model import Transformer, document_segments
from trainer.run_folder import StopRequest, checkpoint_store, record_attempt, run_dir
from trainer.saver import Saver
from trainer.tracking import Tracker, run_id


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
    deepspeed = import_deepspeed(cfg.cluster.use_gpu, cfg.tracking.verbose)
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




VAL_SAMPLES, VAL_PROMPT_TOKENS, VAL_SAMPLE_TOKENS = 2, 32, 64  # validation samples logged at each evaluation


@dataclass
class TrainState:
    """Everything of the loop a checkpoint carries (with the engine's state and each rank's
    RNG): the position in steps, tokens and data, and the divergence guard's counters."""

    stream: Loader
    step: int = 0
    tokens_seen: int = 0
    rollbacks: int = 0  # divergence rollbacks so far in the run
    skip_step: int | None = None  # a step whose data window is passed over untrained (after a rollback)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict(), "step": self.step, "tokens_seen": self.tokens_seen,
                "rollbacks": self.rollbacks, "skip_step": self.skip_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["data"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.rollbacks, self.skip_step = state.get("rollbacks", 0), state.get("skip_step")


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
    val: list[torch.Tensor]  # this rank's validation batches, every source's in order
    tokenizer: dict
    eot: int | None  # the end-of-text token when attention is masked per document
    engine: Any = None
    saver: Saver | None = None
    tracker: Tracker | None = None  # rank 0's
    val_losses: list[tuple[int, float]] = field(default_factory=list)


def start(cfg: JobConfig) -> tuple[Worker, Path | None]:
    """Join the group and build the data, the model and the engine; returns the worker and
    the checkpoint to resume from (None: a new run)."""
    t = cfg.train
    rank, world, local_rank = setup_distributed(cfg)
    folder, store = run_dir(cfg), checkpoint_store(cfg)
    if rank == 0:
        store.root.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(cfg.to_yaml())
    # Data: every rank reads the same global order and keeps its own slice of each batch.
    stream = Loader(build_stream(cfg, rank, world), cfg.data.num_workers, pin_memory=cfg.cluster.use_gpu)
    tokenizer = stream.manifest["tokenizer"]
    val = [batch for path in data_paths(cfg)
           for batch in eval_batches(path, "val", cfg.data.seq_len, t.micro_batch_size, rank, world,
                                     max_batches=t.eval_batches, on_error=cfg.data.on_error, raw=raw_options(cfg))]
    w = Worker(cfg, rank, world, torch.device(f"cuda:{local_rank}" if cfg.cluster.use_gpu else "cpu"), folder, store,
               stream, val, tokenizer, tokenizer["eot"] if cfg.data.document_masking else None)
    torch.manual_seed(t.seed)  # the same seed on every rank gives the same initial weights
    latest = resume_point(cfg, store)
    reshard = latest is not None and checkpoint.needs_resharding(latest, world, t.zero_stage)
    w.engine = build_engine(Transformer(cfg.model), cfg, universal=reshard)
    w.saver = Saver(w.engine, store, rank, cfg.checkpoint.keep, background=cfg.checkpoint.async_save)
    return w, latest


def restore(w: Worker, state: TrainState, ckpt: Path) -> None:
    """Load `ckpt` into the engine and `state` (collective): a resume, or a rollback. A rank
    the checkpoint's job did not have takes rank 0's state and a seed of its own."""
    reshard = checkpoint.needs_resharding(ckpt, w.world, w.cfg.train.zero_stage)
    scratch = w.store.root / f".universal-{ckpt.name}" if reshard else None
    state.load_state_dict(checkpoint.load(w.engine, ckpt, w.rank, universal=scratch))
    if not (ckpt / f"rank_{w.rank:05d}.pt").exists():
        torch.manual_seed(w.cfg.train.seed + w.rank + 1_000_003 * state.step)


def log(w: Worker, state: TrainState, loss: float, figures: dict[str, Any], eta_s: float) -> None:
    """The log interval's metrics to the tracker and a progress line (rank 0)."""
    if w.rank == 0:
        m = {"loss": loss, **perf.optimizer_figures(w.engine, w.cfg.train.precision), **figures, "tokens": state.tokens_seen,
             "epoch": w.stream.epoch, "data_skipped_shards": len(w.stream.skipped), "rollbacks": state.rollbacks,
             **({"data_mix": w.stream.proportions()} if w.cfg.data.sources else {})}
        w.tracker.log(m, state.step)
        print(progress_line(state.step, w.cfg.train.max_steps, m, eta_s), flush=True)


def validate(w: Worker, step: int) -> None:
    """The validation loss, and a few validation prompts continued (on every rank: ZeRO-3
    gathers the weights for each forward)."""
    t = w.cfg.train
    val_loss = evaluate(w.engine, w.val, w.device, w.eot)
    w.val_losses.append((step, val_loss))
    if t.sample_tokens:
        prompts = w.val[0][:VAL_SAMPLES, :VAL_PROMPT_TOKENS].to(w.device)
        out = continue_prompts(w.engine.module, prompts, min(t.sample_tokens, VAL_SAMPLE_TOKENS), seed=step)
    if w.rank == 0:
        w.tracker.log({"val_loss": val_loss}, step)
        if t.sample_tokens:
            tok = tokenizer_from_dict(w.tokenizer)
            w.tracker.samples(step, [[tok.decode(p.tolist()), tok.decode(c.tolist())] for p, c in zip(prompts, out)])
        print(f"step {step:>6}/{t.max_steps} | val_loss {val_loss:.4f}", flush=True)


def save(w: Worker, state: TrainState, wait: bool) -> None:
    """A checkpoint of this step (in the background unless `wait` or checkpoint.async_save=false)."""
    cfg = w.cfg
    info = {"zero_stage": cfg.train.zero_stage, "world_size": w.world, "global_batch": cfg.global_batch,
            "seq_len": cfg.data.seq_len, "tokens_seen": state.tokens_seen, "name": cfg.name, "tokenizer": w.tokenizer,
            "wandb_run_id": run_id(w.folder) if w.rank == 0 else None}
    w.saver.save(state.step, state.state_dict(), info, files={"config.yaml": cfg.to_yaml()})
    if wait:
        w.saver.flush()


def rollback(w: Worker, state: TrainState, guard: DivergenceGuard, alarm: str, position: dict) -> None:
    """Back to the newest whole checkpoint, agreed by every rank, keeping the rollback count;
    the diverged step's data window is skipped when the run gets back to it."""
    bad_step, rollbacks = state.step, state.rollbacks + 1
    w.saver.flush()  # a checkpoint still being written was of a good step
    good = resume_point(w.cfg, w.store)
    guard.allow(rollbacks, bad_step, alarm, good)
    restore(w, state, good)
    state.rollbacks = rollbacks
    state.skip_step = guard.rolled_back(bad_step, alarm, good, rollbacks, position)
    if w.rank == 0:
        w.tracker.rewind(state.step)


def train_worker(config: dict, nan_at_step: int = 0) -> str:
    """Train to train.max_steps; returns "done", or "preempted" when stopped by a request
    (a checkpoint of the last step is saved first). `nan_at_step` (fault injection for tests)
    makes that step's loss NaN once, as a real divergence would."""
    cfg = JobConfig.model_validate(config)
    t, every = cfg.train, cfg.checkpoint.every
    w, latest = start(cfg)
    state = TrainState(w.stream)
    if latest is not None:
        restore(w, state, latest)
        if w.rank == 0:
            how = (f" (written by {checkpoint.meta(latest)['world_size']} workers, resharded to {w.world})"
                   if checkpoint.needs_resharding(latest, w.world, t.zero_stage) else "")
            print(f"trainctl: resumed from {latest} at step {state.step}{how}", flush=True)
    else:
        torch.manual_seed(t.seed + w.rank)  # dropout and sampling differ per rank
    meter, attempt = start_tracking(w, state.step, latest)
    guard = DivergenceGuard(t.spike_factor, t.max_rollbacks, w.folder / "rollbacks.jsonl" if w.rank == 0 else None)
    profiler = perf.Profiler(t.profile, state.step, t.max_steps, w.folder, w.rank, cfg.cluster.use_gpu, cfg.tracking.verbose)
    stop, status, timer = StopRequest(w.folder), "done", meter.timer
    batches, start_step, t_start = iter(w.stream), state.step, time.perf_counter()
    checkpoint.barrier()  # every rank starts timing together (rank 0 had more to set up)
    meter.restart_interval(state.step)  # the first interval starts here, not when the meter was made
    while state.step < t.max_steps:
        profiler.tick(state.step + 1)
        state.skip_step = guard.skip_window(state.step + 1, state.skip_step, batches, cfg.accum_steps)
        position = w.stream.state_dict()  # where this step's data starts, to name it if it must be skipped
        poison, nan_at_step = state.step + 1 == nan_at_step, 0 if state.step + 1 == nan_at_step else nan_at_step
        loss = train_step(w.engine, batches, cfg.accum_steps, w.device, w.eot, poison=poison, timer=timer)
        # Every rank needs the same verdict on the loss, on a stop request and on whether the
        # checkpoint being written in the background is written everywhere: one all-reduce.
        with timer("sync"):
            loss, stop_votes, written = perf.mean_over_ranks([loss, float(stop.requested()), w.saver.written()], w.device)
        if written == 1.0:
            with timer("checkpoint", host=True):
                w.saver.commit()
        state.step, state.tokens_seen = state.step + 1, state.tokens_seen + meter.tokens_per_step
        last, preempted = state.step == t.max_steps, stop_votes > 0

        if (alarm := guard.check(loss)) is not None:
            rollback(w, state, guard, alarm, position)
            batches = iter(w.stream)
            meter.restart_interval(state.step)
            continue
        if state.step % t.log_every == 0 or last:
            figures = meter.interval(state.step)
            with meter.aside():  # logging is not a step: every rank leaves its time out (a barrier ends it)
                eta = (time.perf_counter() - t_start) / (state.step - start_step) * (t.max_steps - state.step)
                log(w, state, loss, figures, eta)
                checkpoint.barrier()
        if w.val and (state.step % t.eval_every == 0 or last):
            with meter.aside():  # evaluation is not a step either
                validate(w, state.step)
                checkpoint.barrier()
        if state.step % every == 0 or last or preempted:
            with timer("checkpoint", host=True):
                save(w, state, wait=last or preempted)
        if preempted:
            status = "preempted"
            if w.rank == 0:
                print(f"trainctl: preempted: stopped at step {state.step} with a checkpoint; run the same command to "
                      "resume", flush=True)
            break
    profiler.close(state.step)
    if w.rank == 0:
        finish(w, state, status, meter, attempt, time.perf_counter() - t_start)
    return status


def start_tracking(w: Worker, step: int, latest: Path | None) -> tuple[perf.Meter, Any]:
    """The throughput meter on every rank; on rank 0 the tracker, this start of the workers
    recorded (and reported when it is a restart), and the run's facts."""
    cfg = w.cfg
    attempt = None
    if w.rank == 0:
        w.tracker = Tracker(cfg, w.folder, resume_step=step)
        attempt = record_attempt(w.folder, step, latest)
        if attempt.restarts:
            print(f"trainctl: restart {attempt.restarts} of this job: resumed at step {step}, {attempt.lost_s:.0f} s "
                  "lost since that checkpoint", flush=True)
            w.tracker.log({"restarts": attempt.restarts, "time_lost_s": attempt.lost_s}, step, event=True)
    peak, peak_source = perf.device_peak_tflops(cfg.cluster.peak_tflops, cfg.cluster.use_gpu)
    if not cfg.cluster.use_gpu and not cfg.cluster.peak_tflops:
        (peak,) = perf.mean_over_ranks([peak], w.device)  # measured on every rank at once, as they train
    flops = perf.flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = cfg.global_batch * cfg.data.seq_len
    meter = perf.Meter(flops, w.world, tokens_per_step, peak, w.device, step,
                       *((attempt.launched_at, attempt.launched_step) if attempt else ()), peak_source=peak_source)
    if w.rank == 0:
        w.tracker.describe({"flops_per_token": flops, "peak_tflops_per_worker": peak, "peak_source": peak_source,
                            "tokens_per_step": tokens_per_step, "tokenizer": w.tokenizer})
    return meter, attempt


def finish(w: Worker, state: TrainState, status: str, meter: perf.Meter, attempt, wall_s: float) -> None:
    """Rank 0 at the end: the done line, the run's summary to the tracker and the console."""
    if status == "done":
        print(f"trainctl: done: {state.step} steps, {state.tokens_seen:,} tokens in {duration(wall_s)}", flush=True)
    summary = perf.run_summary(w.val_losses, state.tokens_seen, wall_s, meter, attempt.restarts, meter.peak,
                               meter.peak_source)
    w.tracker.summarize(summary)
    w.tracker.finish()
    print(summary_table(summary), flush=True)
