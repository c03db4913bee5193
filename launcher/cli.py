"""The `trainctl` command line: one `_cmd_*` function per local command (the cluster's are in
launcher/cluster_commands.py, the grammar in launcher/parser.py), and `main`, which turns
every user mistake into one line and exit 2.

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
from launcher import cluster_commands
from launcher.exits import FAILED, PREEMPTED, USAGE_ERROR
from launcher.job import UsageError, prepare_job
from launcher.parser import build_parser as command_parser
from trainer.config import redact_text


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
    from trainer.faults import from_environment
    from trainer.loop import train_worker
    from trainer.run_folder import RunFolder, rewind

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
    run, rank0 = RunFolder.of(cfg), int(os.environ.get("RANK", "0")) == 0  # the run folder, made once, handed down
    if args.fresh:
        run.start_over(args.force, delete=False)
    newer = prepare_job(cfg, run, fresh=args.fresh, force=args.force, ray=not args.no_ray)
    if rank0:
        if args.fresh:
            run.start_over(args.force, delete=True)
        if newer:
            rewind(run.store, Path(cfg.checkpoint.resume_from), newer)
        run.launched()
    # Fault injection for the divergence tests, read here at the edge: the loop only calls its step function.
    faults = from_environment(os.environ)
    worker = partial(train_worker, step_fn=faults) if faults else train_worker
    print(
        f"trainctl: run '{cfg.name}' in {run.path}: {cfg.cluster.num_workers} workers, global batch "
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
            status = worker(cfg.model_dump(mode="json"), run)
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

        status = run_supervised(cfg, run, worker, args.verbose)
        if isinstance(status, int):
            return status
    if status == "preempted":
        print(
            f"trainctl: preempted: the run stopped at a checkpoint in {run.url or run.store.root}; run the same command "
            "to resume",
            file=sys.stderr,
        )
        return PREEMPTED
    if cfg.train.sample_tokens:
        from trainer.generate import sample

        print(
            "trainctl: sample from the final checkpoint:\n" + sample(run.path, max_new_tokens=cfg.train.sample_tokens)
        )
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
    from trainer.run_folder import RunFolder

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
    run_folder = RunFolder.of(cfg)
    prepare_job(cfg, run_folder, fresh=True, ray=False)
    result = run(cfg, depths, widths, args.steps, args.seeds)
    print(table(result))
    data, picture = write(result, run_folder.path)
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


COMMANDS = {
    "prepare": _cmd_prepare,
    "run": _cmd_run,
    "plan": _cmd_plan,
    "submit": cluster_commands.cmd_submit,
    "status": cluster_commands.cmd_status,
    "list": cluster_commands.cmd_list,
    "logs": cluster_commands.cmd_logs,
    "stop": cluster_commands.cmd_stop,
    "cluster_check": cluster_commands.cmd_cluster_check,
    "coordcheck": _cmd_coordcheck,
    "sweep": _cmd_sweep,
    "export": _cmd_export,
    "generate": _cmd_generate,
    "eval": _cmd_eval,
}


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (launcher/parser.py), each command's function from COMMANDS."""
    return command_parser(COMMANDS)


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
