"""Distributed tier: DeepSpeed ZeRO 1, 2 and 3 on 2 gloo processes follow stage 0's loss curve."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_zero_stages_match_stage_0(tmp_path):
    out = tmp_path / "curves.json"
    with socket.socket() as sock:  # torchrun's --master_port=0 leaves the workers waiting at rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(REPO / "tests/scripts/zero_stages.py"),
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    curves = {int(k): v for k, v in json.loads(out.read_text()).items()}
    base = curves[0]
    assert len(base) == 8 and base[-1] < base[0] - 0.1  # it learns
    for stage in (1, 2, 3):
        assert curves[stage] == pytest.approx(base, rel=2e-4, abs=2e-4), (stage, curves[stage], base)
