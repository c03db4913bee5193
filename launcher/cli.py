"""The `trainctl` command line: one `_cmd_*` function per command, the parser, and `main`,
which turns every user mistake into one line and exit 2.

Every user mistake (bad config, missing data, a vocabulary that does not fit) ends as one
line on stderr and exit status 2, before anything is written; a failed training run
exits 1 with the worker's own error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

from data_pipeline import DataError
from launcher.job import UsageError, prepare_job
from trainer.config import redact_text

USAGE_ERROR, FAILED = 2, 1
PREEMPTED = 143  # 128 + SIGTERM: stopped on request, resumable


def _cmd_prepare(args: argparse.Namespace) -> int:
    from data_pipeline import prepare, summarize

    map_fn = None
    if args.address is not None:  # tokenize as Ray tasks on that cluster
        from cluster.local_ray import ray_mapper

        map_fn = ray_mapper(args.address)
    manifest = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        shard_size_bytes=int(args.shard_size_mb * 2**20),
        chunk_bytes=int(args.chunk_mb * 2**20),
        overwrite=args.overwrite,
        progress=True,
        text_field=args.text_field,
        workers=args.workers,
        map_fn=map_fn,
        on_error=args.on_error,
        format=args.format,
        seq_len=args.seq_len,
    )
    print(summarize(manifest))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from launcher.config import load_config
    from trainer.loop import train_worker
    from trainer.run_folder import checkpoint_store, launched, rewind, run_dir, start_over

    cfg = load_config(args.config, args.overrides)
    if args.address:
        cfg.cluster.address = args.address
    if args.fresh and args.resume:
        raise UsageError("--fresh and --resume contradict each other: give one")
    if args.force and not (args.fresh or args.resume):
        raise UsageError("--force only goes with --fresh or --resume")
    if args.resume:
        cfg.checkpoint.resume_from = args.resume
    from trainer.dashboards import missing_library, mlflow_server_problem

    for backend in cfg.tracking.backends:  # a dashboard that cannot start: refused before anything starts
        if package := missing_library(backend, cfg.tracking.mlflow_uri):
            raise UsageError(
                f"tracking.backends has {backend} but the {package} package is not installed: `pip install {package}` "
                f"or take {backend} out of tracking.backends"
            )
    if "mlflow" in cfg.tracking.backends and (problem := mlflow_server_problem(cfg.tracking.mlflow_uri)):
        raise UsageError(redact_text(problem))
    from trainer.evals import TaskError, load_task

    for spec in cfg.train.evals:  # each task file read once here: a bad one never reaches the workers
        try:
            load_task(spec.path, spec.limit, spec.chat)
        except TaskError as e:
            raise UsageError(f"train.evals: {e}") from None
    if not args.no_ray:  # a cluster address nothing answers on: refused before anything is written
        from cluster.local_ray import check_reachable

        check_reachable(cfg.cluster.address)
    if args.verbose:
        cfg.tracking.verbose = True
    if args.no_ray:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, when it started the ranks
        if cfg.cluster.num_workers != world:
            how = "" if "WORLD_SIZE" in os.environ else " (or start the ranks with torchrun)"
            raise UsageError(
                f"--no-ray runs {world} process{'es' * (world > 1)} but cluster.num_workers="
                f"{cfg.cluster.num_workers}: set cluster.num_workers={world}{how}"
            )
    if args.profile:
        from trainer.config import PROFILE_HELP

        try:
            cfg.train.profile = args.profile  # validated on assignment
        except ValueError:
            raise UsageError(f"--profile {args.profile}: {PROFILE_HELP}") from None
    folder, store, rank0 = run_dir(cfg), checkpoint_store(cfg), int(os.environ.get("RANK", "0")) == 0
    if args.fresh:
        start_over(folder, store, args.force, delete=False)
    newer = prepare_job(cfg, fresh=args.fresh, force=args.force, ray=not args.no_ray)
    if rank0:
        if args.fresh:
            start_over(folder, store, args.force, delete=True)
        if newer:
            rewind(store, Path(cfg.checkpoint.resume_from), newer)
        launched(folder)
    # Fault injection for the divergence tests, read here at the edge and handed to the workers.
    worker = partial(
        train_worker,
        nan_at_step=int(os.environ.get("TRAINCTL_TEST_NAN_AT_STEP", "0")),
        spike_at_step=int(os.environ.get("TRAINCTL_TEST_SPIKE_AT_STEP", "0")),
    )
    print(
        f"trainctl: run '{cfg.name}' in {folder}: {cfg.cluster.num_workers} workers, global batch "
        f"{cfg.global_batch} x {cfg.data.seq_len} tokens, data "
        + (
            ", ".join(f"{redact_text(s.path)} (weight {s.weight:g})" for s in cfg.data.sources)
            if cfg.data.sources
            else redact_text(cfg.data.path)
        ),
        flush=True,
    )
    if args.no_ray:
        from cluster.restarts import recurring_status

        try:
            status = worker(cfg.model_dump(mode="json"))
        except Exception as e:  # noqa: BLE001 - as under Ray: the traceback, then our one line last
            if recurring_status(e) == 2:  # a full disk, bad data: the user's to fix, no traceback
                print(f"trainctl: error: {redact_text(' '.join(str(e).split()))}", file=sys.stderr)
                return 2
            import traceback

            print(redact_text(traceback.format_exc()), end="", file=sys.stderr)  # a URL's password never shown
            print(f"trainctl: training failed: {type(e).__name__}: {redact_text(str(e))}", file=sys.stderr)
            return FAILED
        if int(os.environ.get("RANK", "0")) != 0:
            return PREEMPTED if status == "preempted" else 0
    else:
        from launcher.supervise import run_supervised

        status = run_supervised(cfg, worker, args.verbose)
        if isinstance(status, int):
            return status
    if status == "preempted":
        print(
            f"trainctl: preempted: the run stopped at a checkpoint in {store.url or store.root}; run the same command "
            "to resume",
            file=sys.stderr,
        )
        return PREEMPTED
    if cfg.train.sample_tokens:
        from trainer.generate import sample

        print("trainctl: sample from the final checkpoint:\n" + sample(folder, max_new_tokens=cfg.train.sample_tokens))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    """Validate the job here, then hand it to the cluster's Jobs API with the working directory."""
    from urllib.parse import urlparse

    from cluster.jobs import cluster_data_overrides, dashboard_address, local_data_outside, submit
    from launcher.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config never reaches the cluster
    address = dashboard_address(args.address, cfg.cluster.address)
    workdir = Path.cwd()
    config_path = Path(args.config).resolve()
    if not config_path.is_relative_to(workdir):
        raise UsageError(
            f"{args.config} is outside the working directory {workdir}, which is what gets uploaded: "
            "run submit from a folder that holds the config"
        )
    if not args.shared_data and (problem := local_data_outside(cfg, workdir)):
        raise UsageError(problem)  # a job that would not find its data never reaches the cluster
    # on the cluster: the data where it is there, and the job's own Ray
    overrides = [*args.overrides, *cluster_data_overrides(cfg, workdir), "cluster.address=auto"]
    if (os.environ.get("WANDB_MODE") or cfg.tracking.mode) == "online" and not os.environ.get("WANDB_API_KEY"):
        print(
            "trainctl: warning: tracking.mode is online but WANDB_API_KEY is not set in this shell: the job logs to W&B "
            "offline (`wandb sync` its run folder later)",
            file=sys.stderr,
        )
        overrides.append("tracking.mode=offline")
    url = urlparse(address)
    if (
        url.scheme == "http"
        and url.hostname not in ("127.0.0.1", "localhost", "::1")
        and os.environ.get("RAY_AUTH_MODE") != "token"
    ):
        print(
            f"trainctl: warning: {address} is a remote cluster over plain HTTP without token authentication: anyone who "
            "reaches it can run code there (set RAY_AUTH_MODE=token on the cluster and here)",
            file=sys.stderr,
        )
    if "://" not in cfg.checkpoint.storage_path and Path(cfg.checkpoint.storage_path).is_relative_to(workdir):
        print(
            "trainctl: warning: checkpoint.storage_path is inside the uploaded folder: on the cluster it is the job's "
            "temporary copy; give a shared path or an object-store URL to keep the checkpoints",
            file=sys.stderr,
        )
    job = submit(
        address, workdir, str(config_path.relative_to(workdir)), overrides, cfg.name, cfg.checkpoint.preempt_grace_s
    )
    print(
        f"trainctl: submitted job {job.job_id} (run '{cfg.name}') to {address}\n"
        f"  dashboard: {job.dashboard}\n"
        f"  follow it: trainctl logs {job.job_id} --address {address} --follow"
    )
    print(job.job_id)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from cluster.jobs import dashboard_address, status

    state, message = status(dashboard_address(args.address, None), args.job_id)
    print(f"{args.job_id}: {state}" + (f" ({message})" if message else ""))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from cluster.jobs import dashboard_address, list_jobs

    rows = list_jobs(dashboard_address(args.address, None))
    print(f"{'JOB':<28} {'STATUS':<10} {'RUN':<20} STARTED")
    for job_id, state, name, started in rows:
        print(f"{job_id:<28} {state:<10} {name:<20} {started}")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from cluster.jobs import dashboard_address, logs

    final = logs(dashboard_address(args.address, None), args.job_id, args.follow)
    if final:
        print(f"trainctl: job {args.job_id} ended: {final}", file=sys.stderr)
        return 0 if final == "SUCCEEDED" else FAILED
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from cluster.jobs import dashboard_address, stop

    print(f"{args.job_id}: {stop(dashboard_address(args.address, None), args.job_id)}")
    return 0


