"""The `trainctl` command line: prepare data, run a job, sample from it.

Every user mistake (bad config, missing data, a vocabulary that does not fit) ends as one
line on stderr and exit status 2, before anything is written; a failed training run
exits 1 with the worker's own error.
"""

from __future__ import annotations

import argparse
import os
import sys

from data_pipeline import DataError

USAGE_ERROR, FAILED = 2, 1


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit 2."""


def _cmd_prepare(args: argparse.Namespace) -> int:
    from data_pipeline import prepare, summarize

    manifest = prepare(args.inputs, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                       shard_size_bytes=int(args.shard_size_mb * 2**20), overwrite=args.overwrite, progress=True,
                       text_field=args.text_field, workers=args.workers, address=args.address)
    print(summarize(manifest))
    return 0


def prepare_job(cfg) -> None:
    """Make data.path a prepared dataset and check that it fits the model (before any worker starts)."""
    from data_pipeline import open_dataset, resolve_dataset
    from trainer import checkpoint
    from trainer.loop import build_stream, data_paths, raw_options, run_dir

    d = cfg.data
    if d.sources:
        for source in d.sources:
            source.path = resolve_dataset(source.path, d.cache_dir, d.tokenizer, d.val_fraction, d.text_field)
    else:
        d.path = resolve_dataset(d.path, d.cache_dir, d.tokenizer, d.val_fraction, d.text_field)
    tokenizer = open_dataset(data_paths(cfg)[0], raw_options(cfg))["tokenizer"]  # mixed sources must agree (build_stream checks)
    vocab = tokenizer["vocab_size"]
    if vocab > cfg.model.vocab_size:
        raise UsageError(f"the dataset's tokenizer has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}: set model.vocab_size>={vocab}")
    latest = checkpoint.find_latest(run_dir(cfg) / "checkpoints")
    if latest is not None and checkpoint.meta(latest).get("tokenizer") != tokenizer:
        was = checkpoint.meta(latest).get("tokenizer", {})
        raise UsageError(f"run '{cfg.name}' was trained with the {was.get('name')} tokenizer (vocab {was.get('vocab_size')}) "
                         f"but the data uses {tokenizer['name']} (vocab {vocab}): use the run's dataset or another name=")
    # Raises DataError when a split cannot fill one global batch, or mixed sources disagree.
    build_stream(cfg, 0, cfg.cluster.num_workers)


def _cmd_run(args: argparse.Namespace) -> int:
    from launcher.config import load_config
    from trainer.loop import run_dir, train_worker

    cfg = load_config(args.config, args.overrides)
    if args.address:
        cfg.cluster.address = args.address
    prepare_job(cfg)
    folder = run_dir(cfg)
    print(f"trainctl: run '{cfg.name}' in {folder}: {cfg.cluster.num_workers} workers, global batch "
          f"{cfg.global_batch} x {cfg.data.seq_len} tokens, data "
          + (", ".join(f"{s.path} (weight {s.weight:g})" for s in cfg.data.sources) if cfg.data.sources else cfg.data.path),
          flush=True)
    if args.no_ray:
        train_worker(cfg.model_dump(mode="json"))
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    else:
        from cluster.ray_job import JobFailed, connect, run_on_ray, shutdown

        conn, failure = connect(cfg.cluster), None
        try:
            run_on_ray(train_worker, cfg.model_dump(mode="json"), cfg.cluster, cfg.name, cfg.checkpoint.storage_path)
        except JobFailed as e:
            failure = e
        finally:
            shutdown(conn)  # first, so that Ray's forwarded worker logs end before our last line
        if failure is not None:
            print(f"trainctl: training failed: {failure}", file=sys.stderr)
            return FAILED
    if cfg.train.sample_tokens:
        from trainer.generate import sample

        print("trainctl: sample from the final checkpoint:\n" + sample(folder, max_new_tokens=cfg.train.sample_tokens))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from trainer.generate import NoCheckpoint, sample

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    try:
        text = sample(args.path, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed)
    except NoCheckpoint as e:
        raise UsageError(str(e)) from None
    print(args.prompt + text)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as our one line (and exit 2) instead of usage + error."""

    def error(self, message: str):
        print(f"trainctl: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="trainctl", description="Train deep transformers: Ray launches, WebDataset streams, DeepSpeed ZeRO trains, W&B tracks.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pp = sub.add_parser("prepare", help="turn text files into WebDataset token shards + manifest.json",
                        description="Tokenize text files (paths, folders or globs) into WebDataset tar shards of token arrays, with a manifest.json and a train/val split.")
    pp.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, .jsonl files, raw-text .tar shards, folders or globs (quote globs)")
    pp.add_argument("--out", required=True, help="output folder for the shards and manifest.json: a local path or an "
                    "object-store URL (s3://bucket/prefix, any fsspec URL; shards are uploaded as they are written)")
    pp.add_argument("--tokenizer", default="byte", help="byte (default), bpe:VOCAB_SIZE (trained here on a sample of the inputs) or a path to a Hugging Face tokenizer.json")
    pp.add_argument("--val-fraction", type=float, default=0.1, help="tail of each file held out for validation (default 0.1)")
    pp.add_argument("--shard-size-mb", type=float, default=256, help="target shard size in MB (default 256)")
    pp.add_argument("--text-field", default="text", help="the field holding the text in .jsonl inputs and .json samples of .tar inputs")
    pp.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    pp.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes that tokenize files in parallel "
                    "(default: one per core)")
    pp.add_argument("--address", help="tokenize files as Ray tasks on this cluster (auto, HOST:PORT, ray://..., or local); "
                    "its nodes must see the input paths")
    pp.set_defaults(fn=_cmd_prepare)

    pr = sub.add_parser("run", help="train: a YAML job file plus key=value overrides",
                        description="Run a job: defaults, then CONFIG, then section.key=value overrides (e.g. train.max_steps=100). "
                                    "Resumes from the run's latest checkpoint if there is one.")
    pr.add_argument("config", help="YAML job file (see configs/)")
    pr.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4 cluster.num_workers=1")
    pr.add_argument("--address", help="Ray cluster: local (default: a private Ray here), auto, or HOST:PORT; overrides cluster.address")
    pr.add_argument("--no-ray", action="store_true", help="run the worker in this process (alone, or one rank under torchrun)")
    pr.set_defaults(fn=_cmd_run)

    pg = sub.add_parser("generate", help="sample text from a run or a checkpoint (CPU)",
                        description="Load a finished run's latest checkpoint (or a given checkpoint folder) and sample text.")
    pg.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="run folder (storage_path/NAME) or checkpoint folder")
    pg.add_argument("--prompt", default="\n", help="text to continue")
    pg.add_argument("--max-new-tokens", type=int, default=200)
    pg.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    pg.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens; 0 = all")
    pg.add_argument("--seed", type=int, default=0)
    pg.set_defaults(fn=_cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    from launcher.config import ConfigError

    parser = build_parser()
    # Overrides may come after options too (`run CFG --no-ray train.lr=1`), which argparse's
    # positional list does not take: collect the leftover key=value words here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or args.command != "run"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except (ConfigError, DataError, UsageError) as e:
        print(f"trainctl: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("trainctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
