"""Security: what a run writes down holds no secret (URL credentials, presigned signatures,
secret cluster.env values); checkpoint tags and `latest` never lead out of the checkpoints
folder; checkpoint files load with torch.load(weights_only=True), never running code."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import webdataset as wds
from cli_helpers import SHAKESPEARE, trainctl
from http_helpers import bearer, serve

from data_pipeline.redact import REDACTED, redact_text, redact_url
from trainer.redaction import redact, secrets_apart, secrets_back

SECRET = "S3CR3T-planted-7f3a"
ARGV_SECRET = "S3CR3T-argv-91c2"  # given on the command line instead
TOKEN = "S3CR3T-bearer-4d1e"  # the bearer token the server demands, from TRAINCTL_HTTP_TOKEN


def test_redact_urls_env_and_text():
    assert redact_url(f"https://me:{SECRET}@host/d/x.tar") == "https://me:***@host/d/x.tar"
    assert redact_url(f"https://{SECRET}@github.com/o/r.git") == "https://***@github.com/o/r.git"  # a token as user
    assert (
        redact_url(f"s3://b/k.tar?X-Amz-Date=20250101&X-Amz-Credential=AKIA%2F{SECRET}&X-Amz-Signature={SECRET}")
        == "s3://b/k.tar?X-Amz-Date=20250101&X-Amz-Credential=***&X-Amz-Signature=***"
    )
    assert redact_url(f"https://acct.blob.core.windows.net/c/x.tar?sv=2024&sp=r&sig={SECRET}#top") == (
        "https://acct.blob.core.windows.net/c/x.tar?sv=2024&sp=r&sig=***#top"
    )
    assert (
        redact_url(f"http://h:8/d-{{000..009}}.tar?token={SECRET}&part=1")
        == "http://h:8/d-{000..009}.tar?token=***&part=1"
    )
    for plain in ("/data/x.tar", "stdlib", "s3://bucket/runs", "http://127.0.0.1:8000/d/x-{0..3}.tar", "hf://a/b?c=d"):
        assert redact_url(plain) == plain
    assert redact_text(f"pipe:curl -H 'Authorization: Bearer {SECRET}' https://u:{SECRET}@h/x.tar") == (
        "pipe:curl -H 'Authorization: Bearer ***' https://u:***@h/x.tar"
    )
    tree = {
        "name": "r",
        "data": {
            "path": f"https://u:{SECRET}@h/d",
            "tokenizer": "byte",
            "sources": [{"path": f"s3://b/x?sig={SECRET}"}],
        },
        "cluster": {"env": {"HF_TOKEN": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET, "OMP_NUM_THREADS": "4"}},
    }
    assert redact(tree) == {
        "name": "r",
        "data": {"path": "https://u:***@h/d", "tokenizer": "byte", "sources": [{"path": "s3://b/x?sig=***"}]},
        "cluster": {"env": {"HF_TOKEN": REDACTED, "AWS_SECRET_ACCESS_KEY": REDACTED, "OMP_NUM_THREADS": "4"}},
    }
    assert tree["cluster"]["env"]["HF_TOKEN"] == SECRET  # a copy: the workers get the real values


JOB = f"""\
name: leak
model: {{n_layer: 1, n_head: 2, d_model: 32, max_seq_len: 16}}
data: {{path: "@DATA@", seq_len: 16, shuffle_buffer: 64}}
train: {{max_steps: 3, micro_batch_size: 2, warmup_steps: 1, eval_every: 3, eval_sequences: 2, log_every: 1,
        sample_tokens: 0}}
checkpoint: {{storage_path: runs, every: 3, keep: 1, async_save: false}}
tracking: {{mode: offline, project: trainctl-tests}}
cluster:
  num_workers: 1
  env: {{HF_TOKEN: {SECRET}-env, PIP_INDEX_URL: "https://me:{SECRET}-url@pypi.example/simple"}}
