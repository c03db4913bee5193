"""`trainctl submit` and the job's data: a local dataset the upload does not carry (outside
the working directory, or left out of the upload) is refused before any cluster is
contacted, unless --shared-data says every node mounts it; URLs and `stdlib` pass. No Ray
cluster needed: the check comes first."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from cli_helpers import REPO, SHAKESPEARE, trainctl, trainctl_here

from cluster.jobs import EXCLUDES, cluster_data_overrides, left_out, local_data_outside, upload_size
from launcher.config import load_config

NOWHERE = "http://127.0.0.1:1"  # no dashboard listens there: a job that passes the check fails on it


@pytest.fixture
def site(tmp_path):
    """A job folder to submit from (data/ and a .gitignore'd folder in it) and a folder beside it."""
    job, outside = tmp_path / "job", tmp_path / "outside"
    for folder in (job / "corpus", job / "data", job / "scratch", outside):
        folder.mkdir(parents=True)
        (folder / "t.txt").write_text("to be or not to be\n" * 100)
    (job / ".gitignore").write_text("scratch/\n")
    (job / "job.yaml").write_text(
        "name: j\ndata: {path: corpus/t.txt}\ntracking: {mode: disabled}\n"
        f"checkpoint: {{storage_path: {tmp_path / 'runs'}}}\n"
    )
    return job, outside


def check(job: Path, *overrides: str) -> str | None:
    return local_data_outside(load_config(job / "job.yaml", list(overrides), base_dir=str(job)), job)


def test_data_the_upload_carries_passes_and_the_rest_is_named(site):
    job, outside = site
    assert check(job) is None  # corpus/t.txt, relative, in the upload
    assert check(job, f"data.path={job / 'corpus'}") is None
    assert check(job, "data.path=corpus/*.txt") is None
    (job.parent / "link").symlink_to(job)  # the same folder by another name
    assert check(job, f"data.path={job.parent / 'link' / 'corpus'}") is None
    for url in ("https://host/data", "s3://bucket/data", "gs://bucket/data", "stdlib"):
        assert check(job, f"data.path={url}") is None, url
    said = check(job, f"data.path={outside / 't.txt'}")
    assert said == (
        f"data.path {outside / 't.txt'} is outside the folder submit uploads ({job}) and not a URL: copy "
        f"it under {job}, give an http(s)://, s3:// or gs:// URL, or pass --shared-data if every node "
        "mounts it at that path"
    )
    assert "is outside the folder submit uploads" in check(job, f"data.path={os.path.relpath(outside / 't.txt', job)}")
    assert "is outside" in check(job, f"data.path={outside}/*.txt")
    assert "is outside" in check(job, f"data.path=file://{outside / 't.txt'}")
    for left in ("data/t.txt", "scratch/t.txt", "data/web/train-{000000..000009}.tar"):
        assert "but the upload leaves it out" in check(job, f"data.path={left}"), left
    mixed = check(
        job, "data.path=stdlib", f"data.sources=[{{path: stdlib, weight: 1}}, {{path: {outside}, weight: 2}}]"
    )
    assert mixed.startswith(f"data.sources[1].path {outside} is outside")


def test_the_job_on_the_cluster_is_pointed_at_its_data(site):
    """Uploaded data: relative to the uploaded folder (the job runs in its copy); data on
    shared storage: its absolute path here."""
    job, outside = site

    def overrides(*given):
        return cluster_data_overrides(load_config(job / "job.yaml", list(given), base_dir=str(job)), job)

    assert overrides() == ["data.path=corpus/t.txt"]
    assert overrides(f"data.path={job / 'corpus' / 't.txt'}") == ["data.path=corpus/t.txt"]
    assert overrides("data.path=data/t.txt") == [f"data.path={job / 'data' / 't.txt'}"]
    (job.parent / "link").symlink_to(job)
    assert overrides(f"data.path={job.parent / 'link' / 'corpus' / '*.txt'}") == ["data.path=corpus/*.txt"]
    assert overrides('data.path="corpus/a: b.txt"') == ['data.path="corpus/a: b.txt"']  # read back as it was
    assert overrides("data.path=s3://bucket/x") == [] and overrides("data.path=stdlib") == []
    [mix] = overrides(
        "data.path=stdlib",
        f"data.sources=[{{path: corpus, weight: 1}}, {{path: {outside}, weight: 2}}, {{path: https://h/x, weight: 1}}]",
    )
    cfg = load_config(None, [mix], base_dir="/elsewhere")  # as the cluster reads it, in its copy
    assert [(s.path, s.weight) for s in cfg.data.sources] == [
        ("/elsewhere/corpus", 1),
        (str(outside), 2),
        ("https://h/x", 1),
    ]


TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def test_a_local_model_folder_goes_where_data_goes(site):
    """model.init_from is placed like data.path: carried when uploaded (and pointed at in
    the job's copy), named when outside or left out."""
    job, outside = site
    for folder in (job / "models" / "m", outside / "m", job / "data" / "m"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    assert check(job, "model.init_from=models/m") is None
    assert check(job, f"model.init_from={outside / 'm'}").startswith(
        f"model.init_from {outside / 'm'} is outside the folder submit uploads"
    )
    assert "but the upload leaves it out" in check(job, "model.init_from=data/m")
    cfg = load_config(job / "job.yaml", ["model.init_from=models/m"], base_dir=str(job))
    assert cluster_data_overrides(cfg, job) == ["data.path=corpus/t.txt", "model.init_from=models/m"]


def test_the_repo_uploads_its_test_corpus_and_stays_small():
    assert "!/tests/data" in EXCLUDES and not left_out(REPO, SHAKESPEARE) and left_out(REPO, REPO / "data" / "x")
    size, _ = upload_size(REPO)
    assert size < 16 * 2**20
    cfg = load_config(REPO / "configs" / "shakespeare-char.yaml", base_dir=str(REPO))
    assert cfg.data.path == str(SHAKESPEARE) and local_data_outside(cfg, REPO) is None


def test_submit_refuses_data_it_does_not_upload_in_one_line_before_the_cluster(site):
    job, outside = site
    r = trainctl("submit", "job.yaml", "--address", NOWHERE, f"data.path={outside / 't.txt'}", cwd=job, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"trainctl: error: data.path {outside / 't.txt'} is outside the folder submit uploads ({job}) and not a URL: "
        f"copy it under {job}, give an http(s)://, s3:// or gs:// URL, or pass --shared-data if every node mounts it "
        "at that path"
    ], r.stderr
    # the same job on storage every node mounts, and jobs whose data goes along or is a URL:
    # past the check, they fail only on the address, where no cluster listens (in this process)
    for args in ([f"data.path={outside / 't.txt'}", "--shared-data"], [], ["data.path=https://host/data"]):
        r = trainctl_here("submit", "job.yaml", "--address", NOWHERE, *args, cwd=job)
        assert r.returncode == 2 and "data.path" not in r.stderr, r.stderr
        assert (
            r.stderr.strip()
            .splitlines()[-1]
            .startswith(f"trainctl: error: cannot reach the Ray dashboard at {NOWHERE}")
        )


def test_submit_help_names_shared_data():
    from launcher.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["submit"]
    assert "--shared-data" in sub.format_help()
    assert yaml.safe_load((REPO / "configs" / "shakespeare-char.yaml").read_text())["data"]["path"] == str(
        SHAKESPEARE.relative_to(REPO)
    )
