"""Jobs on a real two-node Ray cluster (head and node as separate `ray start` processes,
dashboard and token authentication on) through `trainctl submit | status | list | logs | stop`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import SHAKESPEARE, env, trainctl, trainctl_here
from ray_cluster import two_node_cluster

JOB = """\
name: {name}
model: {{n_layer: 2, n_head: 4, d_model: 64, max_seq_len: 32}}
data: {{path: {data}, seq_len: 32, shuffle_buffer: 512}}
train: {{max_steps: 20, micro_batch_size: 8, lr: 3.0e-3, warmup_steps: 5, zero_stage: 2, eval_every: 1000,
        eval_sequences: 32, log_every: 1, sample_tokens: 0}}
checkpoint: {{storage_path: {runs}, every: 10, keep: 2}}
tracking: {{mode: disabled}}
cluster: {{address: local, num_workers: 2, placement: SPREAD}}
"""


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Shared storage (data, runs), a job folder to submit from, the same job run locally
    first, then the cluster."""
    root = tmp_path_factory.mktemp("jobs")
    nfs, job = root / "nfs", root / "job"
    nfs.mkdir()
    job.mkdir()
    (nfs / "text.txt").write_text(SHAKESPEARE.read_text()[:200_000])
    assert trainctl("prepare", "text.txt", "--out", "data", cwd=nfs).returncode == 0
    (job / "job.yaml").write_text(JOB.format(name="tiny", data=nfs / "data", runs=nfs / "runs"))
    local = trainctl("run", "job.yaml", "name=local", cwd=job)
    assert local.returncode == 0, local.stderr[-3000:]
    with two_node_cluster(dashboard=True) as cluster:
        yield root, cluster


def cli(site, *args, timeout=300, **extra):
    root, cluster = site
    return trainctl(*args, cwd=root / "job", timeout=timeout, **{**cluster.env, **extra})


def submit(site, *overrides, **extra) -> tuple[str, subprocess.CompletedProcess]:
    # the data is in nfs/, beside the job folder: on storage every node mounts
    r = cli(site, "submit", "job.yaml", "--address", site[1].dashboard, "--shared-data", *overrides, **extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1], r


