"""W&B (offline, the real library) across a resume: every step once on the dashboard."""

from __future__ import annotations

import json
import time

from wandb_records import history

RESUMED = """
import sys, time
from pathlib import Path
from trainer.config import JobConfig
from trainer.tracking import Tracker
cfg, run = JobConfig.model_validate({"name": "wb", "tracking": {"mode": "offline"}}), Path(sys.argv[1])
first = Tracker(cfg, run)
for step in range(1, 31):
    first.log({"loss": float(step)}, step)
first.finish()
time.sleep(1.1)  # W&B names an offline run's folder by the second it started
second = Tracker(cfg, run, resume_step=20)
second.log({"restarts": 1, "time_lost_s": 5.0}, 20, event=True)
for step in range(21, 41):
    second.log({"loss": 100.0 + step}, step)
second.finish()
"""


def test_a_resumed_run_continues_the_same_wandb_run_without_duplicated_or_dropped_steps(tmp_path):
    """The first attempt logs steps 1-30 and dies; the checkpoint it resumes from is step 20,
    so 21-30 are trained again. W&B history is append-only: it keeps their first values
    (bit for bit the same in a real resume) and gets 31-40 from the second attempt, with
    the restart attached to its first new step. metrics.jsonl holds the second attempt's.
    The trackers run in a process of their own, as in a run: W&B's service may still be
    writing its file when finish() returns (read at once in the test process, the second's
    history was once missing), and a process's end waits for the service."""
    import subprocess
    import sys

    from cli_helpers import REPO, env

    run = tmp_path / "wb"
    run.mkdir()
    r = subprocess.run(
        [sys.executable, "-c", RESUMED, str(run)], env=env(), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1  # one W&B run id, two attempts
    rows = [row for f in files for row in history(f)]
    assert [r["_step"] for r in rows] == list(range(1, 41))
    assert [r["loss"] for r in rows] == [float(s) for s in range(1, 31)] + [100.0 + s for s in range(31, 41)]
    assert rows[30]["restarts"] == 1 and rows[30]["time_lost_s"] == 5.0 and "restarts" not in rows[29]

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 41))
    assert {m["step"]: m["loss"] for m in lines if "loss" in m}[25] == 125.0


CRASH = """
import os, signal, sys, time
from trainer.config import JobConfig
from trainer.tracking import Tracker
t = Tracker(JobConfig.model_validate({"name": "wb", "tracking": {"mode": "offline"}}), __import__("pathlib").Path(sys.argv[1]))
for step in range(1, 31):
    t.log({"loss": float(step)}, step)
t._started(t.sinks[0], wait=True)
t._call("summarize", {})  # the calls kept while W&B started go out
time.sleep(float(sys.argv[2]))
os.killpg(0, signal.SIGKILL)  # the machine is gone: this process and W&B's service, nothing flushed
"""

SECOND = """
import sys
from pathlib import Path
from trainer.config import JobConfig
from trainer.tracking import Tracker
t = Tracker(JobConfig.model_validate({"name": "wb", "tracking": {"mode": "offline"}}), Path(sys.argv[1]), resume_step=20)
for step in range(21, 41):
    t.log({"loss": float(step)}, step)
t.finish()
"""


