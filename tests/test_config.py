"""Config tier: every shipped job file validates; every bad input is one line, exit 2."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config import ConfigError, load_config
from trainer.engine import deepspeed_config, lr_factor

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path, base_dir=str(REPO), model_folder_optional=True)  # model folders are not shipped
    assert cfg.name == path.stem
    assert cfg.global_batch % (cfg.train.micro_batch_size * cfg.cluster.num_workers) == 0
    assert os.path.isabs(cfg.checkpoint.storage_path)


def test_shipped_configs_cover_the_issue():
    names = {p.stem for p in CONFIGS}
    assert {"tiny-cpu", "shakespeare-char", "gpt2-124m", "llama-1b", "smollm2-sft", "llama3-8b-sft"} <= names


def test_shakespeare_recipe_matches_nanogpt():
    cfg = load_config(REPO / "configs/shakespeare-char.yaml", base_dir=str(REPO))
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.d_model, cfg.data.seq_len) == (4, 4, 128, 64)
    assert (cfg.global_batch, t.max_steps, t.lr, t.lr_decay_steps, m.dropout) == (12, 2000, 1e-3, 2000, 0.0)
    assert cfg.data.val_fraction == 0.1
    # at most nanoGPT's parameters at this shape (its model.py, 65 characters, no biases: 804,096),
    # as benchmarks/vs_nanogpt.py compares the two
    from trainer.model import count_params

    assert count_params(m, non_embedding=False) == 787_712 <= 804_096


def test_overrides_beat_file_beat_defaults(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("name: a\ntrain:\n  lr: 0.01\n  max_steps: 5\n")
    cfg = load_config(f, ["train.lr=3e-4", "cluster.num_workers=1", "tracking.tags=[x, y]"], base_dir=str(tmp_path))
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 5 and cfg.train.micro_batch_size == 8
    assert cfg.cluster.num_workers == 1 and cfg.tracking.tags == ["x", "y"]
    assert cfg.checkpoint.storage_path == str(tmp_path / "runs")


def test_global_batch_derives_accumulation():
    cfg = load_config(None, ["train.global_batch_size=64", "train.micro_batch_size=4", "cluster.num_workers=2"])
    assert cfg.accum_steps == 8 and cfg.global_batch == 64


def _err(tmp_path, text: str | None, overrides=()) -> str:
    path = None
    if text is not None:
        path = tmp_path / "job.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides), base_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_line(tmp_path):
    assert "YAML syntax error at line 2, column 7: mapping values are not allowed here" in _err(
        tmp_path, "train:\n  lr: : 3\n  x: 1\n"
    )


def test_unknown_key_suggests_nearest(tmp_path):
    assert (
        _err(tmp_path, "train:\n  lrr: 0.1\n")
        == "unknown key 'train.lrr' in " + str(tmp_path / "job.yaml") + ": did you mean 'train.lr'?"
    )
    assert "did you mean 'train.max_steps'" in _err(tmp_path, None, ["train.max_step=3"])
    assert "unknown key 'trian'" in _err(tmp_path, None, ["trian.lr=3"])


def test_wrong_type(tmp_path):
    msg = _err(tmp_path, None, ["train.max_steps=abc"])
    assert msg.startswith("train.max_steps='abc'") and "integer" in msg


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["cluster.num_workers=0"], "cluster.num_workers=0"),
        (
            ["train.global_batch_size=10", "train.micro_batch_size=4", "cluster.num_workers=2"],
            "not divisible by train.micro_batch_size * cluster.num_workers",
        ),
        (["model.n_head=3"], "model.n_head=3 must divide model.d_model=128"),
        (["model.n_kv_head=3"], "model.n_kv_head=3 must divide model.n_head=4"),
        (["train.precision=fp16"], "train.precision=fp16 needs cluster.use_gpu=true"),
        (["tracking.mode=foo"], "tracking.mode='foo' is not allowed"),
        (["data.seq_len=512"], "data.seq_len=512 exceeds model.max_seq_len=256"),
        (["train.zero_stage=4"], "train.zero_stage=4 is not allowed"),
        (["train.profile=1-x"], "train.profile='1-x': give N (N steps after a 5-step warm-up) or FIRST-LAST"),
        (
            ["train.profile=22-20"],
            "train.profile='22-20': give N (N steps after a 5-step warm-up) or FIRST-LAST with FIRST <= LAST",
        ),
        (
            ["cluster.peak_tflops=0"],
            "cluster.peak_tflops=0 in the command-line overrides: input should be greater than 0",
        ),
        (["train.offload_optimizer=true"], "needs train.zero_stage 1, 2 or 3"),
        (["name=a b"], "name='a b' must be letters"),
        (["train.lr"], "not of the form section.key=value"),
        (["data.sources=[]"], "data.sources is empty"),
        (["data.sources=[{path: a, weight: 0}]"], "data.sources.0.weight=0"),
        (["data.sources=[{path: a}]"], "data.sources.0.weight"),
        (["data.path=x", "data.sources=[{path: a, weight: 1}]"], "set data.path or data.sources, not both"),
        (["data.on_error=ignore"], "data.on_error='ignore' is not allowed"),
    ],
)
def test_impossible_values(tmp_path, overrides, fragment):
    assert fragment in _err(tmp_path, None, overrides)


def test_mixed_sources_paths_are_absolute(tmp_path):
    from launcher.config import load_config

    cfg = load_config(
        None, ["data.sources=[{path: web, weight: 3}, {path: stdlib, weight: 1}]"], base_dir=str(tmp_path)
    )
    assert [(s.path, s.weight) for s in cfg.data.sources] == [(str(tmp_path / "web"), 3.0), ("stdlib", 1.0)]


def test_deepspeed_config_per_stage_and_precision():
    for stage in (0, 1, 2, 3):
        for precision in ("fp32", "bf16"):
            cfg = load_config(
                None,
                [
                    f"train.zero_stage={stage}",
                    f"train.precision={precision}",
                    "train.global_batch_size=32",
                    "train.micro_batch_size=4",
                    "cluster.num_workers=2",
                ],
            )
            ds = deepspeed_config(cfg)
            assert ds["zero_optimization"]["stage"] == stage
            assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
            assert ds["train_micro_batch_size_per_gpu"] == 4
            assert ds["bf16"]["enabled"] is (precision == "bf16")
            assert ds["fp16"]["enabled"] is False
            # fp32 accumulation under bf16 lives under data_types (a top-level key is ignored).
            assert ds.get("data_types") == ({"grad_accum_dtype": "fp32"} if precision == "bf16" else None)
            assert "grad_accum_dtype" not in ds
    off = deepspeed_config(load_config(None, ["train.zero_stage=2", "train.offload_optimizer=true"]))
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    fp16 = deepspeed_config(load_config(None, ["train.precision=fp16", "cluster.use_gpu=true"]))
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    ds = deepspeed_config(load_config(None, ["train.grad_clip=0.5", "train.lr=0.002", "train.beta2=0.99"]))
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 0.002, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True},
    }  # CPU: resumes bit for bit


def test_lr_schedule_warmup_then_cosine():
    cfg = load_config(None, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=100", "train.max_steps=2000"])
    lr = [lr_factor(s, cfg) * 1e-3 for s in range(2100)]
    assert lr[0] == pytest.approx(1e-3 / 101) and lr[99] == pytest.approx(1e-3 * 100 / 101)
    assert lr[100] == pytest.approx(1e-3)
    assert lr[1050] == pytest.approx(5.5e-4)  # half way down the cosine
    assert lr[2000] == pytest.approx(1e-4) and lr[2099] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lr[100:], lr[101:]))


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _main(argv: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """`trainctl ARGV` in this process, in `cwd`: its exit status (main's return, or the
    SystemExit of an argparse error) and what it wrote to stderr."""
    from launcher.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "missing.yaml"], "config file missing.yaml not found"),
        (["run", "CFG", "train.lrr=1"], "did you mean 'train.lr'"),
        (["run", "CFG", "--address", "local", "train.lrr=1"], "unknown key 'train.lrr' in the command-line overrides"),
        (["run", "CFG", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "CFG", "cluster.num_workers=0"], "cluster.num_workers=0"),
        (["run", "CFG", "tracking.mode=foo"], "tracking.mode='foo'"),
        (["run", "CFG", "data.path=nothing/*.txt"], "matches no files"),
        (["run", "CFG", "data.path=empty.txt"], "no text"),
        (["run", "CFG", "model.vocab_size=100"], "tokenizer has 257 tokens but model.vocab_size=100"),
        (["run", "CFG", "data.lanes=0"], "data.lanes=0"),
        (["generate", "nowhere"], "no complete checkpoint in nowhere"),
        # the job file itself
        (["run", "empty.yaml"], "empty.yaml is empty (or holds only comments): write the job's sections"),
        (["run", "comments.yaml"], "comments.yaml is empty (or holds only comments)"),
        (["run", "dup.yaml"], "dup.yaml: key 'name' is given twice, at line 1 and line 3: keep one"),
        (["run", "dup-nested.yaml"], "key 'train.lr' is given twice, at line 3 and line 5"),
        (
            ["run", "CFG", "data.sources=[{path: a, weight: 1, path: b}]"],
            "key 'data.sources.0.path' is given twice: keep one",
        ),
        (["run", "."], "config file . is a folder: give the path to a YAML job file"),
        (["run", "list.yaml"], "list.yaml: a job file is a mapping of sections"),
        (["run", "binary.yaml"], "binary.yaml is not a YAML job file: byte 1 is not UTF-8 text"),
        # data.path that is not data
        (["run", "CFG", "data.path=junk.tar"], "junk.tar is not a tar file (its first 512 bytes are no tar header)"),
        (["run", "CFG", "data.path=x.tar"], "x.tar is not a tar file (6 bytes, less than one 512-byte tar header)"),
        (["run", "CFG", "data.path=junk.bin"], "junk.bin is binary, not text (byte "),
        (
            ["run", "CFG", "data.path=junkdir"],
            "junkdir/a.tar is not a tar file (its first 512 bytes are no tar header)",
        ),
        (["run", "CFG", "data.path=emptydir"], "emptydir' holds no files (hidden ones are not read)"),
        (["run", "CFG", "data.path="], "data.path is empty: give a path"),
        (["run", "CFG", "data.cache_dir=text.txt"], "data.cache_dir " + "{tmp}/text.txt is a file"),
        (["run", "CFG", "name=../x"], "name='../x' must be letters"),
        (["run", "CFG", "name=/tmp/x"], "name='/tmp/x' must be letters"),
        (["run", "CFG", "name=a/b"], "name='a/b' must be letters"),
        (["run", "CFG", "name=.."], "name='..' must be letters"),
        (["run", "CFG", 'name="x\\n"'], "name='x\\n' must be letters"),  # a whole-name match: no trailing newline
        # an error naming a URL shows it without its credentials
        (
            ["run", "CFG", "data.path=foo://me:S3CR3T@h/d"],
            "trainctl: error: cannot open foo://me:***@h/d/manifest.json: Protocol not known: foo",
        ),
        (["run", "CFG", "cluster.cpus_per_worker=0.03125"], "Ray counts CPUs in steps of 0.0001"),
        # dashboards
        (["run", "CFG", "tracking.backends=[wandb,tensorboard,wandb]"], "names a dashboard twice: name each once"),
        (["run", "CFG", "tracking.backends=[neptune]"], "tracking.backends.0='neptune' is not allowed"),
        (["run", "CFG", "tracking.backends=tensorboard"], "tracking.backends='tensorboard'"),
        (["run", "CFG", "tracking.start_timeout_s=0"], "tracking.start_timeout_s=0"),
        # in-training evals: the task files are read before anything starts
        (["run", "CFG", "train.evals=[{path: bad.jsonl}]"], "train.evals: bad.jsonl line 1 has no gold"),
        (["run", "CFG", "train.evals=[{path: missing.jsonl}]"], "train.evals: task file missing.jsonl does not exist"),
        (["run", "CFG", "train.evals=[{path: bad.jsonl}, {path: x/bad.jsonl}]"], "train.evals names 'bad' twice"),
        (["run", "CFG", "train.evals=[{path: bad.jsonl, every: 0}]"], "train.evals.0.every=0"),
        (
            ["run", "CFG", "train.evals=[{path: ok.jsonl, chat: true}]"],
            "train.evals: ok has chat: true but the dataset's tokenizer (byte) has no chat template: set chat: false",
        ),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, args, fragment):
    (tmp_path / "job.yaml").write_text(
        "name: bad\ndata:\n  path: text.txt\n  seq_len: 16\nmodel:\n  max_seq_len: 16\n"
        "train:\n  micro_batch_size: 2\ncluster:\n  num_workers: 1\n"
    )
    (tmp_path / "text.txt").write_text("hello world, " * 400)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"query": "Q?", "choices": ["a", "b"]}\n')
    (tmp_path / "ok.jsonl").write_text('{"query": "Q?", "choices": ["a", "b"], "gold": 0}\n')
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# a job, one day\n\n  # nothing yet\n")
    (tmp_path / "dup.yaml").write_text("name: a\ndata: {path: text.txt}\nname: b\n")
    (tmp_path / "dup-nested.yaml").write_text("name: a\ntrain:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.2\n")
    (tmp_path / "list.yaml").write_text("- name: a\n- name: b\n")
    (tmp_path / "binary.yaml").write_bytes(b"\x00\xfe\xff" + bytes(range(256)))
    junk = random.Random(0).randbytes(4096)  # as `head -c 4096 /dev/urandom`
    (tmp_path / "junk.tar").write_bytes(junk)
    (tmp_path / "junk.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + junk)
    (tmp_path / "x.tar").write_text("hello\n")
    (tmp_path / "junkdir").mkdir()
    (tmp_path / "junkdir" / "a.tar").write_bytes(junk)
    (tmp_path / "emptydir").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    fragment = fragment.replace("{tmp}", str(tmp_path))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    argv = [str(tmp_path / "job.yaml") if a == "CFG" else a for a in args]
    if "model.vocab_size=100" in args:  # one case as the real command (the one that prepares data): its exit
        r = _cli(*argv, cwd=tmp_path)  # status and whole stderr, import-time output included
        code, err = r.returncode, r.stderr
    else:  # the rest in this process (as tests/test_sweep.py's bad grids): the same main(), exit status and stderr
        code, err = _main(argv, tmp_path, monkeypatch, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainctl: error: ") and fragment in lines[0], err
    assert "Traceback" not in err
    after = sorted(p.name for p in tmp_path.rglob("*"))
    if not {"model.vocab_size=100", "train.evals=[{path: ok.jsonl, chat: true}]"} & set(args):
        assert after == before  # those two need the prepared data: its vocabulary, its chat template
    assert not (tmp_path / "runs").exists()


def test_the_gpu_fast_path_overlaps_communication_and_uses_the_fused_adam():
    gpu = deepspeed_config(load_config(REPO / "configs/gpt2-124m.yaml", []))
    assert gpu["bf16"]["enabled"] and gpu["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's fused Adam
    z = gpu["zero_optimization"]
    assert (z["stage"], z["overlap_comm"], z["contiguous_gradients"], z["reduce_bucket_size"]) == (
        2,
        True,
        True,
        200_000_000,
    )
    z3 = deepspeed_config(load_config(REPO / "configs/llama-7b.yaml", []))["zero_optimization"]
    assert z3["stage"] == 3 and z3["offload_optimizer"] == {"device": "cpu", "pin_memory": True} and z3["overlap_comm"]
    cpu = deepspeed_config(load_config(None, ["train.zero_stage=2"]))["zero_optimization"]
    assert cpu == {"stage": 2}  # gloo on a CPU: DeepSpeed's defaults, no overlap stream to use


def test_a_local_job_wider_than_the_machine_is_refused_before_ray():
    """cluster.address local sizes a private Ray to num_workers x cpus_per_worker CPUs: more
    than the cores here is refused, naming how to oversubscribe on purpose (Ray's CPUs are
    fixed-point in 0.0001 steps, so the suggestion is rounded down to fit)."""
    from launcher.job import UsageError, check_local_cores

    def check(*overrides, cores=2):
        check_local_cores(load_config(None, list(overrides)).cluster, cores=cores)

    with pytest.raises(UsageError) as e:
        check("cluster.num_workers=64")
    assert str(e.value) == (
        "cluster.num_workers=64 needs 64 CPUs but this machine has 2 cores: lower cluster.num_workers, or "
        "oversubscribe on purpose with cluster.cpus_per_worker=0.0312"
    )
    check("cluster.num_workers=64", "cluster.cpus_per_worker=0.0312")  # on purpose: 1.9968 CPUs
    check("cluster.num_workers=3", "cluster.cpus_per_worker=0.6666")
    check("cluster.num_workers=2")
    check("cluster.num_workers=64", "cluster.address=auto")  # a joined cluster: Ray's placement check
    with pytest.raises(
        UsageError,
        match=r"^cluster.num_workers=1 x cluster.cpus_per_worker=8 needs 8 CPUs but this "
        r"machine has 2 cores: lower cluster.cpus_per_worker to 2$",
    ):
        check("cluster.num_workers=1", "cluster.cpus_per_worker=8")
    with pytest.raises(UsageError, match=r"needs 30000 CPUs .* 2 cores: lower cluster.num_workers to at most 20000$"):
        check("cluster.num_workers=30000")  # not even Ray's smallest share each
    assert load_config(None, ["cluster.cpus_per_worker=0.25"]).cluster.cpus_per_worker == 0.25
    assert "cluster.cpus_per_worker=0.03125: Ray counts CPUs in steps of 0.0001" in _err(
        Path("."), None, ["cluster.cpus_per_worker=0.03125"]
    )


def test_cli_refuses_more_workers_than_cores_before_ray(tmp_path):
    from launcher.job import available_cores

    cores = available_cores()
    (tmp_path / "job.yaml").write_text("name: wide\ndata:\n  path: text.txt\n")
    (tmp_path / "text.txt").write_text("hello world, " * 400)
    r = _cli("run", "job.yaml", f"cluster.num_workers={cores + 1}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith(
        f"trainctl: error: cluster.num_workers={cores + 1} needs {cores + 1} CPUs but this machine has {cores} cores: "
    ), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Ray" not in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "text.txt"]  # no run folder, no prepared data


def test_a_dashboard_whose_library_is_missing_or_whose_server_does_not_answer_is_refused_before_anything_starts(
    tmp_path, monkeypatch, capsys
):
    """tracking.backends names one whose library this machine lacks (its module made
    unfindable here): one line naming the package to install, exit 2, nothing written."""
    from trainer import dashboards

    (tmp_path / "job.yaml").write_text("name: dash\ndata:\n  path: text.txt\n")
    monkeypatch.setitem(dashboards.LIBRARIES, "mlflow", (("mlflow", "no_such_module_here"), "mlflow"))
    code, err = _main(["run", "job.yaml", "tracking.backends=[wandb,mlflow]"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.strip() == (
        "trainctl: error: tracking.backends has mlflow but the mlflow package is not installed: `pip install mlflow` "
        "or take mlflow out of tracking.backends"
    ), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]
    # MLflow on a server needs no database library here; a server that does not answer is
    # refused the same way (a real port on 127.0.0.1 that nothing listens on)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    code, err = _main(
        ["run", "job.yaml", "tracking.backends=[mlflow]", f"tracking.mlflow_uri={uri}"], tmp_path, monkeypatch, capsys
    )
    assert code == 2 and err.strip() == (
        f"trainctl: error: tracking.mlflow_uri {uri} does not answer ([Errno 111] Connection refused): start the "
        "MLflow server or correct the URI"
    ), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]
