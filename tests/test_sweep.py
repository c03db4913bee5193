"""`trainctl sweep` on Ray Tune: a grid of 4 real trials through the private local Ray,
the sweep SIGKILLed mid-way and finished by the same command without a finished trial
trained again (the interrupted one resumes from its checkpoint); bad grids refused in one
line before anything starts; the pieces (grid parsing, the metrics reporter) alone."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import SHAKESPEARE, command, env, trainctl

JOB = f"""\
name: tiny
model: {{vocab_size: 257, n_layer: 2, n_head: 2, d_model: 64, max_seq_len: 64}}
data: {{path: {SHAKESPEARE}, seq_len: 64, cache_dir: cache}}
train: {{micro_batch_size: 8, warmup_steps: 5, eval_every: 25, eval_sequences: 16, log_every: 10, sample_tokens: 0}}
checkpoint: {{every: 10, keep: 1}}
tracking: {{mode: disabled}}
cluster: {{num_workers: 1}}
"""
SWEEP = ["sweep", "job.yaml", "--grid", "train.lr=1e-3,4e-3", "--grid", "model.n_layer=1,2", "--parallel", "1",
         "--steps", "100"]  # fmt: skip


def kill_tree(pid: int) -> None:
    import psutil

    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def rows(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().split("\n")[:-1] if x.strip()] if path.exists() else []


def attempts(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "attempts.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_sweep_finishes_when_run_again_without_training_a_finished_trial_twice(tmp_path):
    (tmp_path / "job.yaml").write_text(JOB)
    trials = tmp_path / "runs" / "tiny-sweep" / "trials"
    first, second = trials / "000_lr1e-3_n_layer1", trials / "001_lr1e-3_n_layer2"
    proc = subprocess.Popen(
        command(*SWEEP), cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 150
    try:  # SIGKILL the whole sweep (driver, its Ray, the trials) once the second trial has a checkpoint
        while not (second / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read()[-3000:] if proc.stdout else ""
            )
            time.sleep(0.05)
    finally:
        kill_tree(proc.pid)  # as when the machine dies (the driver alone: Ray's workers train on a moment)
        out = proc.communicate(timeout=30)[0]
    killed_at = max(r["step"] for r in rows(second))
    assert max(r["step"] for r in rows(first)) == 100 and 10 <= killed_at < 100, out[-3000:]
    assert "trainctl: sweep 'tiny-sweep'" in out and "000_lr1e-3_n_layer1" in out  # the live table

    r = trainctl(*SWEEP, cwd=tmp_path, timeout=200)
    assert r.returncode == 0, r.stderr[-1500:] + "\n--- stdout:\n" + r.stdout[-3000:]
    assert "continuing the sweep" in r.stdout and "4 trials (4 done)" in r.stdout, r.stdout[-3000:]
    # the finished trial was not started again; the interrupted one resumed from its checkpoint
    assert len(attempts(first)) == 1
    resumed = attempts(second)
    assert len(resumed) == 2 and 10 <= resumed[1]["step"] <= killed_at, resumed
    for folder in sorted(trials.iterdir()):
        steps = [x["step"] for x in rows(folder) if "loss" in x]
        assert steps == list(range(10, 101, 10)), (folder.name, steps)  # each logged step once
        assert [x["step"] for x in rows(folder) if "val_loss" in x] == [25, 50, 75, 100]
        assert (folder / "workers.log").stat().st_size > 0  # the workers' output: the trial's own log
    assert len(list(trials.iterdir())) == 4
    table = list(csv.DictReader(open(tmp_path / "runs" / "tiny-sweep" / "results.csv")))
    assert [(t["trial"], t["state"], t["steps"]) for t in table] == [
        (name, "done", "100")
        for name in ("000_lr1e-3_n_layer1", "001_lr1e-3_n_layer2", "002_lr4e-3_n_layer1", "003_lr4e-3_n_layer2")
    ]
    finals = {t["trial"]: float(t["final_val_loss"]) for t in table}
    assert finals["000_lr1e-3_n_layer1"] == pytest.approx(rows(first)[-1]["val_loss"], rel=1e-9)
    result = json.loads((tmp_path / "runs" / "tiny-sweep" / "results.json").read_text())
    for group in ("model.n_layer=1", "model.n_layer=2"):  # the best learning rate of each depth
        members = {k: v for k, v in finals.items() if k.endswith(group.replace("model.", "").replace("=", ""))}
        assert result["best"][group] == min(members, key=members.get)
        assert f"best for {group}: train.lr=" in r.stdout
    png = (tmp_path / "runs" / "tiny-sweep" / "val_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grid", "train.lrr=1e-3,2e-3"], "--grid train.lrr=1e-3: unknown key 'train.lrr'"),
        (["--grid", "train.lr=1e-3,-1"], "--grid train.lr=-1: train.lr=-1"),
        (["--grid", "model.d_model=64,36", "--grid", "model.n_head=2,4"], "trial model.d_model=36 model.n_head=4: "),
        (["--grid", "train.lr=1e-3", "--grid", "train.lr=2e-3"], "--grid train.lr is given twice"),
        (["--grid", "train.lr=1e-3,,2e-3"], "a value is empty"),
        (["--grid", "train.lr=1e-3,1e-3"], "a value is given twice"),
        (["--grid", "name=a,b"], "the sweep sets name for its trials"),
        (["--grid", "train.lr=1e-3", "train.lr=2e-3"], "train.lr is given both as an override and as --grid"),
        ([], "no --grid given"),
        (["--grid", "train.lr=1e-3", "--parallel", "3"], "--parallel 3 runs 3 trials of 1 CPUs at once"),
        (["--grid", "train.lr=1e-3", "--steps", "0"], "--steps 0: give at least 1"),
    ],
)
def test_bad_grids_are_one_line_before_anything_starts(tmp_path, monkeypatch, capsys, args, message):
    from launcher import job
    from launcher.cli import main

    (tmp_path / "job.yaml").write_text(JOB)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(job, "available_cores", lambda: 2)
    assert main(["sweep", "job.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trainctl: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]  # nothing prepared, no sweep folder


def test_a_rerun_with_another_grid_is_refused(tmp_path, monkeypatch, capsys):
    from launcher.cli import main

    (tmp_path / "job.yaml").write_text(JOB)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "tiny-sweep"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"grid": [["train.lr", ["1e-3"]]]}))
    assert main(["sweep", "job.yaml", "--grid", "train.lr=1e-3,2e-3", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds sweep 'tiny-sweep' with another grid, config or overrides" in err and err.count("\n") == 1


def test_grid_values_split_at_top_level_commas_and_name_the_trials():
    from launcher.sweep import split_values, trial_name

    assert split_values("1e-3, 2e-3,4e-3") == ["1e-3", "2e-3", "4e-3"]
    assert split_values("[q_proj,v_proj],all-linear,'a,b'") == ["[q_proj,v_proj]", "all-linear", "'a,b'"]
    assert trial_name(7, {"train.lr": "2e-3", "model.n_layer": "16"}) == "007_lr2e-3_n_layer16"
    assert trial_name(0, {"train.lora.targets": "[q_proj,v_proj]"}) == "000_targets-q_proj-v_proj-"


def test_the_reporter_sends_each_whole_step_once_and_rereads_a_rewound_file(tmp_path):
    from cluster.sweep import Reporter

    sent = []
    path = tmp_path / "metrics.jsonl"
    rep = Reporter(path, sent.append)
    rep.poll()  # no file yet
    path.write_text('{"step": 10, "loss": 3.0, "lr": 0.1}\n{"step": 10, "val_loss": 3.5}\n{"step": 20, "lo')
    rep.poll()
    assert sent == []  # step 10 may still get rows; step 20's line is not whole
    with open(path, "a") as f:
        f.write('ss": 2.5, "data_mix": {"a": 1}}\n')
    rep.poll()
    assert sent == [{"step": 10, "loss": 3.0, "lr": 0.1, "val_loss": 3.5}]
    rep.poll(flush=True)
    assert sent[-1] == {"step": 20, "loss": 2.5}
    tmp = tmp_path / "new"
    tmp.write_text('{"step": 10, "loss": 3.0}\n{"step": 20, "loss": 2.4}\n{"step": 30, "loss": 2.0}\n')
    os.replace(tmp, path)  # a resume rewinds the file: another file, read from its start
    rep.poll(flush=True)
    assert [s["step"] for s in sent[2:]] == [10, 20, 30] and sent[-2]["loss"] == 2.4


def test_outcomes_become_states_groups_and_the_best_of_each(tmp_path):
    """How trials ended (Tune's status, error, the rows they reported) as the table and files
    show them: done, stopped early (ASHA), diverged, failed, not run; the best of each group
    among the finished ones."""
    from cluster.sweep import Outcome, TrialSpec
    from launcher.sweep import Sweep, outcome_rows, render, write_results

    grid = [("train.lr", ["1e-3", "2e-3", "4e-3"]), ("model.n_layer", ["2", "4"])]
    specs, outcomes = [], []
    cases = {  # (lr, depth): (status, error, last step, final val_loss)
        ("1e-3", "2"): ("TERMINATED", None, 20, 3.0),
        ("1e-3", "4"): ("TERMINATED", None, 20, 2.9),
        ("2e-3", "2"): ("TERMINATED", None, 20, 2.5),
        ("2e-3", "4"): ("TERMINATED", None, 10, 3.5),  # ASHA stopped it
        ("4e-3", "2"): ("ERROR", "Diverged: step 7: the loss is nan", 5, None),
        ("4e-3", "4"): ("ERROR", "RuntimeError: boom", 5, None),
    }
    for i, ((lr, depth), (status, error, last, val)) in enumerate(cases.items()):
        config = {"train": {"max_steps": 20}}
        specs.append(
            TrialSpec(f"{i:03d}", str(tmp_path / f"{i:03d}"), config, {"train.lr": lr, "model.n_layer": depth})
        )
        reported = [{"step": s, "loss": 4.0 - s / 10} for s in range(5, last + 1, 5)]
        reported[-1]["val_loss"] = val if val is not None else 9.0
        outcomes.append(Outcome(f"{i:03d}", status, error, reported))
    specs.append(
        TrialSpec(
            "006", str(tmp_path / "006"), {"train": {"max_steps": 20}}, {"train.lr": "1e-3", "model.n_layer": "8"}
        )
    )
    outcomes.append(Outcome("006", "PENDING", None))
    sweep = Sweep("s", tmp_path, grid, specs, "local", {})
    rows = outcome_rows(sweep, outcomes)
    assert [r["state"] for r in rows] == ["done", "done", "done", "stopped early", "diverged", "failed", "not run"]
    assert [r["final_val_loss"] for r in rows] == [3.0, 2.9, 2.5, None, None, None, None]
    assert rows[3]["last_val_loss"] == 3.5 and rows[3]["steps"] == 10
    text = render(sweep, rows)
    assert "best for model.n_layer=2: train.lr=2e-3 (val_loss 2.5000)" in text
    assert "best for model.n_layer=4: train.lr=1e-3 (val_loss 2.9000)" in text
    assert "004: diverged: Diverged: step 7" in text and "005: failed: RuntimeError: boom" in text
    assert "(3.5000)" in text and text.endswith("run the same command to continue it")
    write_results(sweep, rows)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["best"] == {"model.n_layer=2": "002", "model.n_layer=4": "001", "model.n_layer=8": None}
    assert [r["state"] for r in csv.DictReader(open(tmp_path / "results.csv"))][3] == "stopped early"
    assert (tmp_path / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