def worker_nodes(site, job_id: str) -> set[str]:
    """The nodes the job's Ray Train workers ran on (Ray's state API, which keeps dead actors)."""
    code = (
        "from ray.job_submission import JobSubmissionClient\nfrom ray.util.state import list_actors\n"
        "ray_job = JobSubmissionClient(%r).get_job_info(%r).job_id\n"
        "print(sorted({a.node_id for a in list_actors(address=%r, filters=[('class_name', '=', 'RayTrainWorker')], "
        "detail=True, limit=1000) if a.job_id == ray_job}))"
    ) % (site[1].dashboard, job_id, site[1].dashboard)
    r = subprocess.run(
        [sys.executable, "-c", code], env=env(**site[1].env), capture_output=True, text=True, timeout=120
    )
    return set(eval(r.stdout.strip().splitlines()[-1]))  # noqa: S307 - our own printed list


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_submitted_job_runs_on_both_nodes_and_matches_the_local_run(site):
    root, cluster = site
    job_id, r = submit(site, "tracking.mode=online")
    assert "tracking.mode is online but WANDB_API_KEY is not set" in r.stderr  # and the job goes on offline
    assert f"dashboard: {cluster.dashboard}/#/jobs/{job_id}" in r.stdout

    followed = cli(site, "logs", job_id, "--address", cluster.dashboard, "--follow")
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    assert (
        followed.stdout.count("step     20/20 [####################] 100% | loss") == 1
        and "trainctl: done: 20 steps" in followed.stdout
    )
    assert f"trainctl: job {job_id} ended: SUCCEEDED" in followed.stderr
    assert cli(site, "status", job_id, "--address", cluster.dashboard).stdout.startswith(f"{job_id}: SUCCEEDED")
    listed = cli(site, "list", "--address", cluster.dashboard).stdout
    assert re.search(rf"^{job_id}\s+SUCCEEDED\s+tiny\s", listed, re.M), listed
    assert len(worker_nodes(site, job_id)) == 2  # SPREAD: one worker on each node

    runs = root / "nfs" / "runs"
    assert (runs / "tiny" / "checkpoints" / "latest").read_text() == "step_00000020"
    assert losses(runs / "tiny") == losses(runs / "local")  # the same job, here or on the cluster


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_stop_ends_a_running_job_and_its_last_checkpoint_is_usable(site):
    root, cluster = site
    job_id, _ = submit(site, "name=long", "train.max_steps=100000", "checkpoint.every=100000")
    run = root / "nfs" / "runs" / "long"
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 3):
        assert time.monotonic() < deadline, "no third step within 240 s"
        time.sleep(1)
    r = cli(site, "stop", job_id, "--address", cluster.dashboard)
    assert r.returncode == 0 and r.stdout.strip() == f"{job_id}: STOPPED", r.stderr[-2000:]
    # The checkpoint is the stop's own (no periodic one comes before step 100000), at the last step trained.
    stopped = len(losses(run))
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    logs = cli(site, "logs", job_id, "--address", cluster.dashboard).stdout
    assert f"trainctl: checkpoint {run / 'checkpoints' / f'step_{stopped:08d}'}" in logs
    sample = trainctl("generate", str(root / "nfs" / "runs" / "long"), "--max-new-tokens", "8", cwd=root)
    assert sample.returncode == 0 and len(sample.stdout) >= 8, sample.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_cluster_bad_input_is_one_line_exit_2(site, tmp_path):
    root, cluster = site
    d = cluster.dashboard
    before = cli(site, "list", "--address", d).stdout

    def one_line(r, fragment):
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr, r.stderr[-2000:]

    # refused here, before the cluster (in this process)
    one_line(trainctl_here("submit", "job.yaml", "--address", d, "model.n_layer=0", cwd=root / "job"), "model.n_layer")
    one_line(cli(site, "status", "nosuchjob", "--address", d), f"no job nosuchjob on {d}")
    one_line(cli(site, "logs", "nosuchjob", "--address", d), f"no job nosuchjob on {d}")
    t0 = time.monotonic()
    one_line(
        cli(site, "list", "--address", "http://127.0.0.1:1"), "cannot reach the Ray dashboard at http://127.0.0.1:1"
    )
    assert time.monotonic() - t0 < 60
    one_line(cli(site, "list", "--address", d, RAY_AUTH_TOKEN="0" * 64), "refused this client's token")
    one_line(trainctl("status", "x", cwd=root, **{**cluster.env, "RAY_ADDRESS": ""}), "no cluster given")
    # a working directory past Ray's upload limit (a sparse file: no disk used)
    big = tmp_path / "big"
    big.mkdir()
    (big / "job.yaml").write_text((root / "job" / "job.yaml").read_text())
    with open(big / "weights.bin", "wb") as f:
        f.truncate(600 * 2**20)
    r = trainctl("submit", "job.yaml", "--address", d, "--shared-data", cwd=big, **cluster.env)
    one_line(r, "holds 600 MB to upload, more than Ray's limit of")
    assert "weights.bin (600 MB)" in r.stderr
    assert cli(site, "list", "--address", d).stdout == before  # nothing was submitted
    # more workers than the nodes can hold: said at once, instead of Ray waiting for them forever
    one_line(
        cli(site, "run", "job.yaml", f"cluster.address={cluster.address}", "cluster.num_workers=5", "name=wide"),
        "the cluster can place 3 of the 5 workers (each needs CPU 1 on one node; in all it has CPU 3 of 5)",
    )


@pytest.mark.slow
@pytest.mark.timeout(540)
def test_cluster_check_reports_both_nodes_storage_and_bandwidth(site):
    root, cluster = site
    r = cli(site, "cluster", "check", "job.yaml", "--address", cluster.address)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    assert "2 alive nodes:" in out and "127.0.0.2" in out and "127.0.0.3" in out
    assert f"storage {root / 'nfs' / 'runs'}: writable from every node" in out
    bandwidth = re.search(r"all-reduce over 2 workers \(gloo, SPREAD\): ([0-9.]+) GB/s bus bandwidth", out)
    assert bandwidth and float(bandwidth.group(1)) > 0, out

    r = cli(
        site,
        "cluster",
        "check",
        "job.yaml",
        "--address",
        cluster.address,
        "checkpoint.storage_path=/proc/trainctl",
        "cluster.num_workers=1",
    )
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "trainctl: cluster check failed: storage not writable from "
    ), r.stderr[-2000:]
    assert "NOT writable from every node" in r.stdout
