"""The chaos soak's short version (benchmarks/chaos.py, whose 20-fault run is in
BENCHMARKS.md): one job on a real local Ray, each kind of fault once at steps drawn from a
fixed seed (a worker SIGKILLed, `trainctl run` SIGKILLed, SIGTERM, a checkpoint left
truncated mid-write), each followed by what a user does; every step's loss must be `==` the
uninterrupted run's, W&B's offline history must hold every step once, and no Ray process
of the job may be left after a fault."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from cli_helpers import REPO, env


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_job_survives_one_of_each_fault_with_every_loss_equal(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "chaos.py"), "--faults", "4", "--seed", "16", "--steps", "40",
         "--no-shard", "--keep", str(tmp_path / "chaos")],
        env=env(), capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert (
        "chaos: seed 16, 4 faults over 40 steps (kill-worker 1, kill-launcher 1, sigterm 1, truncate-checkpoint 1)"
        in out
    )
    assert "faults injected 4, survived 4; the last run exited 0" in out
    assert "Ray processes of the job left running after the faults: 0" in out
    assert "losses: 40/40 steps == the uninterrupted run's (every one)" in out
    assert "W&B offline history: 40 of 40 steps in " in out and ", 0 twice" in out
    assert out.strip().splitlines()[-1].startswith("chaos: PASS (seed 16")
    faults = re.findall(r"fault +\d+ at step +(\d+): (\S+).* resumed at step +(\d+)", out)
    assert sorted(kind for _, kind, _ in faults) == ["kill-launcher", "kill-worker", "sigterm", "truncate-checkpoint"]
    run = tmp_path / "chaos" / "runs" / "chaos"
    log = (tmp_path / "chaos" / "chaos.log").read_text()
    assert "is incomplete (a save was interrupted); using an earlier one" in log  # the truncated checkpoint passed over
    # The restart bookkeeping: one attempt per start of the workers, at the step each resumed
    # from; the worker killed under max_failures is "restart 1" of its invocation, in the
    # console and in metrics.jsonl with the seconds lost since its checkpoint.
    attempts = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
    assert [a["step"] for a in attempts] == [0] + [int(resumed) for _, _, resumed in faults]
    (killed,) = [int(resumed) for _, kind, resumed in faults if kind == "kill-worker"]
    assert f"trainctl: restart 1 of this job: resumed at step {killed}, " in log
    (event,) = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"restarts": 1' in line
    ]
    i = [a["step"] for a in attempts].index(killed, 1 + [k for _, k, _ in faults].index("kill-worker"))
    assert event["step"] == killed and 0 < event["time_lost_s"] < attempts[i]["at"] - attempts[i - 1]["at"]