def _cmd_cluster_check(args: argparse.Namespace) -> int:
    from cluster.check import allreduce, nodes_and_storage, render
    from cluster.ray_job import NotPlaceable, connect, shutdown
    from launcher.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():  # only overrides were given
        config, overrides = None, [config, *overrides]
    cfg = load_config(config, overrides)
    if args.address:
        cfg.cluster.address = args.address
    if "://" in cfg.cluster.address and not cfg.cluster.address.startswith("ray://"):
        raise UsageError(
            f"cluster check needs the cluster's Ray address (HEAD:6379, auto or ray://HEAD:10001), or local for "
            f"this machine, not {cfg.cluster.address!r}: it runs a small job from here"
        )
    conn = connect(cfg.cluster, worker_logs=False, verbose=cfg.tracking.verbose)
    try:
        nodes = nodes_and_storage(cfg.checkpoint.storage_path)
        try:
            net = allreduce(cfg)
        except NotPlaceable as e:
            raise UsageError(str(e)) from None
    finally:
        shutdown(conn)
    print(render(nodes, cfg.checkpoint.storage_path, net, cfg))
    bad = [n.node_id for n in nodes if n.storage != "ok"]
    if bad or not net["correct"]:
        print(
            "trainctl: cluster check failed: "
            + ("storage not writable from " + ", ".join(bad) if bad else "the all-reduce gave a wrong result"),
            file=sys.stderr,
        )
        return FAILED
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from launcher.config import load_config
    from launcher.plan import make_plan, render

    cfg = load_config(args.config, args.overrides, model_folder_optional=True)
    for flag, value in (
        ("--mfu", args.mfu),
        ("--peak-tflops", args.peak_tflops),
        ("--gpu-memory-gb", args.gpu_memory_gb),
    ):
        if value is not None and not value > 0 or flag == "--mfu" and value > 1:
            raise UsageError(
                f"{flag} {value:g} is out of range: give a positive number" + (" up to 1" if flag == "--mfu" else "")
            )
    print(render(cfg, make_plan(cfg, args.mfu, args.peak_tflops, args.gpu_memory_gb), args.mfu))
    return 0


