"""Chaos soak: one job on the real local Ray, interrupted again and again, must end exactly
where an uninterrupted run ends.

    python benchmarks/chaos.py [--faults 20] [--seed N] [--steps S] [--no-shard] [--keep DIR]
                               [--work DIR --reference RUN] [key=value ...]

The job (2 Ray workers, DeepSpeed ZeRO-2 on gloo, a checkpoint every 10 steps, W&B
offline) is run once without faults, then again with `--faults` faults at steps drawn from
`--seed` (printed: a failure replays with it). Each fault is followed by what a user does:

- kill-worker: SIGKILL of a random worker. Nothing: `cluster.max_failures` lets
  Ray restart the workers, which resume from the newest checkpoint.
- kill-launcher: SIGKILL of `trainctl run` and every process under it (its private Ray:
  the machine's job is gone at once). The same command again.
- sigterm: SIGTERM to `trainctl run` (a preemption): it saves at the next step, exits 143.
  The same command again.
- truncate-checkpoint: SIGKILL of `trainctl run` and its tree, then the newest checkpoint is left as a
  save cut off mid-write leaves it (its model file truncated, no completion marker). The
  same command again, which must pass over it for the one before.

Then (unless --no-shard), checked apart because it changes the data: one chunk of a copy of
the shards corrupted, `data.on_error: skip`: the job must finish and name the chunk skipped.

`--work DIR --reference RUN` (the test suite's way, tests/test_checkpoints.py): DIR already
holds `job.yaml` and its prepared data, and RUN (under DIR) is a finished uninterrupted run
of that job to compare against, so none is run here; `key=value` overrides go to every run.

Prints the seed, each fault with the step it resumed from and the Ray processes of the
job left after it, then: faults injected and survived, Ray processes left (goal 0), steps
lost in total, wall time against the uninterrupted run, whether every step's loss is `==`
the uninterrupted run's (and no step logged twice in metrics.jsonl), and whether W&B's offline history (every offline run file of the
run) holds every step once. Exit status 0 only when all of that holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

KINDS = ("kill-worker", "kill-launcher", "sigterm", "truncate-checkpoint")
JOB = """\
name: chaos
model: {{n_layer: 4, n_head: 4, d_model: 128, max_seq_len: 64}}
data: {{path: data, seq_len: 64}}
train: {{max_steps: {steps}, micro_batch_size: 8, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 5, zero_stage: 2,
        eval_every: 100000, eval_sequences: 32, log_every: 1, sample_tokens: 0}}
