"""The `trainctl` command line's grammar: every command, its arguments and their help, and
argparse's errors as trainctl's one line and exit 2. What each command does is launcher/cli.py's
(and launcher/cluster_commands.py's): `build_parser` takes the functions by name."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from launcher.exits import USAGE_ERROR


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as our one line (and exit 2) instead of usage + error."""

    def error(self, message: str):
        print(f"trainctl: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def job_arguments(parser: argparse.ArgumentParser, config_help: str, optional: bool = False) -> None:
    """CONFIG and its key=value overrides, as every command that reads a job file takes them."""
    parser.add_argument("config", nargs="?" if optional else None, help=config_help)
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.lr=3e-4 cluster.num_workers=1",
    )


def build_parser(handlers: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The parser of every command; `handlers` maps a command's name to its function (launcher/cli.py's COMMANDS)."""
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
    pp.set_defaults(fn=handlers["prepare"])

    pr = sub.add_parser(
        "run",
        help="train: a YAML job file plus key=value overrides",
        description="Run a job: defaults, then CONFIG, then section.key=value overrides (e.g. train.max_steps=100). "
        "Resumes from the run's latest checkpoint if there is one.",
    )
    job_arguments(pr, "YAML job file (see configs/)")
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
    pr.set_defaults(fn=handlers["run"])

    pl = sub.add_parser(
        "plan",
        help="parameters, FLOPs, memory per ZeRO stage and time per step of a job, before launch",
        description="Estimate a job from its config alone: parameters, FLOPs per token, tokens per step, "
        "memory per worker under each ZeRO stage with and without optimizer offload (and the "
        "smallest that fits cluster.gpu_memory_gb), time per step and per run at a stated MFU.",
    )
    job_arguments(pl, "YAML job file")
    pl.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    pl.add_argument(
        "--peak-tflops", type=float, help="peak TFLOP/s per GPU (default cluster.peak_tflops, else an H100's 989)"
    )
    pl.add_argument("--gpu-memory-gb", type=float, help="memory per GPU (default cluster.gpu_memory_gb)")
    pl.set_defaults(fn=handlers["plan"])

    ps = sub.add_parser(
        "submit",
        help="run a job on a remote Ray cluster through its Jobs API",
        description="Validate CONFIG here, upload the working directory (without .git, data, venvs, runs, "
        "wandb folders) and run `trainctl run CONFIG` on the cluster. WANDB_API_KEY and other "
        "credentials go along as the job's environment variables, never into files.",
    )
    job_arguments(ps, "YAML job file inside the working directory")
    jobs_address = "the Ray dashboard, http://HEAD:8265 (default: RAY_ADDRESS)"
    ps.add_argument("--address", help=jobs_address + " or the config's cluster.address")
    ps.add_argument(
        "--shared-data",
        action="store_true",
        help="the job's local data paths outside what is uploaded "
        "(data.path, data.sources) are on storage every node mounts at the same path: submit them as they "
        "are (without it, submit refuses them)",
    )
    ps.set_defaults(fn=handlers["submit"])
    for name, fn, text in (
        ("status", handlers["status"], "a job's status"),
        ("logs", handlers["logs"], "a job's logs"),
        ("stop", handlers["stop"], "stop a job (it saves a checkpoint at the next step if it can)"),
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
    plist.set_defaults(fn=handlers["list"])

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
    job_arguments(pcc, "YAML job file (its cluster and checkpoint sections); default: the defaults", optional=True)
    pcc.add_argument(
        "--address", help="the cluster's Ray address (HEAD:6379, auto), or local; overrides cluster.address"
    )
    pcc.set_defaults(fn=handlers["cluster_check"])

    pco = sub.add_parser(
        "coordcheck",
        help="train each depth (or width) a few steps and compare activation sizes: is the parametrization right?",
        description="The coordinate check: the job's model at each depth (or width), same seed, same batches, a few "
        "AdamW steps at a constant train.lr with the job's per-group settings; prints the RMS of the residual stream, "
        "branch outputs, attention and output logits and the slope against depth, and writes "
        "RUN_FOLDER/coordcheck-PARAMETRIZATION-AXIS.png and .json.",
    )
    job_arguments(pco, "YAML job file (its model, data and train sections)")
    pco.add_argument("--depths", help="n_layer values, e.g. 2,4,8,16,32,64 (the default)")
    pco.add_argument("--widths", help="d_model values instead, e.g. 64,128,256 (heads keep the job's head_dim)")
    pco.add_argument("--steps", type=int, default=5, help="optimizer steps per shape (default 5)")
    pco.add_argument(
        "--seeds", type=int, default=1, help="initialisations per shape, each figure their mean (default 1)"
    )
    pco.set_defaults(fn=handlers["coordcheck"])

    psw = sub.add_parser(
        "sweep",
        help="a grid of jobs on Ray Tune: the best learning rate (or anything) per group, with a table and a plot",
        description="Every combination of the --grid values is a trial: the job with those overrides, in its own run "
        "folder SWEEP/trials/NAME/. Trials run on Ray Tune inside one Ray (a private local one, or --address's "
        "cluster), each trial's workers in its placement group. Results in SWEEP/ (results.csv, results.json, "
        "val_loss.png). Run the same command again to continue a killed sweep.",
    )
    job_arguments(psw, "YAML job file")
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
    psw.set_defaults(fn=handlers["sweep"])

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
    pe.set_defaults(fn=handlers["export"])

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
    pg.set_defaults(fn=handlers["generate"])

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
    pe.set_defaults(fn=handlers["eval"])
    return p
