"""The chaos soak's short version (benchmarks/chaos.py, whose 20-fault run is in
BENCHMARKS.md): one job on a real local Ray, each kind of fault once at steps drawn from a
fixed seed (a worker SIGKILLed, `trainctl run` SIGKILLed, SIGTERM, a checkpoint left
truncated mid-write), each followed by what a user does; every step's loss must be `==` the
uninterrupted run's, W&B's offline history must hold every step once, and no Ray process
of the job may be left after a fault."""

from __future__ import annotations

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
    log = (tmp_path / "chaos" / "chaos.log").read_text()
    assert "is incomplete (a save was interrupted); using an earlier one" in log  # the truncated checkpoint passed over
