"""The training loop: one worker function, the same as a private Ray's actor, under Ray Train,
torchrun, or alone.

`train_worker(config_dict)` builds a `Worker` (build.py: process group, data, model,
engine, saver, tracker), restores the newest checkpoint into its `TrainState` if there is one, then
loops: one `train_step`, one all-reduce of the step's verdicts, and plain
`if step % every == 0` blocks that call `log`, `validate` and `save`. A divergence
rolls back through the same `restore` as a resume.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline import Loader, tokenizer_from_dict
from data_pipeline.batchstream import effective_lanes
from trainer import checkpoint, perf
from trainer.build import ValSet, Worker, resume_point, start, start_tracking
from trainer.config import JobConfig, redact_text
from trainer.console import duration, progress_line, summary_table
from trainer.evals import evaluate_tasks, load_task
from trainer.generate import continue_prompts
from trainer.guard import DivergenceGuard
from trainer.run_folder import Attempt, RunFolder, StopRequest, history
from trainer.targets import Targets
from trainer.tracking import run_id


def forward(engine, batch: torch.Tensor, targets: Targets):
    """(logits, loss) for a (B, T+1) batch: the mean over its targets, or for flagged rows
    (logits, (sum of the trained targets' losses, their count))."""
    idx, tgt, segments = targets.split(batch)
    if targets.flags is None:
        return engine(idx, tgt, segments)
    logits, loss = engine(idx, tgt, segments, reduction="sum")
    return logits, (loss, (tgt != -100).sum())


def train_step(
    engine,
    batches: Iterator[torch.Tensor],
    accum_steps: int,
    device: torch.device,
    targets: Targets | None = None,
    timer: perf.StepTimer | None = None,
    step: int = 0,
) -> float:
    """Optimizer step number `step`, over `accum_steps` micro batches; returns this rank's
    share of the step's loss (the mean over ranks is the step's loss). `targets` says how
    rows become targets (default: every next token); `timer` adds the seconds of each part
    (waiting for data, forward+backward, optimizer). `train_worker` takes another function
    of this signature in its place (the tests' faults: trainer/faults.py).

    Flagged rows (chat data) train only some targets, a different number in each micro
    batch and on each rank: each micro batch's summed loss is divided by the step's count
    of trained targets over every rank (one all-reduce), so the step's gradient is the
    mean over all its trained tokens, whatever the accumulation and the number of ranks
    (DeepSpeed divides by both; the factor undoes that)."""
    timer = timer or perf.StepTimer(cuda=False)
    targets = targets or Targets()
    total = torch.zeros((), dtype=torch.float64, device=device)
    if targets.flags is None:
        for _ in range(accum_steps):
            with timer("data", host=True):
                batch = next(batches)
            batch = batch.to(device, non_blocking=True)  # (B, T+1)
            with timer("forward_backward"):
                _, loss = forward(engine, batch, targets)
                engine.backward(loss)
            with timer("optimizer"):
                engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            total += loss.detach()
        return total.item() / accum_steps  # one synchronisation per step, not one per micro batch
    with timer("data", host=True):
        micro = [targets.split(next(batches).to(device, non_blocking=True)) for _ in range(accum_steps)]
    count = sum(((tgt != -100).sum() for _, tgt, _ in micro), torch.zeros((), device=device)).double()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(count)
    scale = accum_steps * world / count.clamp(min=1)
    for idx, tgt, segments in micro:
        with timer("forward_backward"):
            _, loss_sum = engine(idx, tgt, segments, reduction="sum")
            loss = loss_sum * scale.to(loss_sum.dtype)
            engine.backward(loss)
        with timer("optimizer"):
            engine.step()
        total += loss.detach()
    return total.item() / accum_steps


@torch.no_grad()
def evaluate(engine, val: ValSet, device: torch.device, targets: Targets | None = None) -> float:
    """The validation loss: the mean over every trained target of every rank's share (the sums
    of the token losses and the token counts all-reduced, so uneven shares, shorter micro
    batches and loss masking weigh each token once). Every rank runs `val.forwards` forward
    passes, a short share's last ones on a filler row whose loss is not counted (under
    ZeRO-3 each forward is collective). NaN when no target was evaluated."""
    targets = targets or Targets()
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for k in range(val.forwards):
        batch = (val.batches[k] if k < len(val.batches) else val.filler).to(device)
        idx, tgt, segments = targets.split(batch)
        _, loss_sum = engine(idx, tgt, segments, reduction="sum")
        if k < len(val.batches):
            total += torch.stack([loss_sum.double(), (tgt != -100).sum().double()])
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


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
        return {
            "data": self.stream.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "rollbacks": self.rollbacks,
            "skip_step": self.skip_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["data"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.rollbacks, self.skip_step = state.get("rollbacks", 0), state.get("skip_step")


def restore(w: Worker, state: TrainState, ckpt: Path) -> None:
    """Load `ckpt` into the engine and `state` (collective): a resume, or a rollback. A rank
    the checkpoint's job did not have takes rank 0's state and a seed of its own."""
    reshard = checkpoint.needs_resharding(ckpt, w.world, w.cfg.train.zero_stage)
    scratch = w.store.root / f".universal-{ckpt.name}" if reshard else None
    state.load_state_dict(checkpoint.load(w.engine, ckpt, w.rank, universal=scratch, strict=w.cfg.train.lora is None))
    if not (ckpt / f"rank_{w.rank:05d}.pt").exists():
        torch.manual_seed(w.cfg.train.seed + w.rank + 1_000_003 * state.step)


def log(w: Worker, state: TrainState, loss: float, figures: dict[str, Any], eta_s: float) -> None:
    """The log interval's metrics to the tracker and a progress line (rank 0)."""
    if w.rank == 0:
        m = {
            "loss": loss,
            **perf.optimizer_figures(w.engine, w.cfg.train.precision),
            **figures,
            "tokens": state.tokens_seen,
            "epoch": w.stream.epoch,
            "data_skipped_shards": len(w.stream.skipped),
            "rollbacks": state.rollbacks,
            **(
                {"data_mix": {redact_text(k): v for k, v in w.stream.proportions().items()}}
                if w.cfg.data.sources
                else {}
            ),
        }
        w.tracker.log(m, state.step)
        print(progress_line(state.step, w.cfg.train.max_steps, m, eta_s), flush=True)


def validate(w: Worker, step: int) -> None:
    """The validation loss, and a few validation prompts continued (on every rank: ZeRO-3
    gathers the weights for each forward)."""
    t = w.cfg.train
    val_loss = evaluate(w.engine, w.val, w.device, w.targets)
    w.val_losses.append((step, val_loss))
    if t.sample_tokens:  # the set's first sequences are rank 0's; another rank's prompts are not logged
        first = w.val.batches[0] if w.val.batches else w.val.filler
        prompts = w.targets.split(first[:VAL_SAMPLES, : VAL_PROMPT_TOKENS + 1])[0].to(w.device)
        out = continue_prompts(w.engine.module, prompts, min(t.sample_tokens, VAL_SAMPLE_TOKENS), seed=step)
    if w.rank == 0:
        w.tracker.log({"val_loss": val_loss}, step)
        if t.sample_tokens and w.val.batches:
            tok = tokenizer_from_dict(w.tokenizer)
            w.tracker.samples(step, [[tok.decode(p.tolist()), tok.decode(c.tolist())] for p, c in zip(prompts, out)])
        print(f"step {step:>6}/{t.max_steps} | val_loss {val_loss:.4f}", flush=True)


def evals_due(w: Worker, step: int, tasks: list) -> list:
    """(name, task) of the train.evals tasks due at `step`: every `every` steps and at the end."""
    t = w.cfg.train
    return [
        (spec.label, task) for spec, task in tasks if step % (spec.every or t.eval_every) == 0 or step == t.max_steps
    ]


def run_evals(w: Worker, step: int, due: list) -> None:
    """The multiple-choice tasks `due`, scored by every rank's share, logged by rank 0."""
    t = w.cfg.train
    tok = tokenizer_from_dict(w.tokenizer)
    t0 = time.perf_counter()
    scores = evaluate_tasks(w.engine.module, tok, due, w.rank, w.world, w.cfg.model.max_seq_len, w.device)
    seconds = time.perf_counter() - t0  # rank 0's, the all-reduce included: every rank waits for the slowest
    if w.rank == 0:
        w.tracker.log({**scores, "eval/seconds": seconds}, step)
        line = " | ".join(f"{name} acc {scores[f'eval/{name}/acc']:.4f} acc_norm {scores[f'eval/{name}/acc_norm']:.4f}"
                          for name, _ in due)  # fmt: skip
        print(f"step {step:>6}/{t.max_steps} | eval {line} | {seconds:.1f} s", flush=True)


def save(w: Worker, state: TrainState, wait: bool) -> None:
    """A checkpoint of this step (in the background unless `wait` or checkpoint.async_save=false)."""
    cfg = w.cfg
    info = {
        "zero_stage": cfg.train.zero_stage,
        "world_size": w.world,
        "global_batch": cfg.global_batch,
        "seq_len": cfg.data.seq_len,
        "data_lanes": effective_lanes(cfg.global_batch, cfg.data.lanes),
        "tokens_seen": state.tokens_seen,
        "name": cfg.name,
        "tokenizer": w.tokenizer,
        **({"hf_base": w.hf_base} if w.hf_base else {}),
        **({"lora": w.lora} if w.lora else {}),
        "wandb_run_id": run_id(w.folder) if w.rank == 0 else None,
        "wandb_sent": w.tracker.wandb_last if w.tracker is not None else -1,  # rank 0's: the step W&B was last sent
    }
    files = {"config.yaml": cfg.to_yaml(), **(history(w.folder) if w.rank == 0 else {})}
    w.saver.save(state.step, state.state_dict(), info, files=files)
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
    state.skip_step = guard.rolled_back(bad_step, alarm, good, rollbacks, position, state.step)
    if w.rank == 0:
        w.tracker.rewind(state.step)


def train_worker(config: dict, run: RunFolder | None = None, step_fn: Callable[..., float] = train_step) -> str:
    """Train to train.max_steps; returns "done", or "preempted" when stopped by a request
    (a checkpoint of the last step is saved first). `run`: the run folder the launcher made
    for the job (default: the config's); `step_fn` trains one step (`train_step`; the
    divergence tests hand in one that injects a fault: trainer/faults.py)."""
    cfg = JobConfig.model_validate(config)
    t, every = cfg.train, cfg.checkpoint.every
    w, latest = start(cfg, run.restored(cfg) if run else RunFolder.of(cfg))
    state = TrainState(w.stream)
    if latest is not None:
        restore(w, state, latest)
        if w.rank == 0:
            how = (
                f" (written by {checkpoint.meta(latest)['world_size']} workers, resharded to {w.world})"
                if checkpoint.needs_resharding(latest, w.world, t.zero_stage)
                else ""
            )
            print(f"trainctl: resumed from {latest} at step {state.step}{how}", flush=True)
    else:
        torch.manual_seed(t.seed + w.rank)  # dropout and sampling differ per rank
    meter, attempt = start_tracking(w, state.step, latest)
    guard = DivergenceGuard(t.spike_factor, t.max_rollbacks, w.folder / "rollbacks.jsonl" if w.rank == 0 else None)
    profiler = perf.Profiler(
        t.profile, state.step, t.max_steps, w.folder, w.rank, cfg.cluster.use_gpu, cfg.tracking.verbose
    )
    stop, status, timer = StopRequest(w.folder), "done", meter.timer
    batches, start_step, t_start = iter(w.stream), state.step, time.perf_counter()
    tasks = [(spec, load_task(spec.path, spec.limit, spec.chat)) for spec in t.evals]  # the launcher checked each file
    if latest is None and cfg.model.init_from and w.val.sequences:  # the imported model's own loss: the baseline
        validate(w, 0)
    if latest is None and cfg.model.init_from and tasks:
        run_evals(w, 0, [(spec.label, task) for spec, task in tasks])  # and its scores
    if t.max_steps == 0 and latest is None:  # import only: the imported weights as the step-0 checkpoint
        save(w, state, wait=True)
    checkpoint.barrier()  # every rank starts timing together (rank 0 had more to set up)
    meter.restart_interval(state.step)  # the first interval starts here, not when the meter was made
    while state.step < t.max_steps:
        profiler.tick(state.step + 1)
        state.skip_step = guard.skip_window(state.step + 1, state.skip_step, batches, cfg.accum_steps)
        if state.step + 1 in t.skip_steps:  # a window the user knows to be bad, passed over untrained
            guard.skip_window(state.step + 1, state.step + 1, batches, cfg.accum_steps)
        position = w.stream.state_dict()  # where this step's data starts, to name it if it must be skipped
        loss = step_fn(w.engine, batches, cfg.accum_steps, w.device, w.targets, timer=timer, step=state.step + 1)
        # Every rank needs the same verdict on the loss, on a stop request and on whether the
        # checkpoint being written in the background is written everywhere: one all-reduce.
        with timer("sync"):
            loss, stop_votes, written = perf.mean_over_ranks(
                [loss, float(stop.requested()), w.saver.written()], w.device
            )
        if written == 1.0:
            with timer("checkpoint", host=True):
                w.saver.commit()
        state.step, state.tokens_seen = state.step + 1, state.tokens_seen + meter.tokens_per_step
        last, preempted = state.step == t.max_steps, stop_votes > 0

        if (alarm := guard.check(loss, state.step)) is not None:
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
        if w.val.sequences and (state.step % t.eval_every == 0 or last):
            with meter.aside():  # evaluation is not a step either
                validate(w, state.step)
                checkpoint.barrier()
        if due := evals_due(w, state.step, tasks):
            with meter.aside():
                run_evals(w, state.step, due)
                checkpoint.barrier()
        if state.step % every == 0 or last or preempted:
            with timer("checkpoint", host=True):
                save(w, state, wait=last or preempted)
        if preempted:
            status = "preempted"
            break
    profiler.close(state.step)
    if w.rank == 0:
        finish(w, state, status, meter, attempt, time.perf_counter() - t_start)
    return status


def finish(w: Worker, state: TrainState, status: str, meter: perf.Meter, attempt: Attempt, wall_s: float) -> None:
    """Rank 0 at the end: the done line, the run's summary to the tracker and the console."""
    if status == "done":
        print(f"trainctl: done: {state.step} steps, {state.tokens_seen:,} tokens in {duration(wall_s)}", flush=True)
    else:
        print(
            f"trainctl: preempted: stopped at step {state.step} with a checkpoint; run the same command to resume",
            flush=True,
        )
    summary = perf.run_summary(w.val_losses, state.tokens_seen, wall_s, meter, attempt.restarts)
    w.tracker.summarize(summary)
    w.tracker.finish()
    print(summary_table(summary), flush=True)