"""


@pytest.fixture(scope="module")
def leaky_run(tmp_path_factory):
    """A real 3-step --no-ray run (W&B offline) whose data.path is a presigned-style URL of
    raw-text shards served on 127.0.0.1 (the server ignores the query, and demands a bearer
    token: TRAINCTL_HTTP_TOKEN's) and whose cluster.env holds a token and a URL with a password."""
    work = tmp_path_factory.mktemp("security")
    shards = work / "shards"
    shards.mkdir()
    text = SHAKESPEARE.read_text()[:40_000]
    for s in range(2):
        with wds.TarWriter(str(shards / f"part-{s}.tar")) as sink:
            for k in range(20):
                sink.write({"__key__": f"{s}-{k}", "txt": text[(s * 20 + k) * 1000 : (s * 20 + k + 1) * 1000]})
    with serve(shards, auth=bearer(TOKEN)) as httpd:
        url = f"http://127.0.0.1:{httpd.server_port}/part-{{0..1}}.tar?X-Amz-Credential=AKIA%2F{SECRET}&X-Amz-Signature={SECRET}"
        (work / "job.yaml").write_text(JOB.replace("@DATA@", url))
        r = trainctl(
            "run",
            "job.yaml",
            "--no-ray",
            f"cluster.env.WANDB_API_KEY={ARGV_SECRET}",
            cwd=work,
            timeout=240,
            TRAINCTL_HTTP_TOKEN=f"127.0.0.1:{httpd.server_port}={TOKEN}",
        )
        hits = sum(httpd.handler.hits.values())
        sent = {a for _, a in httpd.handler.authorizations}
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert hits >= 2  # the shards were read through the secret-bearing URL
    assert sent == {bearer(TOKEN)}  # with the token, every request
    return work, r


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_no_secret_reaches_the_run_folder_wandb_or_the_console(leaky_run):
    work, r = leaky_run
    run = work / "runs" / "leak"
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.relative_to(run).as_posix() for p in files}
    assert {"config.yaml", "metrics.jsonl", "checkpoints/step_00000003/config.yaml"} <= names
    wandb_runs = [p for p in files if p.suffix == ".wandb"]  # W&B offline: config, metadata and history inside
    assert wandb_runs and all(b"X-Amz-Signature=***" in p.read_bytes() for p in wandb_runs)  # the config, redacted
    leaks = [p.relative_to(run).as_posix() for p in files if any(s.encode() in p.read_bytes() for s in (SECRET, TOKEN))]
    assert leaks == []
    assert all(s not in r.stdout + r.stderr for s in (SECRET, TOKEN))
    # what is written is the job with its secrets as ***: still a valid job file
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["path"].endswith("X-Amz-Credential=***&X-Amz-Signature=***")
    assert saved["cluster"]["env"] == {
        "HF_TOKEN": REDACTED,
        "PIP_INDEX_URL": "https://me:***@pypi.example/simple",
        "WANDB_API_KEY": REDACTED,
    }
    assert "data http://127.0.0.1:" in r.stdout and "X-Amz-Signature=***" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_secret_given_on_the_command_line_stays_out_of_the_run_folder(leaky_run):
    work, r = leaky_run
    run = work / "runs" / "leak"
    assert yaml_load(run / "config.yaml")["cluster"]["env"]["WANDB_API_KEY"] == REDACTED
    assert ARGV_SECRET not in r.stdout and ARGV_SECRET not in r.stderr
    leaks = [
        p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and ARGV_SECRET.encode() in p.read_bytes()
    ]
    assert leaks == []


