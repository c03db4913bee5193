"""Checkpoints that survive anything: bitwise resume after SIGTERM (Ray, torchrun, an
object store on a fresh machine), a lost node waited for and bounded, damaged checkpoints
passed over, rollbacks, resharding, the resume flags, and the chaos soak's short version (a
worker SIGKILLed under max_failures, the launcher SIGKILLed, SIGTERM, a truncated checkpoint,
with the restart bookkeeping).

Every run is the real `trainctl run` (a real local Ray with 2 workers, or `--no-ray`),
DeepSpeed ZeRO-2 on gloo, real tar shards. Losses are compared with `==`. A command refused
before anything starts runs as `launcher.cli.main` in this process (cli_helpers.trainctl_here),
but for one real refused command; independent runs go at once (cli_helpers.together).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import ONE_THREAD, REPO, SHAKESPEARE, command, env, together, trainctl, trainctl_here
from ray_cluster import join_node, two_node_cluster
from s3_helpers import s3_server
from wandb_records import history

JOB = """\
name: ck
model: {n_layer: 2, n_head: 4, d_model: 64, max_seq_len: 32}
data: {path: data, seq_len: 32, shuffle_buffer: 512}
train: {max_steps: 120, micro_batch_size: 8, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 5, zero_stage: 2,
        eval_every: 1000, eval_sequences: 32, log_every: 1, sample_tokens: 0}