def test_steps_w_and_b_lost_in_a_crash_are_sent_again_and_none_twice(tmp_path, monkeypatch):
    """A SIGKILL of the process and W&B's service loses what the service had not written:
    metrics.jsonl says 30, W&B's file holds fewer. The resumed tracker asks the file what it
    holds and sends the rest, so the two attempts' files hold every step once. Each attempt
    is a process: W&B's service may still be writing the file when finish() returns (read
    at once in this process it was once empty); a process's end waits for it."""
    import subprocess
    import sys

    from cli_helpers import REPO, env

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "wb"
    run.mkdir()
    r = subprocess.run(
        [sys.executable, "-c", CRASH, str(run), "0"], env=env(), cwd=REPO, start_new_session=True, timeout=120
    )
    assert r.returncode == -9
    (first,) = run.glob("wandb/offline-run-*/run-*.wandb")
    held = [row["_step"] for row in history(first)]
    assert held == list(range(1, len(held) + 1)) and len(held) < 30  # the tail was lost
    time.sleep(1.1)
    r = subprocess.run(
        [sys.executable, "-c", SECOND, str(run)], env=env(), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    steps = [row["_step"] for f in files for row in history(f)]
    assert steps == list(range(1, 41))


SLOW = """
import sys, threading, time
from pathlib import Path
from trainer.config import JobConfig
from trainer.tracking import Tracker, in_daemon_thread
cfg, run, attempt = JobConfig.model_validate({"name": "wb", "tracking": {"mode": "offline"}}), Path(sys.argv[1]), sys.argv[2]
if attempt == "first":
    t = Tracker(cfg, run)
    gate, start = threading.Event(), t.sinks[0].starting
    t.sinks[0].starting = in_daemon_thread(lambda: gate.wait() and start.result(), "slow")  # W&B's start, held back
    for step in range(1, 29):
        t.log({"loss": float(step)}, step)
    print(t.wandb_last, flush=True)  # what a checkpoint saved now records
    gate.set()
    t.finish()
else:  # a fresh machine: none of the W&B files, the checkpoint's record of what W&B was given
    t = Tracker(cfg, run, resume_step=28, wandb_floor=int(attempt))
    for step in range(29, 41):
        t.log({"loss": float(step)}, step)
    t.finish()
"""


def test_a_checkpoint_taken_while_wandb_starts_counts_the_steps_it_will_get(tmp_path):
    """A preemption's checkpoint can come before W&B's start ends (a busy machine: CI saw it
    at step 28). The steps logged meanwhile go out once it is up, so the checkpoint records
    them as given; a fresh machine resuming from it sends W&B only the later steps. Before,
    it recorded -1 and the new machine sent steps 1-28 a second time."""
    import shutil
    import subprocess
    import sys

    from cli_helpers import REPO, env

    run, gone = tmp_path / "wb", tmp_path / "gone"
    run.mkdir()
    first = subprocess.run(
        [sys.executable, "-c", SLOW, str(run), "first"],
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.split() == ["28"]
    shutil.copytree(run, gone)
    shutil.rmtree(run / "wandb")  # the machine is gone; metrics.jsonl comes back with the checkpoint
    time.sleep(1.1)  # W&B names an offline run's folder by the second it started
    second = subprocess.run(
        [sys.executable, "-c", SLOW, str(run), first.stdout.strip()],
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    (a,) = gone.glob("wandb/offline-run-*/run-*.wandb")
    (b,) = run.glob("wandb/offline-run-*/run-*.wandb")
    assert [row["_step"] for f in (a, b) for row in history(f)] == list(range(1, 41))


HUNG = """
import sys, time
from trainer.config import JobConfig
from trainer.tracking import Tracker
cfg = {"name": "wb", "tracking": {"mode": "online", "start_timeout_s": 3}}
t = Tracker(JobConfig.model_validate(cfg), __import__("pathlib").Path(sys.argv[1]))
for step in range(1, 31):
    t.log({"loss": float(step)}, step)
t0 = time.monotonic()
t.finish()
print(f"finished after {time.monotonic() - t0:.1f} s", flush=True)
"""


def test_a_wandb_start_that_hangs_turns_tracking_off_in_its_time_and_the_process_ends(tmp_path):
    """An online W&B whose server accepts connections and never answers (a real socket on
    127.0.0.1): wandb.init hangs (over 40 s, tried). After tracking.start_timeout_s the
    tracker warns once and finishes; the process exits on its own (the start's thread does
    not hold it); metrics.jsonl has every step. Before, finish() waited for the start forever."""
    import socket
    import subprocess
    import sys
    import threading

    from cli_helpers import REPO, env

    server, held = socket.create_server(("127.0.0.1", 0)), []
    threading.Thread(target=lambda: held.extend(iter(server.accept, None)), daemon=True).start()
    run = tmp_path / "wb"
    run.mkdir()
    wandb_env = {"WANDB_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}", "WANDB_API_KEY": "k" * 40}
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", HUNG, str(run)],
        env=env(**wandb_env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
    )
    wall = time.monotonic() - t0
    server.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert held, "W&B never connected to the server"
    warnings = [line for line in r.stderr.splitlines() if "W&B" in line]
    assert warnings == [
        "trainctl: warning: W&B did not start in 3 s (tracking.start_timeout_s), tracking to it is off for this run; "
        f"metrics still go to {run / 'metrics.jsonl'}"
    ], r.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 31))
    assert wall < 40, (wall, r.stdout)


THREE = """
import os, signal, sys
from pathlib import Path
from trainer.config import JobConfig
from trainer.tracking import Tracker
tracking = {"mode": "offline", "backends": ["wandb", "tensorboard", "mlflow"]}
cfg, run, attempt = JobConfig.model_validate({"name": "three", "tracking": tracking}), Path(sys.argv[1]), sys.argv[2]
if attempt == "first":  # steps 1-30, every dashboard up, then the machine dies
    t = Tracker(cfg, run)
    for step in range(1, 31):
        t.log({"loss": float(step), "data_mix": {"a": 0.25}}, step)
    for sink in t.sinks:
        t._started(sink, wait=True)
    t._call("summarize", {})  # the calls kept while they started go out
    os.killpg(0, signal.SIGKILL)
t = Tracker(cfg, run, resume_step=20)  # resumed from the checkpoint at step 20
t.log({"restarts": 1}, 20, event=True)
for step in range(21, 36):
    t.log({"loss": 100.0 + step, "data_mix": {"a": 0.25}}, step)
t.rewind(30)  # a divergence rolled back to the checkpoint at step 30
for step in range(31, 41):
    t.log({"loss": 200.0 + step, "data_mix": {"a": 0.25}}, step)
t.samples(40, [["To be", ", or not to be"]])
t.finish()
"""


def test_three_dashboards_hold_every_step_once_across_a_kill_a_resume_and_a_rollback(tmp_path):
    """W&B, TensorBoard and MLflow together, read back with each library's own reader. The
    first attempt logs 1-30 and is SIGKILLed (TensorBoard's writer had buffered some); the
    second resumes at 20, logs 21-35, rolls back to 30 and logs 31-40. Every dashboard holds
    each step once. TensorBoard's values are metrics.jsonl's (a resume or a rollback hides what
    was written after the checkpoint: its purge); W&B's and MLflow's histories are
    append-only and keep a replayed step's first value (equal in a real resume, where the
    replayed steps are computed again bit for bit; here they differ, to tell them apart)."""
    import subprocess
    import sys

    from cli_helpers import REPO, env
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    run = tmp_path / "runs" / "three"
    run.mkdir(parents=True)
    first = subprocess.run(
        [sys.executable, "-c", THREE, str(run), "first"], env=env(), cwd=REPO, start_new_session=True, timeout=120
    )
    assert first.returncode == -9
    time.sleep(1.1)  # W&B names an offline run's folder by the second it started
    r = subprocess.run(
        [sys.executable, "-c", THREE, str(run), "second"], env=env(), cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-3000:]

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    jsonl = {row["step"]: row["loss"] for row in rows if "loss" in row}
    expected = {s: float(s) for s in range(1, 21)} | {s: 100.0 + s for s in range(21, 31)}
    assert jsonl == expected | {s: 200.0 + s for s in range(31, 41)}

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert sorted(tb) == sorted(jsonl.items())  # each step once, metrics.jsonl's values
    assert [e.step for e in acc.Scalars("data_mix/a")] == list(range(1, 41))

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    rid = (run / "mlflow_run_id").read_text().strip()
    logged = sorted((m.step, m.value) for m in client.get_metric_history(rid, "loss"))
    first_values = {s: float(s) for s in range(1, 31)} | {s: 100.0 + s for s in range(31, 36)}
    assert logged == sorted((first_values | {s: 200.0 + s for s in range(36, 41)}).items())
    assert client.get_run(rid).info.status == "FINISHED" and client.get_run(rid).data.params["name"] == "three"
    (table,) = (tmp_path / "runs" / "mlartifacts").rglob("step_00000040.json")  # beside the store
    assert json.loads(table.read_text())["rows"] == [["To be", ", or not to be"]] and not (REPO / "mlruns").exists()
    assert [e.step for e in acc.Tensors("val/samples/text_summary")] == [40]
    restarts = [(m.step, m.value) for m in client.get_metric_history(rid, "restarts")]
    assert restarts == [(31, 1.0)]  # the restart event rides on the first step MLflow did not hold

    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert [row["_step"] for f in files for row in history(f)] == list(range(1, 41))
