"""Where metrics go: `metrics.jsonl` in the run folder always, W&B when enabled.

Only rank 0 builds a tracker. W&B sits behind the same two calls as the JSONL file, and
any W&B failure (no network, bad key, a crash of its service) becomes one warning: a
dashboard must never stop a training run.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from trainer.config import JobConfig
from trainer.console import warn


class MetricsFile:
    """Appends one JSON object per logged step to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self._fh = None
        self.rewind(resume_step)

    def last_step(self) -> int:
        """The highest step logged so far (0 for none)."""
        if not self.path.exists():
            return 0
        return max(
            (json.loads(row).get("step", 0) for row in self.path.read_text().splitlines() if row.strip()), default=0
        )

    def rows(self) -> list[dict[str, Any]]:
        if self._fh is not None and not self._fh.closed:
            self._fh.flush()
        return (
            [json.loads(row) for row in self.path.read_text().splitlines() if row.strip()] if self.path.exists() else []
        )

    def rewind(self, step: int) -> None:
        """Drop the rows of steps after `step`: they will be logged again (a resume, a rollback)."""
        if self._fh is not None:
            self._fh.close()
        if self.path.exists():
            rows = self.path.read_text().splitlines(keepends=True)
            kept = [row for row in rows if row.strip() and json.loads(row).get("step", 0) <= step]
            if len(kept) != len(rows):
                tmp = self.path.with_name(".metrics.jsonl.tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, self.path)
        self._fh = open(self.path, "a", buffering=1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def finish(self) -> None:
        self._fh.close()


class WandbTracker:
    """W&B from rank 0. offline by default: the run folder lands in run_dir/wandb and
    `wandb sync` uploads it later. A stable run id (kept in run_dir) with resume="allow"
    continues the same W&B run after a restart. The steps replayed after a resume (those
    between the checkpoint and the crash) are not sent again (see Tracker): W&B history is
    append-only, and a resumed run recomputes them bit for bit anyway."""

    def __init__(self, cfg: JobConfig, run_dir: Path, floor: int = -1):
        """`floor`: the last step W&B was sent before the checkpoint this start resumes from
        (its trainctl.json), for a machine that has none of this run's W&B files."""
        import wandb  # an integration imports its library inside, not at the top of core files

        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE") or cfg.tracking.mode
        rid = run_id(run_dir)
        self.mode = mode
        self.earlier = sorted(run_dir.glob(f"wandb/*-{rid}/run-{rid}.wandb"))  # this run's files, before this start
        self.run = wandb.init(
            project=cfg.tracking.project,
            entity=cfg.tracking.entity,
            group=cfg.tracking.group,
            tags=cfg.tracking.tags or None,
            name=cfg.name,
            id=rid,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=cfg.redacted(),  # secrets (URL credentials, secret cluster.env values) as ***
            # x_disable_meta: W&B would record the command line (and so a secret given as an override)
            settings=wandb.Settings(silent=True, console="off", x_disable_meta=True),
        )

        # Every metric is drawn against the global step, so a resumed run continues one line.
        self.run.define_metric("trainer/global_step")
        self.run.define_metric("*", step_metric="trainer/global_step")
        self.held = self._held(floor)  # here, in W&B's start thread: reading its files takes a while

    name, replaces = "wandb", False  # append-only: a step it holds is never sent again

    def held_step(self) -> int:
        return self.held

    def _held(self, floor: int = -1) -> int:
        """The last step W&B holds of this run (-1: none): a resumed online run's, as its
        server says; offline, the highest step in this run's earlier offline files here
        (what reached the disk before a crash), or, on a machine with none of them (a fresh
        one, after `wandb sync --clean`), `floor`: what the checkpoint says was sent."""
        if self.mode == "online":
            return self.run.starting_step - 1 if self.run.resumed else -1
        if not self.earlier:
            return floor
        return max((step for f in self.earlier for step in history_steps(f)), default=-1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({**{k: v for k, v in metrics.items() if v is not None}, "trainer/global_step": step}, step=step)

    def summarize(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.log({key: self._wandb.Table(columns=columns, data=rows)}, step)

    def finish(self) -> None:
        self.run.finish()


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a W&B run file (run-ID.wandb: LevelDB's log format, 32 KiB blocks of
    records with a 7-byte header, after a 7-byte ':W&B' file header; wandb 0.31 has no
    Python reader of it). A record cut off by a crash ends the file."""
    block, header = 32768, 7
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return
    buf, pos = b"", header
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # a block's trailer too short for a record header
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        pos += header
        if pos + length > len(data):
            return
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL, LAST
            yield buf
            buf = b""


def history_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Every history row of a W&B run file as {key: value}, with '_step'."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in wandb_records(path):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a damaged record: the file ends there
            return
        if rec.WhichOneof("record_type") == "history":
            yield {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}


def history_steps(path: Path) -> list[int]:
    return [row["_step"] for row in history_rows(path) if "_step" in row]


def run_id(run_dir: Path) -> str:
    """The run's W&B id, created once and kept in the run folder."""
    path = run_dir / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    rid = secrets.token_hex(4)
    path.write_text(rid + "\n")
    return rid


class Sink:
    """One dashboard behind the tracker: its start (in a daemon thread), what it held when it
    started, the step last sent to it, and the calls made while it starts."""

    def __init__(self, name: str, start: Callable[[], Any], limit_s: float):
        self.name = name
        self.backend: Any = None
        self.starting: Future | None = in_daemon_thread(start, f"{name}-start")
        self.limit = time.monotonic() + limit_s
        self.high = -1  # it held every step up to here when it started (asked of it then)
        self.last = -1  # the step last sent to it: an earlier one (replayed) is not sent again
        self.carried: dict[str, Any] = {}  # events of a replayed step, sent with its next new step
        self.pending: list[tuple[str, tuple, int | None, bool]] = []


LABELS = {"wandb": "W&B", "tensorboard": "TensorBoard", "mlflow": "MLflow"}


class Tracker:
    """Fans each log call out to the metrics file and to each dashboard of
    `tracking.backends` that works (W&B, TensorBoard, MLflow: trainer/dashboards.py).

    Each dashboard starts in a thread (W&B's service takes a second or more), so the first
    steps do not wait for it: calls made before it is up are kept and sent, in order, once
    it is. A start that has not finished `tracking.start_timeout_s` after it began (W&B's
    service or its server not answering: an online init hangs on a server that accepts and
    never replies) turns that dashboard off with one warning; the thread is a daemon, so the
    run still ends. Any later failure of a dashboard is one warning and that dashboard off.

    Each step reaches each dashboard once. A resume replays the steps after its checkpoint;
    what a dashboard holds is asked of it once it is up (`held_step`: W&B's server or offline
    files, TensorBoard's event files, MLflow's store), not taken from metrics.jsonl, which can
    be ahead of it after a crash (a SIGKILL loses what W&B's service had not written). The
    rows of metrics.jsonl it lacks up to the resume step are sent first (backfill). An
    append-only history (W&B, MLflow) keeps a replayed step's first values; TensorBoard
    (`replaces`) hides what an earlier attempt wrote after the checkpoint and takes the
    replayed steps again, so its values are metrics.jsonl's."""

    def __init__(self, cfg: JobConfig, run_dir: Path, resume_step: int = 0, wandb_floor: int = -1):
        self.file = MetricsFile(run_dir, resume_step)
        self.resume_step = resume_step  # the file's rows up to here are earlier attempts'
        self.start_timeout_s = cfg.tracking.start_timeout_s
        self.sinks: list[Sink] = []
        for name in cfg.tracking.backends:
            if name == "wandb":
                if (os.environ.get("WANDB_MODE") or cfg.tracking.mode) == "disabled":
                    continue
                run_id(run_dir)  # now, not in the thread: a checkpoint saved at once records the same id
                start = functools.partial(WandbTracker, cfg, run_dir, wandb_floor)
            elif name == "tensorboard":
                from trainer.dashboards import TensorBoardBackend

                start = functools.partial(TensorBoardBackend, run_dir, resume_step)
            else:
                from trainer.dashboards import MlflowBackend

                start = functools.partial(MlflowBackend, cfg, run_dir, run_dir / "mlflow_run_id")
            self.sinks.append(Sink(name, start, cfg.tracking.start_timeout_s))

    @property
    def wandb_last(self) -> int:
        """The last step W&B was given (-1: none, or W&B is off): a checkpoint records it, for
        a fresh machine's resume to send W&B only what it lacks. Steps logged while W&B still
        starts count: they are kept and go out once it is up, at the latest in `finish`
        (a preemption's checkpoint can come before a slow start ends; counting only the sent
        ones made the next machine send them a second time). A start that then fails leaves
        them unsent; that attempt's warning says W&B was off."""
        for sink in self.sinks:
            if sink.name == "wandb":
                if sink.starting is None:
                    return sink.last
                return max([sink.last, *(at for _, _, at, _ in sink.pending if at is not None)])
        return -1

    def _started(self, sink: Sink, wait: bool) -> bool:
        """Whether the dashboard's start has finished (waiting for it, within its time, if
        `wait`); a failed or overdue start is one warning."""
        if sink.starting is None:
            return True
        left = sink.limit - time.monotonic()
        if not sink.starting.done() and not (wait or left <= 0):
            return False
        label = LABELS[sink.name]
        try:
            sink.backend = sink.starting.result(timeout=max(left, 0))
            sink.high = sink.backend.held_step()
            sink.pending[:0] = self._backfill(sink.high)
        except FutureTimeout:
            warn(
                f"{label} did not start in {self.start_timeout_s:g} s (tracking.start_timeout_s), tracking to it is "
                f"off for this run; metrics still go to {self.file.path}"
            )
            sink.backend = None
            if sink.name == "wandb":
                stop_wandb_service()  # else W&B's exit hook waits for it, and it for the server that does not answer
        except Exception as e:  # noqa: BLE001 - any dashboard failure must not stop training
            warn(
                f"{label} tracking is off for this run ({type(e).__name__}: {e}); metrics still go to {self.file.path}"
            )
            sink.backend = None
        sink.starting = None
        return True

    def _backfill(self, held: int) -> list[tuple[str, tuple, int | None, bool]]:
        """The earlier attempts' rows a dashboard does not hold (W&B's service had not written
        them when the machine died; a new machine's empty TensorBoard folder), as log calls:
        metrics.jsonl has them up to the resume step."""
        calls = []
        for row in self.file.rows():
            step = row.pop("step", 0)
            if held < step <= self.resume_step:
                calls.append(("log", (row, step), step, False))
        return calls

    def rewind(self, step: int) -> None:
        """A rollback to `step`: the file drops the later rows; a dashboard that replaces
        hides them; the append-only ones keep their first values (`last`)."""
        self.file.rewind(step)
        self._call("purge", step + 1)

    def log(self, metrics: dict[str, Any], step: int, event: bool = False) -> None:
        """Log a step's values. A step a dashboard already holds (replayed after a resume or
        a rollback) is not sent to it again; an `event` (a restart) then goes with its next
        new step."""
        self.file.log(metrics, step)
        self._call("log", metrics, step, step=step, event=event)

    def _call(self, what: str, *args, wait: bool = False, step: int | None = None, event: bool = False) -> None:
        for sink in self.sinks:
            sink.pending.append((what, args, step, event))
            if not self._started(sink, wait):
                continue
            calls, sink.pending = sink.pending, []
            for name, call_args, at, is_event in calls:
                self._send(sink, name, call_args, at, is_event)

    def _send(self, sink: Sink, name: str, args: tuple, at: int | None, is_event: bool) -> None:
        if sink.backend is None:
            return
        if name == "purge":  # a rollback
            if not sink.backend.replaces:  # append-only: every step it was sent is held, the last one too
                sink.high = max(sink.high, sink.last)
                return
            sink.last = sink.high = min(sink.last, args[0] - 1)  # the steps from there are taken again
        elif at is not None and (at <= sink.high or at < sink.last):  # it holds this step
            if is_event:
                sink.carried.update(args[0])
            return
        if name == "log" and sink.carried:
            args, sink.carried = ({**sink.carried, **args[0]}, *args[1:]), {}
        try:
            getattr(sink.backend, name)(*args)
        except Exception as e:  # noqa: BLE001
            hint = (
                f"; run `wandb sync` on {self.file.path.parent}/wandb"
                if name == "finish" and sink.name == "wandb"
                else ""
            )
            warn(f"{LABELS[sink.name]} {name} failed, tracking to it turned off ({type(e).__name__}: {e}){hint}")
            sink.backend = None
        if at is not None:
            sink.last = max(sink.last, at)  # more values of this step may follow

    def describe(self, values: dict[str, Any]) -> None:
        """Facts about the run (its plan figures, the tokenizer): run.json and each dashboard's summary."""
        (self.file.path.parent / "run.json").write_text(json.dumps(values, indent=1) + "\n")
        self._call("summarize", values)

    def summarize(self, rows: list[tuple[str, str]]) -> None:
        self._call("summarize", {f"summary/{k}": v for k, v in rows})

    def samples(self, step: int, rows: list[list[Any]]) -> None:
        """Validation samples (prompt, continuation) as a dashboard table, and samples.jsonl."""
        with open(self.file.path.parent / "samples.jsonl", "a") as f:
            f.writelines(json.dumps({"step": step, "prompt": p, "sample": c}) + "\n" for p, c in rows)
        self._call("table", "val/samples", ["prompt", "sample"], rows, step, step=step)

    def finish(self) -> None:
        self.file.finish()
        self._call("finish", wait=True)  # the calls kept while a dashboard started go out first


def in_daemon_thread(call: Callable[[], Any], name: str) -> Future:
    """`call()` in a daemon thread, its result as a Future: unlike a ThreadPoolExecutor's
    worker, which the interpreter joins at exit, a call that never returns (a hung W&B start)
    does not keep the process from ending."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def stop_wandb_service() -> None:
    """Kill this process's W&B service (wandb-core, a child process): W&B's own exit hook
    waits for the service to end, and a service still trying to reach its server (an init
    that hung) does not end for minutes."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "wandb-core" in child.name() or any("wandb-core" in part for part in child.cmdline()[:1]):
                child.kill()
        except psutil.Error:  # gone meanwhile
            pass