checkpoint: {storage_path: runs, every: 20, keep: 2}
tracking: {mode: disabled}
cluster: {address: local, num_workers: 2}
"""


# A resume on another number of workers continues the loss to within this (the README's
# figure): measured 2→1 at step 30 of this job, 21 of 30 steps `==` and the largest
# difference 2.4e-7; the gradient norm ZeRO clips with is summed over each rank's
# partition, so its rounding depends on the world size.
RESHARD_BOUND = 1e-6


def losses(run: Path) -> dict[int, float]:
    """Each step's loss; read while a run writes, a last line not yet whole is left out."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n")[:-1] if line.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, limit_s: float = 240) -> None:
    """Until metrics.jsonl holds `step` (bounded in time; fails if the process ends first)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and any(s >= step for s in losses(run)):
            return
        assert proc.poll() is None, "the run ended before it was interrupted"
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {limit_s} s")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Every process these tests start runs torch on one thread (cli_helpers.ONE_THREAD)."""
    for key, value in ONE_THREAD.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Shards, the job file, and one uninterrupted 120-step run to compare against."""
    work = tmp_path_factory.mktemp("ck")
    (work / "text.txt").write_text(SHAKESPEARE.read_text()[:300_000])
    assert trainctl("prepare", "text.txt", "--out", "data", cwd=work).returncode == 0
    (work / "job.yaml").write_text(JOB)
    r = trainctl("run", "job.yaml", "name=straight", "--verbose", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(losses(work / "runs" / "straight")) == list(range(1, 121))
    # --verbose (this run, to spare a Ray start): every worker line as Ray prints it, no workers.log
    assert "(TrainWorker pid=" in r.stdout + r.stderr  # a private Ray's workers: plain actors, no Ray Train
    assert not (work / "runs" / "straight" / "workers.log").exists()
    return work


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_job_survives_one_of_each_fault_with_every_loss_equal(work):
    """The chaos soak's short version (benchmarks/chaos.py, whose 20-fault run is in
    BENCHMARKS.md): each kind of fault once, at steps drawn from a fixed seed (a worker
    SIGKILLed, `trainctl run` and its tree SIGKILLed, SIGTERM, a checkpoint left truncated
    mid-write), each followed by what a user does. Every step's loss is `==` the
    uninterrupted run's, W&B's offline history, TensorBoard's events and MLflow's store (read
    back by each library) hold every step once with metrics.jsonl's losses, no Ray process of the
    job is left after a fault, and the restart bookkeeping is what happened. Seed 77 puts
    the faults at steps 15-36 of 60 (this job's steps take ~50 ms: a fault drawn near the
    end could land after the job finished), the truncated checkpoint after an earlier one."""
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "chaos.py"), "--faults", "4", "--seed", "77", "--steps", "60",
         "--no-shard", "--work", str(work), "--reference", "runs/straight", "checkpoint.every=10",
         "checkpoint.keep=3", "tracking.mode=offline", "tracking.backends=[wandb,tensorboard,mlflow]",
         "cluster.max_failures=-1", "train.lr_decay_steps=120"],
        env=env(), capture_output=True, text=True, timeout=750,
    )  # fmt: skip
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert (
        "chaos: seed 77, 4 faults over 60 steps (kill-worker 1, kill-launcher 1, sigterm 1, truncate-checkpoint 1)"
        in out
    )
    assert "faults injected 4, survived 4; the last run exited 0" in out
    assert "Ray processes of the job left running after the faults: 0" in out
    assert "losses: 60/60 steps == the uninterrupted run's (every one); steps logged more than once: 0\n" in out
    assert "W&B offline history: 60 of 60 steps in " in out and ", 0 twice" in out
    # TensorBoard's and MLflow's own readers: every step once, each loss metrics.jsonl's
    assert "TensorBoard: 60 of 60 steps, 0 twice, losses == metrics.jsonl's\n" in out
    assert "MLflow: 60 of 60 steps, 0 twice, losses == metrics.jsonl's\n" in out
    assert out.strip().splitlines()[-1].startswith("chaos: PASS (seed 77")
    faults = re.findall(r"fault +\d+ at step +(\d+): (\S+).* resumed at step +(\d+)", out)
    assert sorted(kind for _, kind, _ in faults) == ["kill-launcher", "kill-worker", "sigterm", "truncate-checkpoint"]
    run = work / "runs" / "chaos"
    log = (work / "chaos.log").read_text()
    assert "is incomplete (a save was interrupted); using an earlier one" in log  # the truncated checkpoint passed over
    # The restart bookkeeping: one attempt per start of the workers, at the step each resumed
    # from; the worker killed under max_failures is "restart 1" of its invocation, in the
    # console and in metrics.jsonl with the seconds lost since its checkpoint, and its
    # failure the launcher's row between two attempts: restarted (transient) after 1 s.
    rows = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
    attempts = [row for row in rows if "step" in row]
    assert [a["step"] for a in attempts] == [0] + [int(resumed) for _, _, resumed in faults]
    (failure,) = [row for row in rows if "failure" in row]
    assert failure["class"] == "transient" and failure["wait_s"] == 1, failure
    assert "starting the workers again in 1 s (1 of unlimited restarts)" in log
    (killed,) = [int(resumed) for _, kind, resumed in faults if kind == "kill-worker"]
    assert f"trainctl: restart 1 of this job: resumed at step {killed}, " in log
    (event,) = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"restarts": 1' in line
    ]
    i = [a["step"] for a in attempts].index(killed, 1 + [k for _, k, _ in faults].index("kill-worker"))
    assert event["step"] == killed and 0 < event["time_lost_s"] < attempts[i]["at"] - attempts[i - 1]["at"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_damaged_checkpoint_is_passed_over_for_the_previous_one(work):
    job = ["job.yaml", "--no-ray", "name=damaged", "cluster.num_workers=1", "checkpoint.every=10", "checkpoint.keep=3"]
    r = trainctl("run", *job, "train.max_steps=20", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = work / "runs" / "damaged" / "checkpoints"
    model = ckpts / "step_00000020" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:1000])  # truncated, as by a full disk; the completion marker is still there
    r = trainctl("run", *job, "train.max_steps=30", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_00000020 is damaged (mp_rank_00_model_states.pt has 1,000 bytes" in r.stderr
    assert "resumed from" in r.stdout and "step_00000010 at step 10" in r.stdout
    for ckpt in ckpts.glob("step_*"):  # now every checkpoint is damaged: refused, nothing started over
        for f in ckpt.glob("*.pt"):
            f.write_bytes(b"")
    r = trainctl_here("run", *job, "train.max_steps=40", cwd=work)  # refused before anything starts
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("trainctl: error: every checkpoint in")
    assert "--fresh --force" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_resume_and_fresh_flags(work):
    base = ["job.yaml", "--no-ray", "cluster.num_workers=1", "checkpoint.every=10", "train.max_steps=10"]
    r = trainctl("run", *base, "name=src", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    src = work / "runs" / "src" / "checkpoints" / "step_00000010"

    r = trainctl("run", *base, "name=branch", "train.max_steps=15", "--resume", str(src), cwd=work)
    assert r.returncode == 0 and f"resumed from {src} at step 10" in r.stdout, r.stderr[-3000:]
    assert sorted(losses(work / "runs" / "branch")) == [11, 12, 13, 14, 15]

    # The same command again (as after a preemption): the branch continues from its own checkpoint.
    r = trainctl("run", *base, "name=branch", "train.max_steps=18", "--resume", str(src), cwd=work)
    assert r.returncode == 0 and "at step 15" in r.stdout, r.stderr[-3000:]
    assert "run 'branch' has its own checkpoints: continuing from" in r.stderr
    assert sorted(losses(work / "runs" / "branch")) == [11, 12, 13, 14, 15, 16, 17, 18]

    # Rewinding a run to an earlier checkpoint of its own needs --force, which deletes the newer ones.
    r = trainctl("run", *base, "name=src", "train.max_steps=20", cwd=work)
    assert r.returncode == 0 and (work / "runs" / "src" / "checkpoints" / "step_00000020").is_dir()
    r = trainctl_here("run", *base, "name=src", "train.max_steps=20", "--resume", str(src), cwd=work)
    assert r.returncode == 2 and "which has newer checkpoints (step_00000020): add --force" in r.stderr
    r = trainctl("run", *base, "name=src", "train.max_steps=20", "--resume", str(src), "--force", cwd=work)
    assert r.returncode == 0 and "at step 10" in r.stdout and "incomplete" not in r.stderr, r.stderr[-3000:]

    r = trainctl("run", *base, "name=src", "--fresh", "--force", cwd=work)
    assert r.returncode == 0 and "resumed" not in r.stdout, r.stderr[-3000:]
    assert sorted(losses(work / "runs" / "src")) == list(range(1, 11))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--resume", "nowhere"], "--resume nowhere does not exist"),
        (["--resume", "data"], "--resume data: no complete checkpoint in data"),
        (
            ["--resume", "runs/straight", "model.d_model=128"],
            "tensor tok_emb.weight is [257, 64] in the checkpoint but [257, 128] in this model",
        ),
        (["name=straight", "--fresh"], "runs/straight already holds a run (checkpoints, metrics.jsonl): add --force"),
        (["--fresh", "--resume", "runs/straight"], "--fresh and --resume contradict each other"),
        (["--force"], "--force only goes with --fresh or --resume"),
        (
            ["--resume", "runs/straight"],
            "with a global batch of 16 sequences but this job has 8 (micro_batch_size x "
            "num_workers x grad_accum_steps): keep the global batch, e.g. train.grad_accum_steps=2",
        ),
        (
            ["--resume", "runs/straight", "train.grad_accum_steps=2", "data.lanes=4"],
            "was trained with 16 data lanes but this job has 4: resume with data.lanes=16",
        ),
        (
            ["--resume", "runs/straight", "train.grad_accum_steps=2", "data.seq_len=16"],
            "was trained with data.seq_len=32 but this job has 16: resume with the same data.seq_len",
        ),
        (["checkpoint.storage_path=job.yaml/runs"], "job.yaml/runs/bad (Not a directory): set checkpoint.storage_path"),
    ],
)
@pytest.mark.slow
@pytest.mark.timeout(360)
def test_resume_bad_input_is_one_line_exit_2(work, args, fragment):
    before = sorted(str(p) for p in (work / "runs").rglob("*"))
    # In this process (each is refused before anything starts), but for the one case that loads
    # the checkpoint's tensors: the real command, its exit status and whole stderr.
    argv = ["run", "job.yaml", "--no-ray", "cluster.num_workers=1", "name=bad", *args]
    r = trainctl(*argv, cwd=work, timeout=120) if fragment.startswith("tensor ") else trainctl_here(*argv, cwd=work)
    assert r.returncode == 2 and r.stderr.startswith("trainctl: error: "), r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr, r.stderr
    assert sorted(str(p) for p in (work / "runs").rglob("*")) == before


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_nan_loss_and_a_loss_spike_roll_back_and_the_run_equals_one_that_skips_their_windows(work):
    """Step 15's loss NaN, then step 25's made 1000x (its gradient too, not NaN: above
    train.spike_factor x the mean of the last 20 steps, which keeps steps 1-10 across the
    rollback). Each rolls back to the checkpoint before it and passes over its step's data;
    the run finishes `==` a run that skipped both windows from the start (train.skip_steps)."""
    job = ["job.yaml", "--no-ray", "cluster.num_workers=1", "checkpoint.every=10", "train.max_steps=30"]
    r, skip, stop = together(  # three independent runs, at once
        lambda: trainctl(
            "run", *job, "name=nan", cwd=work, TRAINCTL_TEST_NAN_AT_STEP="15", TRAINCTL_TEST_SPIKE_AT_STEP="25"
        ),
        lambda: trainctl("run", *job, "name=skip", "train.skip_steps=[15,25]", cwd=work),
        lambda: trainctl(
            "run", *job, "name=nan-stop", "train.max_rollbacks=0", cwd=work, TRAINCTL_TEST_NAN_AT_STEP="15"
        ),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainctl: warning: step 15: the loss is nan: rolled back to" in r.stderr
    assert "step_00000010 (rollback 1 of 3); the data of step 15 will be skipped" in r.stderr
    assert "trainctl: warning: step 25: the loss " in r.stderr and "x the mean of the last 20 steps" in r.stderr
    assert "step_00000020 (rollback 2 of 3); the data of step 25 will be skipped" in r.stderr
    run = work / "runs" / "nan"
    events = [json.loads(line) for line in (run / "rollbacks.jsonl").read_text().splitlines()]
    assert [(e["step"], e["skipped"]["epoch"], e["skipped"]["step_in_epoch"]) for e in events] == [
        (15, 0, 14),
        (25, 0, 25),  # one window further on: step 15's was passed over
    ]
    # The continuation is exactly a run that passes over both windows from the start.
    assert skip.returncode == 0, skip.stderr[-3000:]
    got = losses(run)  # each step once (the replayed ones logged once)
    assert sorted(got) == list(range(1, 31)) and got == losses(work / "runs" / "skip")
    assert max(got.values()) < 6  # the spike itself (~1000x) is not what the run kept

    assert stop.returncode == 1
    assert (
        stop.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "trainctl: training failed: Diverged: step 15: the loss is nan; 0 rollbacks allowed (train.max_rollbacks)"
        )
    ), stop.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_sigterm_to_a_single_process_run_stops_it_at_a_checkpoint(work):
    """--no-ray (alone, or a torchrun rank): the signal reaches the training process itself."""
    run = work / "runs" / "solo-term"
    proc = subprocess.Popen(
        command("run", "job.yaml", "--no-ray", "name=solo-term", "cluster.num_workers=1"),
        cwd=work,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    stopped = max(losses(run))
    assert f"trainctl: checkpoint {run / 'checkpoints' / f'step_{stopped:08d}'}" in out
    r = trainctl(
        "run",
        "job.yaml",
        "--no-ray",
        "name=solo-term",
        "cluster.num_workers=1",
        "train.max_steps=" + str(stopped + 2),
        cwd=work,
    )
    assert r.returncode == 0 and f"at step {stopped}" in r.stdout, r.stderr[-2000:]


def torchrun(*args: str) -> list[str]:
    """`trainctl run ... --no-ray` as 2 ranks under torchrun (the README's second launch path)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] + command(*args)[1:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_under_torchrun_stop_on_sigterm_to_the_group_and_resume_as_the_ray_run(work):
    """SIGTERM to the whole process group (as `scancel` or a pod eviction sends it): torchrun,
    both ranks and their DataLoader workers. The ranks save at the step they stopped at; the
    same command resumes, and every loss equals the 2-worker Ray run's."""
    job = [
        "run",
        "job.yaml",
        "--no-ray",
        "name=trun",
        "train.max_steps=30",
        "train.lr_decay_steps=120",
    ]  # straight's LR
    run = work / "runs" / "trun"
    proc = subprocess.Popen(
        torchrun(*job),
        cwd=work,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_step(run, 4, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stopped = max(losses(run))
    assert f"trainctl: preempted: stopped at step {stopped} with a checkpoint" in out, (out[-2000:], err[-3000:])
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}" and stopped < 20
    assert "killed by signal" not in err  # the loader workers ignore the group's SIGTERM
    r = subprocess.run(torchrun(*job), cwd=work, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"at step {stopped}" in r.stdout, r.stderr[-3000:]
    straight = losses(work / "runs" / "straight")
    assert losses(run) == {s: straight[s] for s in range(1, 31)}


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    "point, why",
    [("ray-start", "while Ray starts"), ("workers-start", "before the workers started")],
)
def test_sigterm_before_the_first_step_stops_at_once(work, point, why):
    """No step is under way (Ray starting, or up with the workers not yet started): nothing to
    save at, so the launcher stops now (exit 143), leaving no Ray process, instead of waiting
    out its grace. The launcher is held at the point (TRAINCTL_TEST_PAUSE_AT) until the
    signal has been handled there, so each branch is the one taken."""
    name = f"early-{point}"
    marker = work / "runs" / name / f"paused-{point}"
    proc = subprocess.Popen(
        command("run", "job.yaml", f"name={name}"),
        cwd=work,
        env={**env(), "TRAINCTL_TEST_PAUSE_AT": point},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    while not (work / "runs" / name / "PREEMPT").exists() and proc.poll() is None:  # the handler's first act
        assert time.monotonic() - t0 < 30
        time.sleep(0.05)
    marker.unlink(missing_ok=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert time.monotonic() - t0 < 60  # checkpoint.preempt_grace_s is 120
    assert f"trainctl: SIGTERM {why}: no step to save at, stopping now" in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "trainctl: stopped: the run is at step 0 (no checkpoint yet)"
    attempts = work / "runs" / name / "attempts.jsonl"
    assert not attempts.exists() or "step" not in attempts.read_text()  # no worker started
    left = subprocess.run(["pgrep", "-f", f"session_[0-9_-]+_{proc.pid}[ /]"], capture_output=True, text=True).stdout
    assert not left, left  # the private Ray (its session named by this pid) is gone


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_checkpoint_of_2_workers_resumes_on_1_through_a_universal_checkpoint(work):
    """ZeRO-2 state partitioned over 2 ranks, re-split for 1 (the same global batch: 1 x 8 x 2
    accumulation steps): the data and the loss continue exactly as the 2-worker run's."""
    src = work / "runs" / "straight" / "checkpoints" / "step_00000100"
    one = ["run", "job.yaml", "--no-ray", "cluster.num_workers=1", "train.grad_accum_steps=2", "--resume", str(src)]
    r, nan = together(  # two independent resumes of step 100, at once; the second is checked below
        lambda: trainctl(*one, "name=reshard", cwd=work),
        # A rollback after a resharded resume reloads a checkpoint of the new world size.
        lambda: trainctl(*one, "name=reshard-nan", "checkpoint.every=5", cwd=work, TRAINCTL_TEST_NAN_AT_STEP="108"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {src} at step 100 (written by 2 workers, resharded to 1)" in r.stdout
    straight = losses(work / "runs" / "straight")
    resumed = losses(work / "runs" / "reshard")
    assert sorted(resumed) == list(range(101, 121))
    # Within RESHARD_BOUND, not bit for bit (see RESHARD_BOUND).
    assert max(abs(resumed[s] - straight[s]) for s in resumed) <= RESHARD_BOUND
    assert not list((work / "runs" / "reshard" / "checkpoints").glob(".universal-*"))  # the scratch conversion is gone

    # The rollback after the resharded resume.
    assert nan.returncode == 0, nan.stderr[-3000:]
    assert "step 108: the loss is nan: rolled back to" in nan.stderr and "step_00000105 (rollback 1 of 3)" in nan.stderr


@pytest.mark.slow
@pytest.mark.timeout(800)
def test_zero1_grows_from_1_worker_to_2_and_zero3_shrinks_from_2_to_1(work):
    """Resharding at the other ZeRO stages, both ways: each continuation stays within
    RESHARD_BOUND of the uninterrupted ZeRO-2 run (ZeRO-1 and -3 do the same arithmetic).
    The 2-worker halves run as 2 ranks under torchrun (the same ranks and losses as Ray's
    workers, tested above, without a Ray start each)."""
    straight = losses(work / "runs" / "straight")

    def halves(stage: int, first: int, then: int) -> list[subprocess.CompletedProcess]:
        job = ["run", "job.yaml", "--no-ray", f"name=zero{stage}", f"train.zero_stage={stage}", "checkpoint.every=10",
               "train.lr_decay_steps=120"]  # fmt: skip
        done = []
        for workers, steps in ((first, 10), (then, 20)):
            args = [*job, f"train.max_steps={steps}"]
            cmd = (
                torchrun(*args) if workers == 2 else command(*args, "cluster.num_workers=1", "train.grad_accum_steps=2")
            )
            done.append(subprocess.run(cmd, cwd=work, env=env(), capture_output=True, text=True, timeout=300))
            if done[-1].returncode != 0:
                break
        return done

    # The two stages are independent runs: at once, each one's two halves in turn.
    stages = ((1, 1, 2), (3, 2, 1))
    for (stage, first, then), runs in zip(stages, together(lambda: halves(1, 1, 2), lambda: halves(3, 2, 1))):
        for r in runs:
            assert r.returncode == 0, r.stderr[-3000:]
        assert f"at step 10 (written by {first} workers, resharded to {then})" in r.stdout, r.stdout[-2000:]
        got = losses(work / "runs" / f"zero{stage}")
        assert sorted(got) == list(range(1, 21))
        assert max(abs(got[s] - straight[s]) for s in got) <= RESHARD_BOUND, (stage, got, straight)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_export_loads_in_transformers_with_the_same_logits_and_greedy_text(work):
    """The 2-worker ZeRO-2 run, gathered into a Hugging Face Llama folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.checkpoint import find_checkpoint
    from trainer.generate import load_model

    r = trainctl("export", "runs/straight", "hf", cwd=work)
    assert r.returncode == 0 and "exported runs/straight to hf" in r.stdout, r.stderr[-2000:]
    hf = AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=torch.float32).eval()
    ours, tok = load_model(find_checkpoint(work / "runs" / "straight"))
    text = "ROMEO:\nWhat light through yonder window breaks?"
    ids = tok.encode(text).tolist()
    assert AutoTokenizer.from_pretrained(str(work / "hf"))(text, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids[:32]])
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4
        greedy = ours.generate(x[:, :8], 20, temperature=0)[0, 8:].tolist()
        assert hf.generate(x[:, :8], max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 8:].tolist() == greedy

    # trainctl generate reads the export folder too, and samples the same greedy text as from the run
    def generate(folder: str) -> subprocess.CompletedProcess:
        return trainctl(
            "generate", folder, "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "20", cwd=work
        )

    from_export, from_run = together(lambda: generate("hf"), lambda: generate("runs/straight"))  # at once
    assert from_export.returncode == 0 and from_export.stdout == from_run.stdout and len(from_run.stdout) > 20

    again = trainctl_here("export", "runs/straight", "hf", cwd=work)  # never over an existing folder
    assert again.returncode == 2 and "hf already exists and is not an empty folder" in again.stderr
    (work / "empty-run").mkdir()
    none = trainctl_here("export", "empty-run", "hf2", cwd=work)
    assert none.returncode == 2 and none.stderr.startswith("trainctl: error: no complete checkpoint in empty-run")
    assert not (work / "hf2").exists()


def kill_node(node: subprocess.Popen) -> None:
    """The whole node at once: `ray start`, its raylet, the workers on it."""
    import psutil  # Ray's own dependency

    for p in [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]:
        p.kill()


class Lines:
    """A running process's stderr, read in a thread: wait (bounded) for a line."""

    def __init__(self, proc: subprocess.Popen):
        import threading

        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(proc.stderr.readline, "")), daemon=True)
        self.thread.start()

    def wait_for(self, fragment: str, limit_s: float) -> str:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if fragment in line:
                    return line
            time.sleep(0.2)
        raise AssertionError(f"no line with {fragment!r} in {limit_s} s: {''.join(self.lines)[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_lost_node_is_reported_waited_for_and_bounded_and_a_rerun_continues_exactly(work):
    """Two nodes of 1 CPU, a worker on each (SPREAD). The second node dies: the console
    names it, the step and what the cluster can still place, and waits; a node joins again
    and the job continues. It dies again: after cluster.restart_timeout_s the job stops
    with exit 1 naming the checkpoint, and the same command (here on a private local Ray:
    capacity elsewhere) finishes with every loss equal to the uninterrupted run's."""
    with two_node_cluster(head_cpus=1) as cluster:
        run = work / "runs" / "lost"
        job = [
            "run",
            "job.yaml",
            "name=lost",
            "cluster.max_failures=2",
            "checkpoint.every=10",
            "train.max_steps=50",
            "train.lr_decay_steps=120",
        ]
        proc = subprocess.Popen(
            command(
                *job,
                f"cluster.address={cluster.address}",
                "cluster.placement=SPREAD",
                "cluster.restart_timeout_s=15",
                # Ray Train's own retry of a worker group it cannot place (60 s by default)
                "cluster.env={RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S: '3'}",
            ),
            cwd=work,
            env=env(**cluster.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        err = Lines(proc)
        wait_for_step(run, 15, proc)  # past the checkpoint at step 10
        kill_node(cluster.node)
        line = err.wait_for("waiting for capacity", 60)
        assert "trainctl: lost node 127.0.0.3 at step " in line and "resumes from " in line, line
        assert "the cluster can place 1 of 2 workers (CPU 1 of 2); waiting for capacity (" in line, line
        node = join_node(cluster.address, cluster.env)  # capacity is back
        try:
            wait_for_step(run, 25, proc, limit_s=120)  # restarted, and past the checkpoint at step 20
        finally:
            kill_node(node)
        t0 = time.monotonic()
        proc.wait(timeout=120)
        err.thread.join(timeout=10)
        out = proc.stdout.read()
        assert proc.returncode == 1, "".join(err.lines)[-3000:]
        assert "restart 1 of this job: resumed at step 10" in out
        last = err.lines[-1]
        assert last.startswith("trainctl: stopped: lost node 127.0.0.3 at step "), last
        assert "resumes from " in last and "cluster.restart_timeout_s" in last, last
        assert 15 <= int(re.search(r"waited (\d+) s", last).group(1)) <= 19, last
        assert time.monotonic() - t0 < 90
        resume_from = last.split("resumes from ")[1].split(")")[0]
    r = trainctl(*job, cwd=work)  # the same command, capacity elsewhere: a private local Ray of 2 workers
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {resume_from} at step" in r.stdout
    straight = losses(work / "runs" / "straight")
    assert losses(run) == {s: straight[s] for s in range(1, 51)}


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_completep_job_reshards_at_zero3_and_exports_to_transformers(work):
    """completep on a base half as wide and half as deep (every optimizer group its own lr,
    weight decay and eps; branches and logits x1/2, attention 1/D). ZeRO-3 from 2 ranks to 1
    continues within RESHARD_BOUND of the same job on 1 rank throughout (a resharded ZeRO-3
    load gave every group group 0's settings: trainer/patches.py). The export gathers each
    tensor from the ZeRO-3 shards and folds the multipliers in: transformers' Llama gives our
    logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.checkpoint import find_checkpoint
    from trainer.generate import load_model

    cp = ["model.parametrization=completep", "model.base_width=32", "model.base_depth=1", "train.zero_stage=3",
          "checkpoint.every=10", "train.lr_decay_steps=120"]  # fmt: skip
    one = ["cluster.num_workers=1", "train.grad_accum_steps=2"]
    for name, workers, steps in (("cp-straight", 1, 20), ("cp", 2, 10), ("cp", 1, 20)):
        args = ["run", "job.yaml", "--no-ray", f"name={name}", *cp, f"train.max_steps={steps}"]
        cmd = torchrun(*args) if workers == 2 else command(*args, *one)
        r = subprocess.run(cmd, cwd=work, env=env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 10 (written by 2 workers, resharded to 1)" in r.stdout, r.stdout[-2000:]
    got, straight = losses(work / "runs" / "cp"), losses(work / "runs" / "cp-straight")
    assert sorted(got) == list(range(1, 21)) and got[20] < got[1] - 0.5
    assert max(abs(got[s] - straight[s]) for s in got) <= RESHARD_BOUND, (got, straight)
    assert got != losses(work / "runs" / "straight")  # not the standard run's curve
    r = trainctl("export", "runs/cp", "hf-cp", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(str(work / "hf-cp"), dtype=torch.float32).eval()
    ours, tok = load_model(find_checkpoint(work / "runs" / "cp"))
    assert ours.output_mult == 0.5 and ours.blocks[0].residual_scale == 0.5
    x = torch.tensor([tok.encode("First Citizen:\nBefore we proceed any further").tolist()[:32]])
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert (a - b).abs().max().item() < 1e-4 and a.abs().max().item() > 1.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_saves_to_an_object_store_exits_143_and_a_rerun_elsewhere_continues_bitwise(work):
    """checkpoint.storage_path on S3 (a real moto server on 127.0.0.1). SIGTERM mid-run: a
    checkpoint of the step it stopped at reaches the bucket, the command exits 143 in time;
    the machine's folder is then lost, and the same command continues bit for bit from the
    bucket."""
    cache = {"XDG_CACHE_HOME": str(work / "cache")}
    with s3_server("ckpt") as (s3, client):
        job = [
            "job.yaml",
            "name=s3",
            "checkpoint.storage_path=s3://ckpt/runs",
            "checkpoint.local_path=local",
            "tracking.mode=offline",
        ]
        run = work / "local" / "s3"
        proc = subprocess.Popen(
            command("run", *job),
            cwd=work,
            env=env(**s3, **cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_step(run, 25, proc)  # past the checkpoint at step 20
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err[-3000:]
        assert time.monotonic() - t0 < 60  # well inside checkpoint.preempt_grace_s
        assert (
            err.strip()
            .splitlines()[-1]
            .startswith("trainctl: preempted: the run stopped at a checkpoint in s3://ckpt/runs/s3/checkpoints")
        )
        stopped = max(losses(run))
        assert 25 <= stopped < 120
        assert (
            run / "checkpoints" / "latest"
        ).read_text() == f"step_{stopped:08d}"  # saved at the step it stopped after
        keys = {o["Key"] for o in client.list_objects_v2(Bucket="ckpt", Prefix="runs/s3/")["Contents"]}
        before = (stopped - 1) // 20 * 20  # the periodic checkpoint kept beside the preemption's (keep: 2)
        assert {
            f"runs/s3/checkpoints/step_{s:08d}/{name}"
            for s in (before, stopped)
            for name in ("trainctl.json", "rank_00000.pt", "rank_00001.pt", "mp_rank_00_model_states.pt")
        } <= keys
        assert (
            client.get_object(Bucket="ckpt", Key="runs/s3/checkpoints/latest")["Body"].read()
            == f"step_{stopped:08d}".encode()
        )

        # The machine is gone: only the bucket holds the run. Its whole folder (metrics, W&B's
        # offline run and its id, attempts) moves aside, for W&B's history to be read below.
        gone = work / "gone-machine"
        run.rename(gone)
        r = trainctl("run", *job, cwd=work, **s3, **cache)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in r.stdout
        assert f"metrics.jsonl, attempts.jsonl, wandb_run_id taken back from step_{stopped:08d}" in r.stdout
        assert losses(run) == losses(work / "runs" / "straight")  # the history before the stop came back too
        assert (run / "wandb_run_id").read_text() == (gone / "wandb_run_id").read_text()
        attempts = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
        assert [a["step"] for a in attempts] == [0, stopped]
        # W&B continues the same run: the two machines' offline files hold every step once.
        (first,) = gone.glob("wandb/offline-run-*/run-*.wandb")
        (second,) = run.glob("wandb/offline-run-*/run-*.wandb")
        assert first.name == second.name == f"run-{(run / 'wandb_run_id').read_text().strip()}.wandb"
        steps = [row["trainer/global_step"] for f in (first, second) for row in history(f) if "loss" in row]
        assert steps == list(range(1, 121))
        tags = {
            k.split("/")[3]
            for k in (o["Key"] for o in client.list_objects_v2(Bucket="ckpt", Prefix="runs/s3/")["Contents"])
            if k.endswith("trainctl.json")
        }
        assert tags == {"step_00000100", "step_00000120"}  # checkpoint.keep: 2, in the bucket too

        r = trainctl("export", "s3://ckpt/runs/s3", "hf-s3", cwd=work, **s3, **cache)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((work / "hf-s3" / "config.json").read_text())["num_hidden_layers"] == 2
        r = trainctl("export", "s3://ckpt/runs/none", "hf-none", cwd=work, **s3, **cache)
        assert r.returncode == 2 and r.stderr.strip() == (
            "trainctl: error: no complete checkpoint in s3://ckpt/runs/none: "
            "give a run folder (checkpoint.storage_path/NAME) or a checkpoint folder"
        )

        before = sorted(str(p) for p in work.rglob("*"))
        r = trainctl(
            "run",
            "job.yaml",
            "--no-ray",
            "cluster.num_workers=1",
            "name=nob",
            "checkpoint.storage_path=s3://no-such-bucket/runs",
            cwd=work,
            timeout=120,
            **s3,
            **cache,
        )
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
        assert r.stderr.startswith("trainctl: error: cannot write checkpoint.storage_path s3://no-such-bucket"), (
            r.stderr
        )
        assert sorted(str(p) for p in work.rglob("*")) == before


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_full_disk_during_a_save_stops_the_run_and_leaves_the_previous_checkpoint_whole(work):
    """The run folder on a tmpfs (in a user and mount namespace this test makes) with room
    for one checkpoint and a half: the second save fails, the first stays the latest."""
    size = sum(p.stat().st_size for p in (work / "runs" / "straight" / "checkpoints" / "step_00000100").rglob("*"))
    runs = work / "full"
    runs.mkdir()
    job = command(
        "run",
        "job.yaml",
        "--no-ray",
        "cluster.num_workers=1",
        "train.grad_accum_steps=2",
        "name=full",
        f"checkpoint.storage_path={runs}",
        "checkpoint.every=10",
        "train.max_steps=30",
    )
    script = (
        f"mount -t tmpfs -o size={size * 3 // 2} tmpfs {runs} || exit 99; "
        f'{" ".join(map(shlex.quote, job))}; echo "exit=$?"; '
        f"cat {runs}/full/checkpoints/latest; echo; ls {runs}/full/checkpoints; "
        f'{sys.executable} -c "import sys; from trainer import checkpoint; '
        f"print('damage:', checkpoint.damage(checkpoint.find_latest(checkpoint.Path(sys.argv[1]))))\" {runs}/full/checkpoints"
    )
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=work, env=env(), capture_output=True, text=True, timeout=300
    )
    assert "exit=2" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"trainctl: error: checkpoint {runs}/full/checkpoints/step_00000020 could not be written "
        "(No space left on device"
    ), r.stderr[-3000:]
    assert last.endswith(
        "the previous checkpoints are intact: free space or fix the storage, then run the same command to resume"
    )
    assert "Traceback" not in r.stderr
    latest, *listing = r.stdout.split("exit=2\n")[1].splitlines()
    assert latest == "step_00000010" and "step_00000010" in listing and "step_00000020" not in listing, r.stdout
    assert "damage: None" in r.stdout