def yaml_load(path: Path):
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_files_load_weights_only(leaky_run, tmp_path):
    """Every .pt file trainctl reads itself (rank state, model states) loads with
    weights_only=True; a pickle that would run code is refused, and nothing runs."""
    import torch

    from trainer.checkpoint import load_torch

    work, _ = leaky_run
    ckpt = work / "runs" / "leak" / "checkpoints" / "step_00000003"
    rank = load_torch(ckpt / "rank_00000.pt")
    assert rank["step"] == 3 and rank["rng"]["numpy"][0] == "MT19937" and torch.is_tensor(rank["rng"]["torch"])
    assert "tok_emb.weight" in load_torch(ckpt / "mp_rank_00_model_states.pt", map_location="cpu")["module"]

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_torch(tmp_path / "evil.pt")
    assert not marker.exists()


def _fake_checkpoint(root: Path, tag: str, files: dict[str, int] | None = None) -> Path:
    (root / tag).mkdir(parents=True)
    (root / tag / "trainctl.json").write_text(
        json.dumps({"step": int(tag[5:]) if tag[5:].isdigit() else 0, "files": files or {}})
    )
    return root / tag


def test_latest_and_tags_never_lead_out_of_the_checkpoints_folder(tmp_path, capsys):
    from trainer.checkpoint import CheckpointError, Store, find_checkpoint, find_latest

    root = tmp_path / "runs" / "r" / "checkpoints"
    good = _fake_checkpoint(root, "step_00000002")
    _fake_checkpoint(root, "step_99999999x")  # not a tag: never a checkpoint
    _fake_checkpoint(root, "step_zzz")
    outside = _fake_checkpoint(tmp_path, "etc")  # a complete-looking folder outside
    (root / "latest").write_text("../../../etc\n")
    assert find_latest(root) == good and find_checkpoint(tmp_path / "runs" / "r") == good
    assert "holds '../../../etc', not a checkpoint tag (step_ and 8 digits); ignoring it" in capsys.readouterr().err
    (root / "latest").write_text(str(outside))
    assert find_latest(root) == good
    assert Store(root).tags() == ["step_00000002"]
    for bad in ("../etc", "/etc", "step_1", "step_00000002/../../x"):
        with pytest.raises(CheckpointError, match="is not a checkpoint tag"):
            Store(root).fetch(bad)
        with pytest.raises(CheckpointError):
            Store(root).delete([bad])
    assert outside.is_dir() and good.is_dir()


def test_an_object_stores_file_list_cannot_write_outside_the_mirror(tmp_path):
    """A checkpoint downloaded from an object store writes the files its trainctl.json lists
    into the local mirror: a name like ../../x is refused, not followed."""
    import fsspec

    from trainer.checkpoint import CheckpointError, Store

    fs = fsspec.filesystem("memory")
    base = f"/trainctl-test-{os.getpid()}/ckpts"
    fs.pipe_file(f"{base}/step_00000001/model.pt", b"weights")
    fs.pipe_file(f"{base}/step_00000001/trainctl.json", json.dumps({"files": {"model.pt": 7}}).encode())
    fs.pipe_file(f"{base}/step_00000002/trainctl.json", json.dumps({"files": {"../../escaped": 7}}).encode())
    fs.pipe_file(f"{base}/step_x/trainctl.json", b"{}")
    mirror = tmp_path / "mirror" / "a" / "b"
    store = Store(mirror, f"memory://{base}")
    try:
        assert store.tags() == ["step_00000001", "step_00000002"]
        assert (store.fetch("step_00000001") / "model.pt").read_bytes() == b"weights"
        with pytest.raises(CheckpointError, match=r"lists a file outside it \('../../escaped'\)"):
            store.fetch("step_00000002")
        assert not list(tmp_path.rglob("escaped"))
    finally:
        fs.rm(f"/trainctl-test-{os.getpid()}", recursive=True)