checkpoint: {{storage_path: runs, every: 10, keep: 3}}
tracking: {{mode: offline}}
cluster: {{address: local, num_workers: 2, max_failures: -1}}
"""
LIMIT_S = 300  # any one wait: a hang fails the soak instead of blocking it


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}
    out.pop("WANDB_MODE", None)
    return out


def loss_rows(run: Path) -> list[tuple[int, float]]:
    """Each (step, loss) row of the run's metrics.jsonl in file order, read while the run
    writes it: a last line not yet whole is left for the next look (it ended the soak with a
    JSONDecodeError once)."""
    lines = (run / "metrics.jsonl").read_text().split("\n")
    rows = [json.loads(line) for line in lines[:-1] if line.strip()]  # each whole line ends with a newline
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def losses(run: Path) -> dict[int, float]:
    """Each step's loss in the run's metrics.jsonl (a step logged twice: its last row)."""
    return dict(loss_rows(run))


def compare_losses(reference: Path, run: Path, steps: int) -> tuple[bool, str]:
    """Whether the run's metrics.jsonl holds steps 1..steps once each, every loss `==` the
    reference's, and the line that says so. A step logged twice (a resume that did not
    rewind the file) fails, in either run, instead of its last row hiding the first."""
    want_rows = loss_rows(reference)
    got_rows = loss_rows(run) if (run / "metrics.jsonl").exists() else []
    want, got = dict(want_rows), dict(got_rows)
    want = {s: want[s] for s in range(1, steps + 1) if s in want}
    same = sum(1 for s in want if got.get(s) == want[s])
    twice = sorted(s for s, n in Counter(s for s, _ in got_rows).items() if n > 1)
    twice_ref = len(want_rows) - len(dict(want_rows))
    line = f"losses: {same}/{len(want)} steps == the uninterrupted run's" + (
        " (every one)" if same == len(want) else ""
    )
    line += f"; steps logged more than once: {len(twice)}" + (f" {twice[:10]}" if twice else "")
    line += f" (uninterrupted run: {twice_ref})" if twice_ref else ""
    return same == len(want) == steps and not twice and not twice_ref, line


class Job:
    """One `trainctl run` of the job, its output read in threads (kept, and in a log file)."""

    def __init__(self, work: Path, name: str, log, overrides: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", "run", "job.yaml", f"name={name}", *overrides],
            cwd=work,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.log = log
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self.lines.append(line)
            self.log.write(line)

    def resumed_at(self, since: int = 0) -> int | None:
        """The step the newest start of the workers (since line `since`) began at: the one
        it resumed from, or, with no checkpoint left to resume from, 0 (its first progress
        line is step 1); None while it has not started."""
        for line in reversed(self.lines[since:]):
            if "resumed at step " in line:
                return int(line.split("resumed at step ")[1].split(",")[0].split()[0])
            if " at step " in line and "trainctl: resumed from " in line:
                return int(line.split(" at step ")[1].split()[0])
        if any(line.startswith("step ") and line.split()[1].startswith("1/") for line in self.lines[since:]):
            return 0
        return None

    def wait(self) -> int:
        return self.proc.wait(timeout=LIMIT_S)


def ray_left(pid: int) -> list[int]:
    """Processes of the private Ray that launcher `pid` started (its session is named by the pid)."""
    import psutil

    tag = f"_{pid}"
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "session_" in cmd and (f"{tag} " in cmd or f"{tag}/" in cmd or cmd.endswith(tag)):
            left.append(p.info["pid"])
    return left


def settle(pid: int, wait_s: float = 15) -> int:
    """Wait (bounded) for the job's Ray processes to end; count and kill what is left."""
    deadline = time.monotonic() + wait_s
    while (left := ray_left(pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


def wait_for_step(run: Path, step: int, job: Job) -> None:
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= step:
            return
        if job.proc.poll() is not None:
            raise SystemExit(f"chaos: the job ended (exit {job.proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise SystemExit(f"chaos: step {step} not reached in {LIMIT_S} s")


def worker_pids(launcher: int) -> list[int]:
    import psutil

    try:
        tree = psutil.Process(launcher).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in tree:  # the workers themselves, not their DataLoader processes (forked: the same name)
        try:
            # ray::TrainWorker on a private Ray (cluster/worker_group.py), ray::RayTrainWorker on a joined one
            if "TrainWorker" in " ".join(p.cmdline()) and "TrainWorker" not in " ".join(p.parent().cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL to a process and everything under it at once, as when its machine dies
    (the launcher alone: its private Ray's workers would train on for a second or two)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def truncate_newest(run: Path) -> str:
    """Leave the newest complete checkpoint as a save cut off mid-write leaves it."""
    ckpts = run / "checkpoints"
    newest = sorted(p for p in ckpts.glob("step_*") if (p / "trainctl.json").exists())[-1]
    (newest / "trainctl.json").unlink()
    model = newest / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return newest.name


def plan(seed: int, faults: int, steps: int) -> list[tuple[int, str]]:
    """`faults` distinct steps at least 3 apart, each with a kind; every kind as often as the others."""
    rng = random.Random(seed)
    slots = rng.sample(range(6, steps - 2, 3), faults)
    kinds = [KINDS[i % len(KINDS)] for i in range(faults)]
    rng.shuffle(kinds)
    return sorted(zip(slots, kinds))


def wandb_steps(run: Path) -> list[int]:
    from wandb_records import history

    steps = []
    for f in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        steps += [row["trainer/global_step"] for row in history(f) if "loss" in row]
    return sorted(steps)


def dashboard_losses(run: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) as TensorBoard's and MLflow's own readers give them back, for the
    dashboards this run wrote to (tracking.backends)."""
    out = {}
    if (run / "tensorboard").is_dir():
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

        acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})
        acc.Reload()
        out["TensorBoard"] = [(e.step, e.value) for e in acc.Scalars("loss")]
    if (run / "mlflow_run_id").is_file():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{run.parent / 'mlflow.db'}")
        rid = (run / "mlflow_run_id").read_text().strip()
        out["MLflow"] = [(m.step, m.value) for m in client.get_metric_history(rid, "loss")]
    return out


def corrupt_shard(work: Path, log, overrides: list[str]) -> tuple[bool, str]:
    """The text again in shards of 0.1 MB (several chunks), bytes flipped inside one of them:
    data.on_error=skip must finish and name the chunk it passed over."""
    bad = work / "data-bad"
    r = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "prepare", "text.txt", "--out", "data-bad", "--shard-size-mb", "0.1"],
        cwd=work, env=env(), capture_output=True, text=True, timeout=LIMIT_S,
    )  # fmt: skip
    if r.returncode != 0:
        return False, r.stderr.strip()[-300:]
    shard = sorted(bad.glob("train-*.tar"))[0]
    blob = bytearray(shard.read_bytes())
    at = len(blob) // 3
    blob[at : at + 64] = bytes(b ^ 0xFF for b in blob[at : at + 64])
    shard.write_bytes(bytes(blob))
    r = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "run", "job.yaml", *overrides, "name=shard", "data.path=data-bad",
         "data.on_error=skip", "train.max_steps=20", "tracking.mode=disabled"],
        cwd=work, env=env(), capture_output=True, text=True, timeout=LIMIT_S,
    )  # fmt: skip
    log.write(r.stdout + r.stderr)
    named = "skipping a chunk (data.on_error=skip): chunk" in r.stdout + r.stderr
    return r.returncode == 0 and named, f"exit {r.returncode}, the skipped chunk named: {named}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faults", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="the job's length (default: 12 per fault, at least 60)")
    ap.add_argument("--no-shard", action="store_true", help="leave out the corrupt-shard check")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one, removed)")
    ap.add_argument("--work", help="a folder holding job.yaml and its prepared data (kept; needs --reference)")
    ap.add_argument("--reference", help="with --work: a finished uninterrupted run of the job, e.g. runs/straight")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="given to every run of the job")
    args = ap.parse_args()
    if bool(args.work) != bool(args.reference) or (args.work and args.keep):
        ap.error("--work and --reference go together, without --keep")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    steps = args.steps or max(60, 12 * args.faults)
    faults = plan(seed, args.faults, steps)
    work = Path(args.work or args.keep or tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "chaos.log", "a", buffering=1)
    counts = {k: sum(1 for _, kind in faults if kind == k) for k in KINDS}
    print(
        f"chaos: seed {seed}, {len(faults)} faults over {steps} steps ("
        + ", ".join(f"{k} {n}" for k, n in counts.items())
        + f"){'' if args.no_shard else ' + a corrupt shard under on_error=skip'}; work in {work}",
        flush=True,
    )
    overrides = list(args.overrides)
    if args.work:
        reference = work / args.reference
        overrides.append(f"train.max_steps={steps}")
        straight_s = None
    else:
        shakespeare = (REPO / "tests" / "data" / "tinyshakespeare.txt").read_text()
        (work / "text.txt").write_text(shakespeare[:300_000])
        r = subprocess.run(
            [sys.executable, "-m", "launcher.cli", "prepare", "text.txt", "--out", "data"],
            cwd=work, env=env(), capture_output=True, text=True, timeout=LIMIT_S,
        )  # fmt: skip
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        (work / "job.yaml").write_text(JOB.format(steps=steps))
        t0 = time.monotonic()
        straight = Job(work, "straight", log, overrides)
        if straight.wait() != 0:
            print("chaos: the uninterrupted run failed:\n" + "".join(straight.lines[-20:]), file=sys.stderr)
            return 1
        straight_s = time.monotonic() - t0
        reference = work / "runs" / "straight"

    run = work / "runs" / "chaos"
    survived, left_total, lost_total = 0, 0, 0
    t0 = time.monotonic()
    job = Job(work, "chaos", log, overrides)
    floor = 0  # the step the job last resumed at: each fault lands in a job that is training again
    for i, (step, kind) in enumerate(faults, 1):
        wait_for_step(run, max(step, floor + 2), job)
        at = max(losses(run))
        f0 = time.monotonic()
        left, seen = 0, len(job.lines)
        if kind == "kill-worker":
            pids = worker_pids(job.proc.pid)
            if not pids:
                print(f"fault {i:2d} at step {at}: no worker process found", flush=True)
                break
            os.kill(random.Random(seed + i).choice(pids), signal.SIGKILL)
            deadline = time.monotonic() + LIMIT_S
            while job.resumed_at(seen) is None and time.monotonic() < deadline and job.proc.poll() is None:
                time.sleep(0.1)
            resumed = job.resumed_at(seen)
        else:
            pid = job.proc.pid
            if kind == "sigterm":
                job.proc.send_signal(signal.SIGTERM)
                code = job.wait()
                if code != 143:
                    print(f"fault {i:2d} at step {at}: sigterm ended with exit {code}, not 143", flush=True)
                    break
            else:
                kill_tree(pid)
                job.wait()
            at = max(losses(run))  # the last step trained before it ended (SIGTERM: the one it saved at)
            left = settle(pid)
            what = f" ({truncate_newest(run)})" if kind == "truncate-checkpoint" else ""
            kind += what
            job = Job(work, "chaos", log, overrides)  # what the user does: the same command again
            deadline = time.monotonic() + LIMIT_S
            while job.resumed_at() is None and time.monotonic() < deadline and job.proc.poll() is None:
                time.sleep(0.1)
            resumed = job.resumed_at()
        if resumed is None:
            print(f"fault {i:2d} at step {at}: {kind}: the job did not resume", flush=True)
            break
        survived += 1
        floor = resumed
        left_total += left
        lost_total += at - resumed
        print(
            f"fault {i:2d} at step {at:4d}: {kind:40s} resumed at step {resumed:4d} ({at - resumed} lost), "
            f"Ray processes left {left}, {time.monotonic() - f0:.1f} s",
            flush=True,
        )
    code = job.wait()
    chaos_s = time.monotonic() - t0
    left_total += settle(job.proc.pid)

    ok = code == 0 and survived == len(faults)
    print(f"faults injected {len(faults)}, survived {survived}; the last run exited {code}")
    print(f"Ray processes of the job left running after the faults: {left_total}")
    print(f"steps lost in total: {lost_total} (trained again after resuming)")
    if straight_s:
        print(f"wall: {chaos_s:.1f} s with faults, {straight_s:.1f} s uninterrupted: {chaos_s / straight_s:.2f}x")
    else:
        print(f"wall: {chaos_s:.1f} s with faults (the uninterrupted run, {args.reference}, was not timed here)")
    same, line = compare_losses(reference, run, steps)
    print(line)
    ok &= same and left_total == 0
    w = wandb_steps(run)
    complete = w == list(range(1, steps + 1))
    runs = len(list(run.glob("wandb/offline-run-*/run-*.wandb")))
    dup = len(w) - len(set(w))
    missing = sorted(set(range(1, steps + 1)) - set(w))
    print(
        f"W&B offline history: {len(set(w))} of {steps} steps in {runs} offline runs of one id, {dup} twice"
        + (f", missing {missing[:10]}{'...' if len(missing) > 10 else ''}" if missing else "")
    )
    ok &= complete
    logged = {row["step"]: row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in row}  # fmt: skip
    for name, pairs in dashboard_losses(run).items():  # float32 in TensorBoard's events
        steps_seen = [s for s, _ in pairs]
        equal = all(abs(v - logged.get(s, float("nan"))) <= 1e-6 * max(1.0, abs(v)) for s, v in pairs)
        print(
            f"{name}: {len(set(steps_seen))} of {steps} steps, {len(steps_seen) - len(set(steps_seen))} twice, "
            f"losses {'==' if equal else '!='} metrics.jsonl's"
        )
        ok &= sorted(steps_seen) == list(range(1, steps + 1)) and equal
    if not args.no_shard:
        shard_ok, how = corrupt_shard(work, log, overrides)
        print(f"corrupt shard under on_error=skip: {'survived' if shard_ok else 'FAILED'} ({how})")
        ok &= shard_ok
    print(
        f"chaos: {'PASS' if ok else 'FAIL'} (seed {seed}; replay: --seed {seed} --faults {len(faults)} --steps {steps})"
    )
    log.close()
    if not (args.keep or args.work) and ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