def _int_list(flag: str, text: str | None) -> list[int] | None:
    """'2,4,8' -> [2, 4, 8]; one line naming the flag when it is not a list of positive integers."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise UsageError(f"{flag} {text}: give distinct positive integers separated by commas, e.g. {flag} 2,4,8,16")
    return values


def _cmd_coordcheck(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from launcher.config import load_config
    from trainer.coordcheck import DEFAULT_DEPTHS, run, shapes_of, table, write
    from trainer.run_folder import run_dir

    cfg = load_config(args.config, args.overrides)
    depths, widths = _int_list("--depths", args.depths), _int_list("--widths", args.widths)
    if depths and widths:
        raise UsageError("--depths and --widths: give one (a coordinate check varies one dimension)")
    if not widths:
        depths = depths or list(DEFAULT_DEPTHS)
    if len(depths or widths) < 2:
        raise UsageError("a coordinate check compares at least 2 shapes: give 2 or more values")
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: give at least 1")
    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds}: give at least 1 (initialisations averaged per shape)")
    try:
        shapes_of(cfg.model, depths, widths)  # every shape valid before any data is read
    except ValidationError as e:
        raise UsageError(
            f"{'--depths' if depths else '--widths'}: {e.errors()[0]['msg'].removeprefix('Value error, ')}"
        ) from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    prepare_job(cfg, fresh=True, ray=False)
    result = run(cfg, depths, widths, args.steps, args.seeds)
    print(table(result))
    data, picture = write(result, run_dir(cfg))
    print(f"trainctl: coordcheck curves in {picture} (records: {data})")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from launcher.sweep import run_sweep

    return run_sweep(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import ExportError, export

    try:
        out = export(args.path, args.out_dir, args.lora, args.base)
    except ExportError as e:
        raise UsageError(str(e)) from None
    if (Path(out) / "adapter_config.json").is_file():
        print(f"trainctl: exported {args.path}'s LoRA adapters to {out} (a PEFT adapter folder)")
        return 0
    arch = json.loads((Path(out) / "config.json").read_text())["architectures"][0]
    print(f"trainctl: exported {args.path} to {out} (Hugging Face {arch}, fp32 safetensors)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from trainer.checkpoint import NoCheckpoint
    from trainer.generate import sample

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    try:
        text = sample(
            args.path, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed, args.chat
        )
    except (NoCheckpoint, ValueError) as e:
        raise UsageError(str(e)) from None
    print(text if args.chat else args.prompt + text)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Multiple-choice tasks scored on a run, a checkpoint, an export or a Hugging Face folder."""
    from trainer.checkpoint import NoCheckpoint
    from trainer.evals import TaskError, check_chat, load_task, score
    from trainer.generate import load_any

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit={args.limit} must be at least 1")
    try:
        tasks = [
            load_task(path, args.limit, args.chat) for path in args.task
        ]  # every file checked before a model loads
        model, tok = load_any(args.path)
        for task in tasks:
            check_chat(tok, task, args.path)
    except (TaskError, NoCheckpoint, ValueError) as e:
        raise UsageError(str(e)) from None
    results = [score(model, tok, task, model.config.max_seq_len) for task in tasks]
    if args.json:
        rows = [{"task": r.task, "items": r.items, "acc": r.acc, "acc_norm": r.acc_norm} for r in results]
        print(json.dumps({"model": str(args.path), "tasks": rows}))
        return 0
    print("| task | items | acc | acc_norm |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r.task} | {r.items} | {r.acc:.4f} | {r.acc_norm:.4f} |")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as our one line (and exit 2) instead of usage + error."""

    def error(self, message: str):
        print(f"trainctl: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def _job_arguments(parser: argparse.ArgumentParser, config_help: str, optional: bool = False) -> None:
    """CONFIG and its key=value overrides, as every command that reads a job file takes them."""
    parser.add_argument("config", nargs="?" if optional else None, help=config_help)
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.lr=3e-4 cluster.num_workers=1",
    )


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="trainctl",
        description="Train deep transformers: Ray launches, WebDataset streams, DeepSpeed ZeRO trains, W&B tracks.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pp = sub.add_parser(
        "prepare",
        help="turn text files into WebDataset token shards + manifest.json",
        description="Tokenize text files (paths, folders or globs) into WebDataset tar shards of token arrays, with a manifest.json and a train/val split.",
    )
    pp.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text files, .jsonl / .jsonl.gz / .jsonl.zst / .parquet files, raw-text .tar shards, folders, "
        "quoted globs, or http(s):// / s3:// URLs of such files",
    )
    pp.add_argument(
        "--out",
        required=True,
        help="output folder for the shards and manifest.json: a local path or an "
        "object-store URL (s3://bucket/prefix, any fsspec URL; shards are uploaded as they are written)",
    )
    pp.add_argument(
        "--tokenizer",
        default="byte",
        help="byte (default), bpe:VOCAB_SIZE (trained here on a sample of the inputs), a path to a Hugging Face "
        "tokenizer.json, or a Hugging Face model folder (its tokenizer, end-of-turn token and chat template)",
    )
    pp.add_argument(
        "--format",
        choices=("text", "chat", "prompt-completion"),
        default="text",
        help="text (default): documents; chat: .jsonl/.parquet records with a 'messages' list, trained on the "
        "assistant turns; prompt-completion: records with 'prompt' and 'completion', trained on the completion",
    )
    pp.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="required with --format chat/prompt-completion: the data.seq_len you will train with "
        "(examples are packed into rows of SEQ_LEN+1 tokens, one training sequence each)",
    )
    pp.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="held out for validation: the tail of each plain text file, and that fraction of the other "
        "formats' documents, picked by a hash of their text (default 0.1)",
    )
    pp.add_argument("--shard-size-mb", type=float, default=256, help="target shard size in MB (default 256)")
    pp.add_argument(
        "--chunk-mb",
        type=float,
        default=3.5,
        help="checksummed chunk size in MB: what a rank reads with one request (default 3.5)",
    )
    pp.add_argument(
        "--text-field",
        default="text",
        help="the field holding the text in .jsonl lines, .parquet columns and .json samples of .tar inputs",
    )
    pp.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="bad input (a corrupt .gz/.zst, a parquet file without the text column, a line that is not UTF-8 "
        "or JSON or lacks the field): fail (default) names it and stops; skip passes it over and counts it",
    )
    pp.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    pp.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that tokenize files in parallel (default: one per core)",
    )
    pp.add_argument(
        "--address",
        help="tokenize files as Ray tasks on this cluster (auto, HOST:PORT, ray://..., or local); "
        "its nodes must see the input paths",
    )
    pp.set_defaults(fn=_cmd_prepare)

    pr = sub.add_parser(
        "run",
        help="train: a YAML job file plus key=value overrides",
        description="Run a job: defaults, then CONFIG, then section.key=value overrides (e.g. train.max_steps=100). "
        "Resumes from the run's latest checkpoint if there is one.",
    )
    _job_arguments(pr, "YAML job file (see configs/)")
    pr.add_argument(
        "--address",
        help="Ray cluster: local (default: a private Ray here), auto, or HOST:PORT; overrides cluster.address",
    )
    pr.add_argument(
        "--no-ray", action="store_true", help="run the worker in this process (alone, or one rank under torchrun)"
    )
    pr.add_argument(
        "--resume",
        metavar="PATH",
        help="resume from this checkpoint (or run folder's latest) instead of the run's own latest",
    )
    pr.add_argument(
        "--fresh",
        action="store_true",
        help="start over, ignoring the run's checkpoints (refused if the run folder holds a run, unless --force)",
    )
    pr.add_argument(
        "--force",
        action="store_true",
        help="with --fresh: delete the run folder's checkpoints, metrics and W&B "
        "run id first; with --resume of an earlier checkpoint of the same run: delete the newer ones",
    )
    pr.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, DeepSpeed's and the workers' own output on the "
        "console (by default it goes to RUN_FOLDER/workers.log)",
    )
    pr.add_argument(
        "--profile",
        metavar="STEPS",
        help="write a torch profiler trace of these steps into the run folder: "
        "N (the N steps after a 5-step warm-up) or FIRST-LAST (e.g. 20-22)",
    )
    pr.set_defaults(fn=_cmd_run)

    pl = sub.add_parser(
        "plan",
        help="parameters, FLOPs, memory per ZeRO stage and time per step of a job, before launch",
        description="Estimate a job from its config alone: parameters, FLOPs per token, tokens per step, "
        "memory per worker under each ZeRO stage with and without optimizer offload (and the "
        "smallest that fits cluster.gpu_memory_gb), time per step and per run at a stated MFU.",
    )
    _job_arguments(pl, "YAML job file")
    pl.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    pl.add_argument(
        "--peak-tflops", type=float, help="peak TFLOP/s per GPU (default cluster.peak_tflops, else an H100's 989)"
    )
    pl.add_argument("--gpu-memory-gb", type=float, help="memory per GPU (default cluster.gpu_memory_gb)")
    pl.set_defaults(fn=_cmd_plan)

    ps = sub.add_parser(
        "submit",
        help="run a job on a remote Ray cluster through its Jobs API",
        description="Validate CONFIG here, upload the working directory (without .git, data, venvs, runs, "
        "wandb folders) and run `trainctl run CONFIG` on the cluster. WANDB_API_KEY and other "
        "credentials go along as the job's environment variables, never into files.",
    )
    _job_arguments(ps, "YAML job file inside the working directory")
    jobs_address = "the Ray dashboard, http://HEAD:8265 (default: RAY_ADDRESS)"
    ps.add_argument("--address", help=jobs_address + " or the config's cluster.address")
    ps.add_argument(
        "--shared-data",
        action="store_true",
        help="the job's local data paths outside what is uploaded "
        "(data.path, data.sources) are on storage every node mounts at the same path: submit them as they "
        "are (without it, submit refuses them)",
    )
    ps.set_defaults(fn=_cmd_submit)
    for name, fn, text in (
        ("status", _cmd_status, "a job's status"),
        ("logs", _cmd_logs, "a job's logs"),
        ("stop", _cmd_stop, "stop a job (it saves a checkpoint at the next step if it can)"),
    ):
        pj = sub.add_parser(
            name, help=text, description=text[0].upper() + text[1:] + ", through the cluster's Jobs API."
        )
        pj.add_argument("job_id", metavar="JOB_ID")
        pj.add_argument("--address", help=jobs_address)
        if name == "logs":
            pj.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        pj.set_defaults(fn=fn)
    plist = sub.add_parser("list", help="the jobs on a cluster", description="Every job on the cluster, oldest first.")
    plist.add_argument("--address", help=jobs_address)
    plist.set_defaults(fn=_cmd_list)

    pc = sub.add_parser("cluster", help="check a Ray cluster before a long job", description="Cluster tools.")
    pcs = pc.add_subparsers(dest="cluster_command", required=True, metavar="SUBCOMMAND")
    pcc = pcs.add_parser(
        "check",
        help="nodes, storage from every node, all-reduce bandwidth",
        description="Alive nodes (CPUs, GPUs, memory); whether checkpoint.storage_path is writable from "
        "every node; a short all-reduce over the job's workers with its bus bandwidth, the workers started as the "
        "job's would be (Ray Train on a joined cluster; with cluster.address local, a private Ray's worker actors "
        "on this machine).",
    )
    _job_arguments(pcc, "YAML job file (its cluster and checkpoint sections); default: the defaults", optional=True)
    pcc.add_argument(
        "--address", help="the cluster's Ray address (HEAD:6379, auto), or local; overrides cluster.address"
    )
    pcc.set_defaults(fn=_cmd_cluster_check)

    pco = sub.add_parser(
        "coordcheck",
        help="train each depth (or width) a few steps and compare activation sizes: is the parametrization right?",
        description="The coordinate check: the job's model at each depth (or width), same seed, same batches, a few "
        "AdamW steps at a constant train.lr with the job's per-group settings; prints the RMS of the residual stream, "
        "branch outputs, attention and output logits and the slope against depth, and writes "
        "RUN_FOLDER/coordcheck-PARAMETRIZATION-AXIS.png and .json.",
    )
    _job_arguments(pco, "YAML job file (its model, data and train sections)")
    pco.add_argument("--depths", help="n_layer values, e.g. 2,4,8,16,32,64 (the default)")
    pco.add_argument("--widths", help="d_model values instead, e.g. 64,128,256 (heads keep the job's head_dim)")
    pco.add_argument("--steps", type=int, default=5, help="optimizer steps per shape (default 5)")
    pco.add_argument(
        "--seeds", type=int, default=1, help="initialisations per shape, each figure their mean (default 1)"
    )
    pco.set_defaults(fn=_cmd_coordcheck)

    psw = sub.add_parser(
        "sweep",
        help="a grid of jobs on Ray Tune: the best learning rate (or anything) per group, with a table and a plot",
        description="Every combination of the --grid values is a trial: the job with those overrides, in its own run "
        "folder SWEEP/trials/NAME/. Trials run on Ray Tune inside one Ray (a private local one, or --address's "
        "cluster), each trial's workers in its placement group. Results in SWEEP/ (results.csv, results.json, "
        "val_loss.png). Run the same command again to continue a killed sweep.",
    )
    _job_arguments(psw, "YAML job file")
    psw.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a key and its values (as key=value overrides take them), e.g. --grid train.lr=1e-3,2e-3,4e-3; "
        "repeat for more keys: the first is the x axis, the others make the groups",
    )
    psw.add_argument("--steps", type=int, help="train.max_steps of every trial")
    psw.add_argument("--parallel", type=int, help="trials at once (default: as many as the cores hold, on a local Ray)")
    psw.add_argument("--early-stop", action="store_true", help="stop poor trials early (Tune's ASHA on val_loss)")
    psw.add_argument("--address", help="Ray cluster: local (default: a private Ray here), auto, or HOST:PORT")
    psw.add_argument("--name", help="the sweep's folder under checkpoint.storage_path (default: NAME-sweep)")
    psw.add_argument("--verbose", action="store_true", help="Ray's and Tune's own output on the console")
    psw.set_defaults(fn=_cmd_sweep)

    pe = sub.add_parser(
        "export",
        help="write a Hugging Face folder from a run or a checkpoint",
        description="Gather a checkpoint's weights tensor by tensor into OUT_DIR: config.json, "
        "model.safetensors and the tokenizer, loadable with transformers' AutoModelForCausalLM "
        "(a run started from model.init_from keeps that model's architecture and tokenizer files).",
    )
    pe.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="run folder (storage_path/NAME) or checkpoint folder")
    pe.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder")
    pe.add_argument(
        "--lora",
        default="merged",
        metavar="merged|adapter",
        help="a LoRA run: merged (default) writes the base with the adapters merged in; adapter writes a "
        "PEFT adapter folder that peft loads onto the base",
    )
    pe.add_argument(
        "--base",
        metavar="PATH",
        help="a LoRA run: the base model's folder or URL, when it is no longer where the run read it "
        "(checked against the sha256 the checkpoint recorded)",
    )
    pe.set_defaults(fn=_cmd_export)

    pg = sub.add_parser(
        "generate",
        help="sample text from a run or a checkpoint (CPU)",
        description="Load a finished run's latest checkpoint (or a given checkpoint folder) and sample text.",
    )
    pg.add_argument(
        "path",
        metavar="RUN_CHECKPOINT_OR_EXPORT",
        help="run folder (storage_path/NAME), checkpoint folder, export folder or Hugging Face model folder",
    )
    pg.add_argument("--prompt", default="\n", help="text to continue")
    pg.add_argument("--max-new-tokens", type=int, default=200)
    pg.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    pg.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens; 0 = all")
    pg.add_argument("--seed", type=int, default=0)
    pg.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user's message: put it through the tokenizer's chat template and print the reply",
    )
    pg.set_defaults(fn=_cmd_generate)

    pe = sub.add_parser(
        "eval",
        help="score multiple-choice tasks (JSONL: query, choices, gold) on a run, checkpoint, export or HF folder",
    )
    pe.add_argument("path", help="a run folder, a checkpoint, an export or a Hugging Face model folder")
    pe.add_argument("--task", action="append", required=True, help="a task file (JSONL); give --task once per task")
    pe.add_argument("--limit", type=int, default=None, help="score the first N items of each task")
    pe.add_argument("--json", action="store_true", help="one JSON object on stdout, for scripts")
    pe.add_argument(
        "--chat",
        action="store_true",
        help="score each choice as the reply to the query sent as a user's message through the tokenizer's chat "
        "template (lm-eval's --apply_chat_template)",
    )
    pe.set_defaults(fn=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    from cluster.jobs import JobsError
    from launcher.config import ConfigError
    from trainer.hf import HFError
    from trainer.run_folder import RunFolderError

    parser = build_parser()
    # Overrides may come after options too (`run CFG --no-ray train.lr=1`), which argparse's
    # positional list does not take: collect the leftover key=value words here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except (ConfigError, DataError, UsageError, JobsError, RunFolderError, HFError) as e:
        print(f"trainctl: error: {redact_text(str(e))}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("trainctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
