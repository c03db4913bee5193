"""Distributed tier: DeepSpeed ZeRO 1, 2 and 3 on 2 gloo processes follow stage 0's loss curve;
a step on chat rows is the mean over every trained target of every rank and micro batch; a
Hugging Face folder loads partitioned under ZeRO-3."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from cli_helpers import REPO, torchrun


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_zero_stages_match_stage_0(tmp_path):
    out = tmp_path / "curves.json"
    cmd = torchrun(str(REPO / "tests/scripts/zero_stages.py"), str(out))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(out.read_text())
    curves = {int(k): v for k, v in found.items() if k.isdigit()}
    base = curves[0]
    assert len(base) == 8 and base[-1] < base[0] - 0.1  # it learns
    for stage in (1, 2, 3):
        assert curves[stage] == pytest.approx(base, rel=2e-4, abs=2e-4), (stage, curves[stage], base)
    # completep: every stage follows stage 0 too, with each group's own lr, weight decay and eps
    # reaching the optimizer DeepSpeed builds (m_N = m_L = 2: hidden lr / 2, wd x 2, eps / 4).
    cp = [found[f"completep{stage}"] for stage in (0, 1, 2, 3)]
    assert cp[0][-1] < cp[0][0] - 0.1 and cp[0] != base
    for stage in (1, 2, 3):
        assert cp[stage] == pytest.approx(cp[0], rel=2e-4, abs=2e-4), (stage, cp[stage], cp[0])
    warm = 3e-3 / 3  # train.lr x the schedule's first factor (warm-up of 2 steps)
    rules = {  # name: (lr, eps, weight_decay)
        "embedding": (warm, 1e-8 / 2, 0.1),
        "hidden_matrices": (warm / 2, 1e-8 / 4, 0.2),
        "hidden_vectors": (warm, 1e-8 / 4, 0.0),
        "final_norm": (warm, 1e-8 / 2, 0.0),
    }
    sizes = {"embedding": 257 * 64, "hidden_matrices": 2 * (4 * 64 * 64 + 3 * 64 * 192), "hidden_vectors": 2 * 2 * 64,
             "final_norm": 64}  # fmt: skip
    for stage in (0, 1, 2, 3):
        groups = found[f"groups_completep{stage}"]
        assert [g[0] for g in groups] == list(rules), (stage, groups)
        for name, lr, eps, wd, numel in groups:
            assert (lr, eps, wd) == pytest.approx(rules[name], rel=1e-9), (stage, name, lr, eps, wd)
            # ZeRO-1/2/3 hold a rank's partition of the flat group (half of it, padded), stage 0 all
            assert numel == sizes[name] if stage == 0 else sizes[name] / 2 <= numel <= sizes[name] / 2 + 64, (
                stage,
                name,
            )
    # Chat rows, several examples packed in each, each micro batch training another number of
    # targets: the step's loss and every parameter's gradient (gathered at ZeRO-2/3) are those
    # of the mean over all its trained targets (2 ranks x 2 micro batches) in a plain module.
    for stage in (0, 2, 3):
        f = found[f"flagged{stage}"]
        assert f["loss"] == pytest.approx(f["ref_loss"], rel=1e-5), (stage, f)
        assert f["grad_error"] < 1e-4 and f["params"] >= 10 and f["zero_grads"] == 0, (stage, f)
    # model.init_from at ZeRO-3: each rank holds half of each weight, and together the file's weights.
    assert found["partitioned_load"] == {"halves": True, "equal": True, "tied": True}
