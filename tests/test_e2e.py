"""End-to-end tier: the `trainctl` command itself, through a real local Ray with 2 workers,
real DeepSpeed ZeRO-2 on gloo, real tar shards and W&B in offline mode. Commands refused
before anything starts run as `launcher.cli.main` in this process (cli_helpers.trainctl_here)."""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from cli_helpers import ONE_THREAD, REPO, SHAKESPEARE, together, trainctl, trainctl_here, trainctl_watched

JOB = """\
name: e2e
model: {n_layer: 2, n_head: 4, d_model: 64, max_seq_len: 32}
data: {path: data, seq_len: 32, shuffle_buffer: 512}
train: {max_steps: 40, micro_batch_size: 8, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 5, zero_stage: 2,
        eval_every: 20, eval_sequences: 64, log_every: 10, sample_tokens: 40}
checkpoint: {storage_path: runs, every: 20, keep: 1}
tracking: {mode: offline, project: trainctl-tests}
cluster: {address: local, num_workers: 2}
"""


EVAL_TASK = SHAKESPEARE.parent / "easy-mc.jsonl"  # tests/data: 40 multiple-choice items


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


SAMPLE = "trainctl: sample from the final checkpoint:"
# The shapes of every line `trainctl run` itself prints (launcher/cli.py, trainer/loop.py's
# progress and validation lines, trainer/saver.py, trainer/perf.py, trainer/console.py's
# summary table and warnings): what the console may hold, under Ray or not.
ETA = r"(\d+h\d\dm|\d+m\d\ds)"
CONSOLE_SHAPES = [
    re.compile(shape)
    for shape in (
        r"trainctl: run '[\w.-]+' in \S+: \d+ workers, global batch \d+ x \d+ tokens, data .+",
        r"step +\d+/\d+ \[[#-]{20}\] +\d+% \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d+ \| [\d,]+ tok/s( \| MFU [\d.]+%)? "
        rf"\| step [\d,]+ ms \(data \d+%\) \| ETA {ETA}",
        r"step +\d+/\d+ \| val_loss \d+\.\d{4}",
        r"step +\d+/\d+ \| eval \w+ acc \d\.\d{4} acc_norm \d\.\d{4}( \| \w+ acc \d\.\d{4} acc_norm \d\.\d{4})* \| [\d.]+ s",
        r"trainctl: checkpoint \S+ \([\d,]+ MB, complete [\d.]+ s after the save began; training waited [\d.]+ s of it\)",
        r"trainctl: profile of steps \d+-\d+: \S+ \(one file per rank\)",
        rf"trainctl: done: \d+ steps, [\d,]+ tokens in {ETA}",
        r"\| .+ \| .+ \|",  # the summary table
        r"trainctl: (warning|note): .+",
    )
]


def console_noise(r, sample_tokens: int) -> list[str]:
    """The lines of a run's stdout and stderr that are not trainctl's own (CONSOLE_SHAPES);
    the closing sample, any text, must be the last of stdout and at most `sample_tokens`
    characters (byte tokens), or its excess counts as noise."""
    before, header, sample = r.stdout.partition(SAMPLE)
    assert header, f"no {SAMPLE!r} line"
    sample = sample.removeprefix("\n").removesuffix("\n")
    lines = before.splitlines() + r.stderr.splitlines()
    noise = [line for line in lines if not any(shape.fullmatch(line) for shape in CONSOLE_SHAPES)]
    return noise + ([f"a {len(sample)}-character sample: {sample!r}"] if len(sample) > sample_tokens else [])


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Every process these tests start runs torch on one thread (cli_helpers.ONE_THREAD)."""
    for key, value in ONE_THREAD.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real training run shared by the tests below: prepare, then run 40 steps."""
    work = tmp_path_factory.mktemp("e2e")
    (work / "text.txt").write_text(SHAKESPEARE.read_text()[:300_000])
    r = trainctl("prepare", "text.txt", "--out", "data", cwd=work)
    assert r.returncode == 0, r.stderr
    (work / "job.yaml").write_text(JOB)
    evals = f"train.evals=[{{path: {EVAL_TASK}, name: easy, every: 20}}]"  # this run only: the others reuse job.yaml
    r, sockets = trainctl_watched("run", "job.yaml", evals, cwd=work)  # its hostname resolving outward
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work, r, sockets


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_prepare_wrote_shards_and_manifest(trained):
    work, *_ = trained
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    assert tokens == 300_000 + 2  # every byte, plus one end-of-text per split part
    listing = subprocess.run(
        ["tar", "-tf", str(work / "data" / "train-000000.tar")], capture_output=True, text=True, check=True
    )
    assert listing.stdout.splitlines()[0].endswith(".tokens")


