"""Validation independent of the world size (issue 26): `train.eval_sequences` names the
same set of sequences for any number of ranks, micro batch and accumulation, each rank
evaluating its share, the loss the mean over every trained token; a job file with the old
`train.eval_batches` is refused in one line naming the value to set."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from cli_helpers import REPO, SHAKESPEARE, env, together, torchrun, trainctl_here

from data_pipeline import prepare
from trainer.config import JobConfig

N = 7  # validation sequences per source: shares of 4 and 3 on two ranks


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A text dataset and a prompt-completion one (loss flags: only completions trained), byte
    tokenizer, rows of 33 tokens, their val splits in several chunks."""
    root = tmp_path_factory.mktemp("val")
    (root / "t.txt").write_text(SHAKESPEARE.read_text()[:20_000])
    prepare([str(root / "t.txt")], str(root / "text"), val_fraction=0.2, chunk_bytes=512, sample_tokens=64)
    records = [{"prompt": f"Q{i}: " + "ab" * (i % 5), "completion": " answer " * (1 + i % 4)} for i in range(400)]
    (root / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare(
        [str(root / "pc.jsonl")],
        str(root / "pc"),
        val_fraction=0.2,
        chunk_bytes=512,
        sample_tokens=64,
        format="prompt-completion",
        seq_len=32,
    )
    return root


def overrides(root, workers: int, micro: int, accum: int) -> list[str]:
    return [
        "name=val",
        "model.vocab_size=257",
        "model.n_layer=2",
        "model.n_head=2",
        "model.d_model=32",
        "model.max_seq_len=32",
        f"data.sources=[{{path: {root / 'text'}, weight: 1}}, {{path: {root / 'pc'}, weight: 1}}]",
        "data.seq_len=32",
        "data.num_workers=0",
        f"train.micro_batch_size={micro}",
        f"train.grad_accum_steps={accum}",
        "train.zero_stage=3",
        f"train.eval_sequences={N}",
        "train.sample_tokens=2",
        f"checkpoint.storage_path={root / f'runs{workers}'}",
        "tracking.mode=disabled",
        f"cluster.num_workers={workers}",
        f"train.evals=[{{path: {REPO / 'tests' / 'data' / 'easy-mc.jsonl'}, name: easy, limit: 39}}]",
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_rank_and_two_ranks_give_the_same_validation_loss(sources, tmp_path):
    """The untrained model validated as `trainctl run` builds it (real DeepSpeed ZeRO-3, gloo):
    1 rank x micro 4 x accumulation 3 against 2 ranks x micro 3 x accumulation 2 (the same
    global batch of 12). Per source 7 sequences: shares of 4 and 3, so rank 1 runs one forward
    less of its own and one on a filler row (ZeRO-3 gathers weights in every forward), and
    the micro batches hold 4+3 rows on one rank, 3+1 and 3 on two: a mean of per-batch
    means, or another set of sequences, would not match."""
    script = str(REPO / "tests/scripts/val_world.py")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    runs = [
        [sys.executable, script, str(one), *overrides(sources, 1, 4, 3)],
        torchrun(script, str(two), *overrides(sources, 2, 3, 2)),
    ]
    environ = env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")

    def run(cmd):
        return subprocess.run(cmd, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=240)

    for r in together(*[lambda c=c: run(c) for c in runs]):
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["shares"] == [[2 * N, 4]]  # rows and forward passes of each rank
    assert b["shares"] == [[8, 3], [6, 3]]
    assert 4.0 < a["val_loss"] < 7.0  # an untrained byte model: about ln(257) = 5.55
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-6, (a, b)
    # train.evals: 39 items, 20 on rank 0 and 19 + one uncounted on rank 1: the same scores
    seconds = [x["evals"].pop("eval/seconds") for x in (a, b)]  # what the evaluation took, rank 0's
    assert all(0 < s < 60 for s in seconds), seconds
    assert set(a["evals"]) == {"eval/easy/acc", "eval/easy/acc_norm"} and a["evals"] == b["evals"], (a, b)
    assert all(round(v * 39) / 39 == v for v in a["evals"].values())  # counts of the 39 items


def test_a_job_file_with_eval_batches_is_refused_naming_the_sequences_to_set(tmp_path):
    job = tmp_path / "old.yaml"
    job.write_text("train: {micro_batch_size: 8, eval_batches: 20}\ncluster: {num_workers: 2}\n")
    fix = (
        "train.eval_batches is replaced by train.eval_sequences, validation sequences per pass (the same set for any "
        "number of workers): this job's eval_batches evaluated 20 x micro_batch_size 8 x 2 workers = 320 sequences; "
        "set train.eval_sequences: 320 instead"
    )
    r = trainctl_here("run", str(job), cwd=tmp_path)
    assert (r.returncode, r.stdout) == (2, "") and r.stderr == f"trainctl: error: {fix} (in {job})\n"
    (tmp_path / "new.yaml").write_text("cluster: {num_workers: 1}\n")
    r = trainctl_here("run", str(tmp_path / "new.yaml"), "train.eval_batches=3", cwd=tmp_path)
    assert r.returncode == 2 and "x micro_batch_size 8 x 1 workers = 24 sequences" in r.stderr
    assert r.stderr.endswith("(in the command-line overrides)\n") and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    # a config.yaml an older trainctl wrote (a checkpoint's, read by export, generate and a resume's
    # checks) still loads: its batches as the sequences they were at its own number of workers
    old = yaml.safe_load(JobConfig().to_yaml())
    old["train"] = {**{k: v for k, v in old["train"].items() if k != "eval_sequences"}, "eval_batches": 5}
    old["train"]["micro_batch_size"], old["cluster"]["num_workers"] = 4, 3
    assert JobConfig.model_validate(old).train.eval_sequences == 60