def test_the_workers_get_the_config_secrets_apart_from_their_arguments():
    """A private Ray's workers get the config redacted in their arguments (Ray may log those)
    and the real values through the environment they inherit; put back only where the
    redacted value still stands."""
    tree = {
        "data": {"path": f"http://u:{SECRET}@h/d", "sources": [{"path": "local"}, {"path": f"s3://b/x?sig={SECRET}"}]},
        "model": {"init_from": None},
        "cluster": {"env": {"HF_TOKEN": SECRET, "OMP_NUM_THREADS": "1"}},
    }
    redacted, secrets = secrets_apart(tree)
    assert redacted == redact(tree) and SECRET not in json.dumps(redacted)
    assert secrets_back(redacted, secrets) == tree
    assert secrets_apart({"data": {"path": "local"}}) == ({"data": {"path": "local"}}, "")
    other = {**redacted, "data": {**redacted["data"], "path": "http://u:***@elsewhere/d"}}  # not what was redacted
    assert secrets_back(other, secrets)["data"]["path"] == "http://u:***@elsewhere/d"
    assert secrets_back(tree, secrets) == tree and secrets_back(redacted, None) == redacted


def test_the_run_folder_reaches_the_workers_without_its_urls_credentials():
    """The run folder travels to a private Ray's workers with the worker function (in the
    arguments Ray may log): its checkpoint URL's credentials as REDACTED, taken back from
    the worker's config once its secrets are back; a plain path or URL travels as it is."""
    import pickle

    from trainer.config import JobConfig
    from trainer.run_folder import RunFolder

    tree = {"name": "r", "checkpoint": {"storage_path": f"https://u:{SECRET}@store.example/ckpt", "local_path": "l"}}
    cfg = JobConfig.model_validate(tree)
    run = RunFolder.of(cfg)
    assert run.url == f"https://u:{SECRET}@store.example/ckpt/r/checkpoints" and run.path == Path("l/r")
    sent = run.for_workers()
    assert SECRET.encode() not in pickle.dumps(sent) and sent.url == "https://u:***@store.example/ckpt/r/checkpoints"
    redacted, secrets = secrets_apart(cfg.model_dump(mode="json"))
    back = JobConfig.model_validate(secrets_back(redacted, secrets))
    assert sent.restored(back) == run
    plain = RunFolder.of(JobConfig.model_validate({"name": "r", "checkpoint": {"storage_path": "s3://b/c"}}))
    assert plain.for_workers() == plain and plain.restored(cfg) == plain


def test_worker_output_is_redacted_on_the_console_and_in_workers_log(tmp_path, capsys):
    """Every line Ray forwards from a worker goes through redact_text: the trainctl lines
    shown, the others written to workers.log, and with --verbose all of them shown (Ray's
    own dispatcher, fed as Ray's log monitor feeds it; no Ray started)."""
    from cluster.ray_job import LOG_HANDLER, route_worker_logs
    from trainer import patches

    url = f"http://me:{SECRET}@127.0.0.1:1/d/train-000000.tar?X-Amz-Signature={SECRET}"
    lines = [
        f"trainctl: warning: skipping a chunk (data.on_error=skip): chunk {url} bytes 0-10 is unreadable",
        f'  File "x.py", line 1: DataError: cannot read {url}',
        f"curl -H 'Authorization: Bearer {SECRET}'",
    ]
    dispatcher = patches.ray_log_dispatcher()
    for verbose in (False, True):
        log = tmp_path / f"verbose-{verbose}" / "workers.log"
        try:
            route_worker_logs(log, verbose)
            dispatcher.emit({"lines": lines, "pid": 7, "ip": "127.0.0.1", "is_err": True, "actor_name": "TrainWorker"})
        finally:
            dispatcher.remove_handler(LOG_HANDLER)
        err = capsys.readouterr().err
        assert SECRET not in err and "me:***@127.0.0.1:1" in err
        if verbose:
            assert not log.exists() and err.count("TrainWorker pid=7") == 3, err  # as Ray prints them
        else:
            assert err.startswith("trainctl: warning: skipping a chunk") and err.count("\n") == 1
            assert SECRET not in log.read_text() and log.read_text().count("Bearer ***") == 1