KEYS = (
    "loss",
    "lr",
    "grad_norm",
    "loss_scale",
    "tokens_per_s",
    "tokens_per_s_per_worker",
    "mfu",
    "step_time_s",
    "time_data_s",
    "time_forward_backward_s",
    "time_optimizer_s",
    "time_sync_s",
    "time_checkpoint_s",
    "mem_peak_gb",
    "goodput",
)


def loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def outward_sockets(seen: dict[int, set[str]]) -> list[str]:
    """The "IP PROCESS" entries of `trainctl_watched` on an address other than loopback."""
    return sorted(s for s in set().union(*seen.values()) if not loopback(s.split(" ")[0]))


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_the_private_ray_and_the_collectives_stay_on_loopback_and_end_with_the_job(trained):
    """Every socket of the run's processes, listening or connected (Ray's, torch's store,
    gloo's between the ranks), is on a loopback address; the run's hostname resolved to the
    machine's outward address (cli_helpers.hostname_outward), where gloo binds unless
    GLOO_SOCKET_IFNAME names an interface. The processes are gone when the run ends."""
    import psutil

    _, _, seen = trained
    sockets = set().union(*seen.values())
    assert {"gcs_server", "raylet", "ray::TrainWorker"} <= {s.split(" ", 1)[1].split(".")[0] for s in sockets}
    # before: the GCS, raylet and workers on every interface; then gloo on the hostname's address
    assert outward_sockets(seen) == []
    alive = [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [psutil.Process(pid).cmdline()[:3] for pid in alive]


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_run_loss_falls_and_metrics_have_the_keys(trained):
    work, r, *_ = trained
    rows = metrics(work / "runs" / "e2e")
    train = [m for m in rows if "loss" in m]
    val = [m for m in rows if "val_loss" in m]
    assert [m["step"] for m in train] == [10, 20, 30, 40]
    assert set(KEYS) <= set(train[0]), set(KEYS) - set(train[0])
    for m in train:
        assert m["tokens_per_s"] > 0 and 0 <= m["data_wait"] < 1 and m["data_skipped_shards"] == 0
        assert m["tokens_per_s_per_worker"] == pytest.approx(m["tokens_per_s"] / 2)
        assert 0 < m["mfu"] < 1 and 0 < m["goodput"] < 1 and m["loss_scale"] == 1.0 and m["grad_norm"] > 0
        assert 0.05 < m["mem_peak_gb"] < 8  # the largest worker's RSS
        parts = sum(m[f"time_{p}_s"] for p in ("data", "forward_backward", "optimizer", "sync", "checkpoint"))
        assert parts == pytest.approx(m["step_time_s"], rel=0.10), m
    # a checkpoint was written at step 20: its cost shows in the interval after it (19x and
    # more than 20x seen: a ratio of two timings, so a wide margin)
    assert train[2]["time_checkpoint_s"] > 5 * train[0]["time_checkpoint_s"]
    # MFU is the tokens' FLOPs over the measured peak: the peak recovered from the figures is the same each time
    flops = json.loads((work / "runs" / "e2e" / "run.json").read_text())["flops_per_token"]
    peak = json.loads((work / "runs" / "e2e" / "run.json").read_text())["peak_tflops_per_worker"]
    assert all(m["mfu"] == pytest.approx(m["tokens_per_s"] * flops / (2 * peak * 1e12)) for m in train)
    assert train[0]["loss"] < 5.6 and train[-1]["loss"] < train[0]["loss"] - 0.4
    assert [m["step"] for m in val] == [20, 40] and val[1]["val_loss"] < val[0]["val_loss"]
    assert (
        r.stdout.count("step     40/40 [####################] 100% | loss") == 1 and "ETA" in r.stdout
    )  # rank 0, once
    assert "sample from the final checkpoint" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_the_console_shows_progress_and_the_summary_and_the_rest_goes_to_the_log_file(trained):
    work, r, *_ = trained
    last = metrics(work / "runs" / "e2e")
    final_loss = [m for m in last if "loss" in m][-1]["loss"]
    vals = [m["val_loss"] for m in last if "val_loss" in m]
    progress = [line for line in r.stdout.splitlines() if line.startswith("step ") and "| loss" in line]
    assert len(progress) == 4 and f"| loss {final_loss:.4f} |" in progress[-1]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    cells = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table}
    assert cells["tokens seen"] == f"{40 * 16 * 32:,}" and cells["restarts"] == "0"
    assert cells["final val_loss"] == f"{vals[-1]:.4f} (step 40)" and cells["best val_loss"].startswith(
        f"{min(vals):.4f}"
    )
    assert cells["mean MFU"].endswith("(fp32 matmul measured on this CPU)")
    assert console_noise(r, sample_tokens=40) == []  # Ray's, DeepSpeed's, torch's lines: none
    log = (work / "runs" / "e2e" / "workers.log").read_text()
    assert "(TrainWorker pid=" in log  # what Ray would have printed is kept here
    samples = [json.loads(line) for line in (work / "runs" / "e2e" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [20, 20, 40, 40] and all(len(s["prompt"]) == 32 for s in samples)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_checkpoints_complete_and_pruned(trained):
    work, *_ = trained
    root = work / "runs" / "e2e" / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000040"]  # keep: 1
    assert (root / "latest").read_text() == "step_00000040"
    ckpt = root / "step_00000040"
    assert {"trainctl.json", "config.yaml", "rank_00000.pt", "rank_00001.pt", "mp_rank_00_model_states.pt"} <= {
        p.name for p in ckpt.iterdir()
    }
    info = json.loads((ckpt / "trainctl.json").read_text())
    assert info["step"] == 40 and info["world_size"] == 2 and info["tokenizer"]["name"] == "byte"
    assert (work / "runs" / "e2e" / "config.yaml").read_text().startswith("name: e2e")


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_wandb_offline_run_holds_the_metrics(trained):
    from wandb_records import history, summary

    work, *_ = trained
    files = glob.glob(str(work / "runs" / "e2e" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    rows = history(Path(files[0]))
    logged = metrics(work / "runs" / "e2e")
    assert [r["_step"] for r in rows] == [10, 20, 30, 40]  # eval rows share their step's row
    by_step = {r["_step"]: r for r in rows}
    for m in logged:
        for key, value in m.items():
            if key != "step":
                assert by_step[m["step"]][key] == pytest.approx(value), (m["step"], key)
    assert all(r["trainer/global_step"] == r["_step"] for r in rows)  # the x axis every chart is drawn against
    facts = summary(Path(files[0]))
    assert facts["tokenizer"] == {"name": "byte", "vocab_size": 257, "eot": 256} and facts["tokens_per_step"] == 512
    assert facts["flops_per_token"] == json.loads((work / "runs" / "e2e" / "run.json").read_text())["flops_per_token"]
    assert facts["summary/tokens seen"] == "20,480" and facts["summary/restarts"] == "0"
    assert facts["val/samples/_type"] == "table-file" and facts["val/samples/nrows"] == 2
    table = json.loads((Path(files[0]).parent / "files" / facts["val/samples/path"]).read_text())
    assert table["columns"] == ["prompt", "sample"] and len(table["data"][0][0]) == 32


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_generate_returns_requested_length(trained):
    work, *_ = trained
    r = trainctl(
        "generate",
        "runs/e2e",
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "30",
        "--temperature",
        "0",
        cwd=work,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:")
    import torch

    from trainer.checkpoint import find_checkpoint
    from trainer.generate import load_model

    model, tok = load_model(find_checkpoint(work / "runs" / "e2e"))
    prompt = torch.tensor([tok.encode("ROMEO:").tolist()])
    out = model.generate(prompt, 30, temperature=0)
    assert out.shape == (1, 6 + 30)
    assert r.stdout == "ROMEO:" + tok.decode(out[0, 6:].tolist()) + "\n"  # the CLI samples the same greedy text


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_workers_error_that_would_recur_ends_an_unlimited_job_at_once_with_its_line(trained):
    """A shard damaged after prepare: the workers fail reading it. Under cluster.max_failures:
    -1 the job ends at that first failure, with the error's one line and exit 2 (the user's to
    fix, as before launch), and the attempt log says why it was not restarted: started again,
    the workers would read the same shard (the old loop restarted it for ever, ~17 s a turn;
    this run's time limit failed it)."""
    work, *_ = trained
    broken = work / "broken"
    subprocess.run(["cp", "-r", str(work / "data"), str(broken)], check=True)
    (broken / "train-000000.tar").write_bytes(b"not a tar file" * 100)
    r = trainctl(
        "run", "job.yaml", "name=broken", "data.path=broken", "train.sample_tokens=0", "cluster.max_failures=-1",
        cwd=work, timeout=200,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("trainctl: error: ") and "train-000000.tar" in last, r.stderr[-2000:]
    assert "starting the workers again" not in r.stderr
    rows = [json.loads(line) for line in (work / "runs" / "broken" / "attempts.jsonl").read_text().splitlines()]
    (failure,) = [row for row in rows if "failure" in row]
    assert failure["class"] == "recurring" and failure["wait_s"] is None and "train-000000.tar" in failure["failure"]


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_a_cluster_address_nothing_answers_on_is_refused_before_anything_is_written(trained):
    work, *_ = trained
    r = trainctl_here("run", "job.yaml", "name=nowhere", "--address", "127.0.0.1:1", cwd=work)
    assert r.returncode == 2 and r.stderr.startswith(
        "trainctl: error: --address 127.0.0.1:1: no Ray cluster answers there"
    ), r.stderr
    assert not (work / "runs" / "nowhere").exists()  # no launch.json: refused before the run folder
    assert len(r.stderr.splitlines()) == 1 and r.stdout == ""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_single_plain_process_without_ray(trained):
    """The same worker function alone in this process: `--no-ray` with one worker. Its
    output is the console's alone: no DeepSpeed op build, no profiler lines. Its sockets
    (its group of one: the store, gloo's listener) are on loopback, the hostname resolving
    outward (cli_helpers.hostname_outward)."""
    work, *_ = trained
    r, seen = trainctl_watched(
        "run",
        "job.yaml",
        "--no-ray",
        "name=solo",
        "cluster.num_workers=1",
        "train.max_steps=10",
        "train.eval_every=10",
        "checkpoint.every=10",
        "train.sample_tokens=5",
        "--profile",
        "1-2",
        cwd=work,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert console_noise(r, sample_tokens=5) == []
    rows = metrics(work / "runs" / "solo")
    assert [m["step"] for m in rows if "loss" in m] == [10] and [m["step"] for m in rows if "val_loss" in m] == [10]
    assert (work / "runs" / "solo" / "checkpoints" / "latest").read_text() == "step_00000010"
    assert "sample from the final checkpoint" in r.stdout and "Ray" not in r.stdout
    assert outward_sockets(seen) == []


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_cluster_check_on_this_machine_measures_the_worker_actors_local_jobs_run(trained):
    """`trainctl cluster check` with `cluster.address: local`: a private Ray, the storage
    probe, and the all-reduce over the job's 2 workers started as a local job's are (plain
    Ray actors, no Ray Train controller or workers), its sockets on loopback (the hostname
    resolving outward). Before, a private Ray was refused."""
    work, *_ = trained
    r, seen = trainctl_watched("cluster", "check", "job.yaml", cwd=work, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "1 alive nodes:" in r.stdout and f"storage {work / 'runs'}: writable from every node" in r.stdout
    bandwidth = re.search(
        r"all-reduce over 2 workers \(gloo, worker actors on this machine's loopback\): ([0-9.]+) GB/s", r.stdout
    )
    assert bandwidth and float(bandwidth.group(1)) > 0, r.stdout
    names = {s.split(" ", 1)[1] for s in set().union(*seen.values())}
    assert any(n.startswith("ray::TrainWorker") for n in names), names
    assert not [n for n in names if n.startswith(("ray::TrainController", "ray::RayTrainWorker"))], names
    assert outward_sockets(seen) == []


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bpe_dataset_trains_and_its_tokenizer_travels_into_the_checkpoint(trained):
    work, *_ = trained
    r = trainctl("prepare", "text.txt", "--out", "bpe", "--tokenizer", "bpe:512", cwd=work, timeout=120)
    assert r.returncode == 0, r.stderr
    # refusals in this process (nothing starts before them)
    small = trainctl_here("run", "job.yaml", "--no-ray", "name=bpe", "data.path=bpe", "cluster.num_workers=1", cwd=work)
    assert small.returncode == 2 and "tokenizer has 512 tokens but model.vocab_size=257" in small.stderr
    r = trainctl(
        "run",
        "job.yaml",
        "--no-ray",
        "name=bpe",
        "data.path=bpe",
        "model.vocab_size=512",
        "cluster.num_workers=1",
        "train.max_steps=10",
        "train.eval_every=10",
        "checkpoint.every=10",
        "train.sample_tokens=0",
        cwd=work,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((work / "runs" / "bpe" / "checkpoints" / "step_00000010" / "trainctl.json").read_text())
    assert info["tokenizer"]["name"] == "bpe" and info["tokenizer"]["vocab_size"] == 512 and "json" in info["tokenizer"]
    r = trainctl("generate", "runs/bpe", "--prompt", "ROMEO:", "--max-new-tokens", "12", cwd=work, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:") and len(r.stdout) > len("ROMEO:") + 12, r.stderr
    # the byte-level run cannot continue on BPE data
    r = trainctl_here("run", "job.yaml", "data.path=bpe", "model.vocab_size=512", cwd=work)
    assert r.returncode == 2 and "run 'e2e' was trained with the byte tokenizer (vocab 257)" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_training_over_http_matches_the_local_folder(trained):
    """The prepared dataset served by a real HTTP server on 127.0.0.1: the same losses."""
    from http_helpers import serve

    work, *_ = trained

    def run(name: str, path: str) -> subprocess.CompletedProcess:
        return trainctl(
            "run",
            "job.yaml",
            "--no-ray",
            f"name={name}",
            f"data.path={path}",
            "cluster.num_workers=1",
            "train.max_steps=4",
            "train.log_every=1",
            "train.eval_every=4",
            "checkpoint.every=4",
            "train.sample_tokens=0",
            "tracking.mode=disabled",
            cwd=work,
            timeout=300,
        )

    with serve(work) as httpd:
        losses = {}
        url = f"http://127.0.0.1:{httpd.server_address[1]}/data"
        for name, r in zip(("local", "http"), together(lambda: run("local", "data"), lambda: run("http", url))):
            assert r.returncode == 0, r.stderr[-3000:]  # the two runs at once
            losses[name] = [(m["step"], m.get("loss"), m.get("val_loss")) for m in metrics(work / "runs" / name)]
    assert len(losses["http"]) == 5 and losses["http"] == losses["local"]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_skip_policy_under_ray_over_http_with_a_password_no_line_or_file_holds(trained):
    """data.on_error=skip under the private Ray, the dataset on a real HTTP server that
    demands Basic auth, reached as http://USER:PASSWORD@127.0.0.1:PORT/... from the job file
    (and a token in cluster.env): both workers pass over the broken chunk and finish (bounded
    by the timeout), and no file the run wrote (the run folder: workers.log, metrics.jsonl,
    config.yaml, W&B's offline files, checkpoints, profiles; the private Ray's session logs,
    in the run's own TMPDIR; W&B's service logs) nor its console holds either secret. The
    same run (to spare a Ray start) has --profile 2."""
    import shutil
    import tempfile
    import time

    from http_helpers import basic, serve

    work, *_ = trained
    r = trainctl("prepare", "text.txt", "--out", "broken-skip", "--shard-size-mb", "0.1", cwd=work, timeout=120)
    assert r.returncode == 0, r.stderr
    broken = work / "broken-skip"
    assert len(list(broken.glob("train-*.tar"))) == 6
    from data_pipeline import TokenStream

    stream = TokenStream(str(broken), "train", 32, 8, 0, 2, seed=1337)
    _, slot, _ = stream.layout(0).locate(0, 0)  # the chunk lane 0 reads first
    first = Path(stream.table.urls[stream.layout(0).perm[slot]]).name
    size = (broken / first).stat().st_size  # the same size: a sha256 mismatch, not a short read (retried over http)
    (broken / first).write_bytes((b"not a tar file" * size)[:size])
    user, password, token = "reader", "pw-5ecr3t-e2e-0b7c", "tok-5ecr3t-e2e-9a2d"
    secrets = (password.encode(), token.encode())
    tmp = Path(tempfile.mkdtemp(prefix="t26", dir="/tmp"))  # short: Ray's socket paths live under it
    started = time.time()
    try:
        with serve(work, auth=basic(user, password)) as httpd:
            url = f"http://{user}:{password}@127.0.0.1:{httpd.server_address[1]}/broken-skip"
            (work / "skip.yaml").write_text(
                JOB.replace("{path: data,", f"{{path: '{url}', on_error: skip,").replace(
                    "num_workers: 2}", f"num_workers: 2, env: {{TRAINCTL_TEST_TOKEN: {token}}}}}"
                )
            )
            r = trainctl(
                "run",
                "skip.yaml",
                "name=skip",
                "train.max_steps=10",
                "train.sample_tokens=0",
                "--profile",
                "2",
                cwd=work,
                timeout=300,
                TMPDIR=str(tmp),
                RAY_TMPDIR=str(tmp),
            )
            sent = {a for _, a in httpd.handler.authorizations}
        assert r.returncode == 0, r.stderr[-3000:]
        assert sent == {basic(user, password)}  # every request, both workers' and the launcher's
        run = work / "runs" / "skip"
        rows = [m for m in metrics(run) if "loss" in m]
        assert [m["step"] for m in rows] == [10] and rows[0]["data_skipped_shards"] >= 1
        console = r.stdout + r.stderr
        assert f"skipping a chunk (data.on_error=skip): chunk {url.replace(password, '***')}/{first} bytes" in console
        assert all(s.decode() not in console for s in secrets)
        sessions = list(tmp.glob("ray/session_2*/logs"))
        assert len(sessions) == 1 and (sessions[0] / "raylet.out").is_file()  # the run's private Ray logged here
        assert (run / "workers.log").stat().st_size > 0 and list(run.glob("wandb/*/run-*.wandb"))
        wandb_logs = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wandb" / "logs"
        written = [p for p in [*run.rglob("*"), *tmp.rglob("*")] if p.is_file() and not p.is_symlink()]
        written += [p for p in wandb_logs.glob("*") if p.stat().st_mtime >= started]
        assert len(written) > 50
        leaks = [str(p) for p in written if any(s in p.read_bytes() for s in secrets)]
        assert leaks == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # --profile 2: steps 6-7 (after the 5-step warm-up), a Chrome trace per rank
    assert "trainctl: profile of steps 6-7:" in r.stdout
    for rank in (0, 1):
        trace = json.loads((work / "runs" / "skip" / "profile" / f"trace-steps6-7-rank{rank}.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any("aten::mm" in n or "aten::addmm" in n for n in names) and any("backward" in n.lower() for n in names)
    bad = trainctl_here("run", "job.yaml", "name=prof2", "--profile", "two", cwd=work)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "trainctl: error: --profile two: give N"
    )
    assert not (work / "runs" / "prof2").exists()


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_raw_text_shards_train_without_prepare(trained):
    """Shards of .txt samples written by plain webdataset: `trainctl run` reads them as they are."""
    import webdataset as wds

    work, *_ = trained
    (work / "raw").mkdir()
    text = (work / "text.txt").read_text()
    for s in range(2):
        with wds.TarWriter(str(work / "raw" / f"part-{s:04d}.tar")) as sink:
            for k in range(50):
                sink.write({"__key__": f"{s}-{k}", "txt": text[(s * 50 + k) * 1000 : (s * 50 + k + 1) * 1000]})
    r = trainctl(
        "run",
        "job.yaml",
        "--no-ray",
        "name=raw",
        "data.path=raw/part-{0000..0001}.tar",
        "cluster.num_workers=1",
        "train.max_steps=6",
        "train.log_every=3",
        "checkpoint.every=6",
        "train.sample_tokens=0",
        "tracking.mode=disabled",
        cwd=work,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(work / "runs" / "raw")
    assert [m["step"] for m in rows] == [3, 6] and all("val_loss" not in m for m in rows)  # raw shards: no val split
    assert (
        json.loads((work / "runs" / "raw" / "checkpoints" / "step_00000006" / "trainctl.json").read_text())["step"] == 6
    )
    bad = trainctl_here(  # refusals in this process (nothing starts before them)
        "run",
        "job.yaml",
        "--no-ray",
        "name=raw2",
        "data.path=raw/part-{0000..0009}.tar",
        "cluster.num_workers=1",
        cwd=work,
    )
    assert bad.returncode == 2 and "8 of 10 shards do not exist" in bad.stderr, bad.stderr
    # --no-ray alone is one process: the job's 2 workers are refused before anything is written
    bad = trainctl_here("run", "job.yaml", "--no-ray", "name=raw3", cwd=work)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "trainctl: error: --no-ray runs 1 process but cluster.num_workers=2: "
        "set cluster.num_workers=1 (or start the ranks with torchrun)"
    )
    assert not (work / "runs" / "raw3").exists()


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_mixed_sources_train_and_log_their_proportions(trained):
    work, *_ = trained
    (work / "code.txt").write_text((REPO / "trainer" / "model.py").read_text() * 8)
    assert trainctl("prepare", "code.txt", "--out", "code", cwd=work, timeout=120).returncode == 0
    (work / "mix.yaml").write_text(
        JOB.replace("data: {path: data,", "data: {sources: [{path: data, weight: 3}, {path: code, weight: 1}],")
    )
    r = trainctl(
        "run",
        "mix.yaml",
        "--no-ray",
        "name=mix",
        "cluster.num_workers=1",
        "train.max_steps=20",
        "train.sample_tokens=0",
        "tracking.mode=disabled",
        cwd=work,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [m for m in metrics(work / "runs" / "mix") if "loss" in m]
    mix = rows[-1]["data_mix"]  # 20 steps x 8 sequences
    assert set(mix) == {str(work / "data"), str(work / "code")} and abs(mix[str(work / "data")] - 0.75) < 0.1
    assert [m["step"] for m in metrics(work / "runs" / "mix") if "val_loss" in m] == [20]  # both val splits


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_document_masking_trains(trained):
    """data.document_masking through DeepSpeed: the same first batch, a different loss than
    without the mask wherever a window holds an end-of-text."""
    work, *_ = trained
    (work / "docs").mkdir()
    text = (work / "text.txt").read_text()
    for i in range(60):  # many short documents, so that windows cross document ends
        (work / "docs" / f"{i:03d}.txt").write_text(text[i * 300 : (i + 1) * 300])
    assert trainctl("prepare", "docs", "--out", "docs-data", cwd=work, timeout=120).returncode == 0

    def run(masking: str) -> subprocess.CompletedProcess:
        return trainctl(
            "run",
            "job.yaml",
            "--no-ray",
            f"name=mask-{masking}",
            "data.path=docs-data",
            "cluster.num_workers=1",
            f"data.document_masking={masking}",
            "train.max_steps=3",
            "train.log_every=1",
            "train.eval_every=3",
            "checkpoint.every=3",
            "train.sample_tokens=0",
            "tracking.mode=disabled",
            cwd=work,
            timeout=300,
        )

    losses = {}
    for masking, r in zip(("false", "true"), together(lambda: run("false"), lambda: run("true"))):  # at once
        assert r.returncode == 0, r.stderr[-3000:]
        losses[masking] = [m for m in metrics(work / "runs" / f"mask-{masking}") if "loss" in m]
    assert [m["step"] for m in losses["true"]] == [1, 2, 3]
    assert all(0 < m["loss"] < 6 for m in losses["true"])
    assert losses["true"][0]["loss"] != losses["false"][0]["loss"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_in_training_eval_equals_trainctl_eval_on_that_steps_checkpoint(trained):
    """train.evals at steps 20 and 40 on 2 Ray workers (each scoring its share of the items):
    logged as eval/easy/acc and acc_norm; `trainctl eval` of the run (its step-40 checkpoint,
    one process) gives the same numbers."""
    work, r, _ = trained
    rows = [m for m in metrics(work / "runs" / "e2e") if "eval/easy/acc" in m]
    assert [m["step"] for m in rows] == [20, 40]
    assert r.stdout.count("| eval easy acc ") == 2  # rank 0's line, once an evaluation
    out = trainctl("eval", "runs/e2e", "--task", str(EVAL_TASK), "--json", cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    (task,) = json.loads(out.stdout)["tasks"]
    assert (task["acc"], task["acc_norm"]) == (rows[1]["eval/easy/acc"], rows[1]["eval/easy/acc_norm"])
