"""`trainctl coordcheck`: the coordinate check tells a parametrization whose activations
keep their size across depth (completep) from one whose residual stream grows with it
(standard), on real data, and refuses bad shapes in one line."""

from __future__ import annotations

import json

import pytest
from cli_helpers import ONE_THREAD, SHAKESPEARE, trainctl

JOB = f"""\
name: cc
model: {{vocab_size: 257, n_layer: 2, n_head: 2, d_model: 32, max_seq_len: 64}}
data: {{path: {SHAKESPEARE}, seq_len: 64, cache_dir: cache}}
train: {{micro_batch_size: 8, lr: 4.0e-3}}
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_completep_keeps_the_residual_stream_flat_across_depth_and_standard_does_not(tmp_path):
    (tmp_path / "job.yaml").write_text(JOB)
    slopes = {}
    for parametrization in ("completep", "standard"):
        r = trainctl(
            "coordcheck", "job.yaml", f"model.parametrization={parametrization}", "--depths", "2,4,8,16,32",
            "--steps", "4", cwd=tmp_path, timeout=100, **ONE_THREAD,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        record = json.loads((tmp_path / "runs" / "cc" / f"coordcheck-{parametrization}-depth.json").read_text())
        png = (tmp_path / "runs" / "cc" / f"coordcheck-{parametrization}-depth.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
        assert [s["n_layer"] for s in record["shapes"]] == [2, 4, 8, 16, 32]
        for shape in record["shapes"]:  # every block of every step recorded
            for series in ("residual", "attn", "mlp", "attn_logits"):
                rows = shape["per_block"][series]
                assert len(rows) == 5 and all(len(row) == shape["n_layer"] and min(row) > 0 for row in rows)
        slopes[parametrization] = record["slope"]["residual"]
        assert f"at step 4: residual {record['slope']['residual']:+.3f}" in r.stdout
        if parametrization == "completep":  # the base is the job's own depth when base_depth is null
            assert record["base_depth"] == 2 and "(base width 32, depth 2)" in r.stdout
    assert abs(slopes["completep"]) <= 0.1, slopes
    assert slopes["standard"] > 0.4, slopes


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_mup_keeps_activations_flat_across_width_and_standard_does_not(tmp_path):
    (tmp_path / "job.yaml").write_text(JOB)
    slopes = {}
    for parametrization in ("mup", "standard"):
        r = trainctl(
            "coordcheck", "job.yaml", f"model.parametrization={parametrization}", "--widths", "32,64,128,256",
            "--steps", "4", cwd=tmp_path, timeout=80, **ONE_THREAD,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        record = json.loads((tmp_path / "runs" / "cc" / f"coordcheck-{parametrization}-width.json").read_text())
        assert [(s["d_model"], len(s["per_block"]["mlp"][0])) for s in record["shapes"]] == [
            (32, 2), (64, 2), (128, 2), (256, 2)
        ]  # fmt: skip
        slopes[parametrization] = record["slope"]
    assert abs(slopes["mup"]["residual"]) <= 0.15 and abs(slopes["mup"]["logits"]) <= 0.15, slopes
    assert slopes["standard"]["residual"] > 0.8 and slopes["standard"]["logits"] > 0.5, slopes


def test_several_seeds_record_the_mean_of_each_seeds_figures(tmp_path, monkeypatch, capsys):
    """--seeds 2: every figure is the mean of the runs from train.seed and train.seed + 1."""
    from launcher.cli import main

    (tmp_path / "job.yaml").write_text(JOB)
    monkeypatch.chdir(tmp_path)
    record = tmp_path / "runs" / "cc" / "coordcheck-completep-depth.json"
    runs = []
    for args in (["--seeds", "2"], ["train.seed=1337"], ["train.seed=1338"]):
        assert main(["coordcheck", "job.yaml", "model.parametrization=completep", "--depths", "1,2", "--steps", "2",
                     *args]) == 0  # fmt: skip
        runs.append(json.loads(record.read_text()))
    both, one, two = runs
    assert "mean of 2 seeds" in capsys.readouterr().out and both["seeds"] == 2 and one["seeds"] == 1
    assert one["shapes"][1]["per_block"]["residual"] != two["shapes"][1]["per_block"]["residual"]
    for b, x, y in zip(both["shapes"], one["shapes"], two["shapes"]):
        for series in ("residual", "attn", "mlp", "attn_logits"):
            for rb, rx, ry in zip(b["per_block"][series], x["per_block"][series], y["per_block"][series]):
                assert rb == pytest.approx([(u + v) / 2 for u, v in zip(rx, ry)], rel=1e-12)
        assert b["logits"] == pytest.approx([(u + v) / 2 for u, v in zip(x["logits"], y["logits"])], rel=1e-12)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--depths", "2,x"], "--depths 2,x: give distinct positive integers"),
        (["--depths", "4"], "compares at least 2 shapes"),
        (["--depths", "2,4", "--widths", "32,64"], "give one"),
        (["--widths", "32,40"], "--widths 40: not a multiple of the job's head_dim 16"),
        (["--steps", "0"], "--steps 0: give at least 1"),
        (["--seeds", "0"], "--seeds 0: give at least 1"),
        (["model.n_kv_head=3"], "model.n_kv_head=3 must divide model.n_head=2"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    from launcher.cli import main

    (tmp_path / "job.yaml").write_text(JOB)
    monkeypatch.chdir(tmp_path)
    assert main(["coordcheck", "job.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trainctl: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]
