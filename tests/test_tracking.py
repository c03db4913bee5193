"""W&B (offline, the real library) across a resume: every step once on the dashboard."""

from __future__ import annotations

import json
import time

from wandb_records import history

from trainer.config import JobConfig
from trainer.tracking import Tracker


def test_a_resumed_run_continues_the_same_wandb_run_without_duplicated_or_dropped_steps(tmp_path, monkeypatch):
    """The first attempt logs steps 1-30 and dies; the checkpoint it resumes from is step 20,
    so 21-30 are trained again. W&B history is append-only: it keeps their first values
    (bit for bit the same in a real resume) and gets 31-40 from the second attempt, with
    the restart attached to its first new step. metrics.jsonl holds the second attempt's."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = JobConfig.model_validate({"name": "wb", "tracking": {"mode": "offline"}})
    run = tmp_path / "wb"
    run.mkdir()
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

    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1  # one W&B run id, two attempts
    rows = [row for f in files for row in history(f)]
    assert [r["_step"] for r in rows] == list(range(1, 41))
    assert [r["loss"] for r in rows] == [float(s) for s in range(1, 31)] + [100.0 + s for s in range(31, 41)]
    assert rows[30]["restarts"] == 1 and rows[30]["time_lost_s"] == 5.0 and "restarts" not in rows[29]

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 41))
    assert {m["step"]: m["loss"] for m in lines if "loss" in m}[25] == 125.0
