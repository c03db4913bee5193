"""A job checked before any worker starts (`run`): its data prepared and fitting the model,
and the checkpoint it resumes from (its own, or `--resume`'s) agreeing with it in
tokenizer, tensor shapes, global batch and sequence length. Every refusal is a UsageError:
one line, exit 2, nothing written.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.run_folder import RunFolder


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit 2."""


def prepare_job(cfg, run: RunFolder, fresh: bool = False, force: bool = False, ray: bool = True) -> list:
    """Make data.path a prepared dataset and check that it fits the model and the checkpoint
    it resumes from, and (`ray`: the job runs on a private local Ray) that this machine has
    the cores for its workers (before any worker starts). Returns the checkpoints a
    `--resume --force` rewind deletes."""
    if ray and "WORLD_SIZE" not in os.environ:  # under torchrun (--no-ray), torchrun decides
        check_local_cores(cfg.cluster)
    from data_pipeline import open_dataset, resolve_dataset
    from data_pipeline.raw import FORMAT as RAW_SHARDS
    from data_pipeline.raw import check_shards, is_shard_list
    from trainer import checkpoint
    from trainer.build import build_stream, data_paths, raw_options

    d = cfg.data
    if d.sources:
        for source in d.sources:
            source.path = resolve_dataset(
                source.path, d.cache_dir, d.tokenizer, d.val_fraction, d.text_field, d.format, d.seq_len
            )
    else:
        d.path = resolve_dataset(d.path, d.cache_dir, d.tokenizer, d.val_fraction, d.text_field, d.format, d.seq_len)
    manifests = {path: open_dataset(path, raw_options(cfg)) for path in data_paths(cfg)[:1]}
    for path in data_paths(cfg):  # raw-text shards, read only by the workers: a first look here
        if is_shard_list(path) and not path.startswith("pipe:"):
            manifest = manifests.get(path) or open_dataset(path, raw_options(cfg))
            if manifest["format"] == RAW_SHARDS:
                check_shards(manifest, d.text_field)
    tokenizer = manifests[data_paths(cfg)[0]]["tokenizer"]  # mixed sources must agree (build_stream checks)
    vocab = tokenizer["vocab_size"]
    if vocab > cfg.model.vocab_size:
        raise UsageError(
            f"the dataset's tokenizer has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}: set model.vocab_size>={vocab}"
        )
    for spec in cfg.train.evals:
        if spec.chat and not tokenizer.get("chat_template"):
            raise UsageError(
                f"train.evals: {spec.label} has chat: true but the dataset's tokenizer ({tokenizer['name']}) has no chat "
                "template: set chat: false, or prepare the data with a chat model's tokenizer"
            )
    store = run.store
    try:
        store.check()
        latest, newer = None if fresh else store.latest(), []
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    if cfg.checkpoint.resume_from is not None:
        wanted = resume_checkpoint(cfg.checkpoint.resume_from)
        cfg.checkpoint.resume_from = str(wanted.resolve())
        latest, newer = branch_point(cfg, run, wanted, latest, force)
    if latest is not None and checkpoint.meta(latest).get("tokenizer") != tokenizer:
        was = checkpoint.meta(latest).get("tokenizer", {})
        raise UsageError(
            f"run '{cfg.name}' was trained with the {was.get('name')} tokenizer (vocab {was.get('vocab_size')}) "
            f"but the data uses {tokenizer['name']} (vocab {vocab}): use the run's dataset or another name="
        )
    if cfg.model.init_from:
        check_init_tokenizer(cfg, tokenizer)
        from trainer.hf import HFError, check_weights

        try:
            check_weights(cfg.model, cfg.model.init_from)
        except HFError as e:
            raise UsageError(str(e)) from None
    if latest is not None:
        check_shapes(cfg, latest)
        check_lora(cfg, latest)
        saved = checkpoint.meta(latest)
        if saved.get("global_batch", cfg.global_batch) != cfg.global_batch:
            raise UsageError(
                f"{latest} was trained with a global batch of {saved['global_batch']} sequences but this job has "
                f"{cfg.global_batch} (micro_batch_size x num_workers x grad_accum_steps): keep the global batch, "
                f"e.g. train.grad_accum_steps={max(saved['global_batch'] // (cfg.train.micro_batch_size * cfg.cluster.num_workers), 1)}"
            )
        if saved.get("seq_len", cfg.data.seq_len) != cfg.data.seq_len:
            raise UsageError(
                f"{latest} was trained with data.seq_len={saved['seq_len']} but this job has {cfg.data.seq_len}: "
                "resume with the same data.seq_len"
            )
        from data_pipeline.batchstream import effective_lanes

        lanes = effective_lanes(cfg.global_batch, cfg.data.lanes)
        if saved.get("data_lanes", lanes) != lanes:
            raise UsageError(
                f"{latest} was trained with {saved['data_lanes']} data lanes but this job has {lanes}: "
                f"resume with data.lanes={saved['data_lanes']} (the order of the data depends on it)"
            )
    # Raises DataError when a split cannot fill one global batch, or mixed sources disagree.
    build_stream(cfg, 0, cfg.cluster.num_workers)
    from launcher.plan import fit_warning

    if (too_big := fit_warning(cfg)) is not None:
        print(f"trainctl: warning: {too_big}", file=sys.stderr, flush=True)
    return newer


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota
    (a container's `--cpus`)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(math.ceil(int(quota) / int(period)), 1))
    except (OSError, ValueError):
        pass
    return cores


def check_local_cores(cluster, cores: int | None = None) -> None:
    """A private local Ray (`cluster.address: local`) gets num_workers x cpus_per_worker CPUs:
    more than this machine has cores would start more worker processes than it can run (each
    training slower than alone, and all of them waiting for the slowest), so it is refused,
    naming how to oversubscribe on purpose. A cluster that is joined checks placement itself."""
    from trainer.config import CPU_UNITS

    if cluster.address != "local":
        return
    cores = available_cores() if cores is None else cores
    n, per = cluster.num_workers, cluster.cpus_per_worker
    if round(per * CPU_UNITS) * n <= cores * CPU_UNITS:
        return
    need = round(per * CPU_UNITS) * n / CPU_UNITS
    what = f"cluster.num_workers={n}" + (f" x cluster.cpus_per_worker={per:g}" if per != 1 else "")
    fit = math.floor(cores * CPU_UNITS / n) / CPU_UNITS  # the most per worker that fits, in Ray's steps
    if fit >= 1:
        how = f"lower cluster.cpus_per_worker to {fit:g}" + (" or cluster.num_workers" if n > 1 else "")
    elif fit > 0:
        how = f"lower cluster.num_workers, or oversubscribe on purpose with cluster.cpus_per_worker={fit:g}"
    else:
        how = f"lower cluster.num_workers to at most {cores * CPU_UNITS}"
    raise UsageError(f"{what} needs {need:g} CPUs but this machine has {cores} cores: {how}")


def resume_checkpoint(path: str):
    """The checkpoint `--resume PATH` names: a checkpoint folder, or a run folder (its latest)."""
    from trainer.checkpoint import NoCheckpoint, find_checkpoint

    if not Path(path).exists():
        raise UsageError(
            f"--resume {path} does not exist: give a checkpoint folder (RUN/checkpoints/step_...) or a run folder"
        )
    try:
        return find_checkpoint(path)
    except NoCheckpoint as e:
        raise UsageError(f"--resume {path}: {e}") from None


def branch_point(cfg, run: RunFolder, wanted, own, force: bool):
    """(where a run given `--resume WANTED` starts, the newer checkpoints to delete first),
    its own latest checkpoint being `own`.

    Another run's checkpoint applies until this run has one of its own (so the same command
    rerun after a preemption continues). An earlier checkpoint of this run rewinds it, which
    needs --force: its newer checkpoints are deleted once the job is known to be valid."""
    store = run.store
    root = store.root.resolve()
    if own is None:
        return wanted, []
    if wanted.resolve().parent != root:
        print(
            f"trainctl: run '{cfg.name}' has its own checkpoints: continuing from {own}, not --resume {wanted}",
            file=sys.stderr,
            flush=True,
        )
        return own, []
    newer = [root / tag for tag in store.tags() if tag > wanted.name]
    if newer and not force:
        raise UsageError(
            f"--resume {wanted} rewinds run '{cfg.name}', which has newer checkpoints "
            f"({', '.join(c.name for c in newer)}): add --force to delete them and continue from {wanted.name}"
        )
    return wanted, newer


def check_init_tokenizer(cfg, tokenizer: dict) -> None:
    """The data must be tokenized with model.init_from's own tokenizer."""
    from trainer.hf import read_file

    theirs = read_file(cfg.model.init_from, "tokenizer.json")
    if theirs is None:
        raise UsageError(
            f"model.init_from={cfg.model.init_from} has no tokenizer.json: trainctl needs the model's own tokenizer"
        )
    if tokenizer.get("json") != theirs.decode("utf-8"):
        raise UsageError(
            f"the dataset {data_path(cfg)} was tokenized with another tokenizer ({tokenizer.get('name')}, vocab "
            f"{tokenizer.get('vocab_size')}) than model.init_from's: prepare it with --tokenizer {cfg.model.init_from}"
        )


def data_path(cfg) -> str:
    return cfg.data.sources[0].path if cfg.data.sources else cfg.data.path


def check_lora(cfg, ckpt) -> None:
    """A LoRA checkpoint resumes only with the same adapters, on the same base weights."""
    from trainer import checkpoint
    from trainer.hf import weights_sha256

    saved = checkpoint.meta(ckpt).get("lora")
    lora = cfg.train.lora
    if saved is None and lora is None:
        return
    if saved is None or lora is None:
        has = "has LoRA adapters" if saved else "has no LoRA adapters"
        raise UsageError(
            f"checkpoint {ckpt} {has} but this job {'sets' if lora else 'does not set'} train.lora: "
            "resume with the checkpoint's train.lora, or start another run (name=)"
        )
    for key in ("rank", "alpha", "targets"):
        if saved[key] != getattr(lora, key):
            raise UsageError(
                f"checkpoint {ckpt} has LoRA {key}={saved[key]} but this job has train.lora.{key}={getattr(lora, key)}: "
                "resume with the checkpoint's settings"
            )
    if weights_sha256(cfg.model.init_from) != saved["base_sha256"]:
        raise UsageError(
            f"the base model {cfg.model.init_from} has changed since checkpoint {ckpt} was trained on it (its weights' "
            "sha256 differs): resume against the base the adapters were trained on"
        )


def check_shapes(cfg, ckpt) -> None:
    """A checkpoint of another model shape or parametrization is refused before any worker
    starts, naming the first tensor that differs and both shapes (or the setting)."""
    import torch
    import yaml

    from trainer.config import JobConfig
    from trainer.model import Transformer

    def shapes(model_section) -> dict[str, list[int]]:
        with torch.device("meta"):
            model = Transformer(model_section)
        return {name: list(p.shape) for name, p in model.state_dict().items()}

    saved = JobConfig.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text())).model
    theirs = shapes(saved)
    ours = shapes(cfg.model)
    for name in [*ours, *(n for n in theirs if n not in ours)]:  # the model's own order
        if theirs.get(name) != ours.get(name):
            there = theirs.get(name, "absent")
            here = ours.get(name, "absent")
            raise UsageError(
                f"checkpoint {ckpt}: tensor {name} is {there} in the checkpoint but {here} in this model: "
                "use the model settings the checkpoint was trained with, or another name= (or --fresh)"
            )
    # The multipliers and the optimizer's groups (their number, their settings) follow these.
    for key in ("parametrization", "base_width", "base_depth"):
        if getattr(saved, key) != getattr(cfg.model, key):
            raise UsageError(
                f"checkpoint {ckpt} was trained with model.{key}={getattr(saved, key)} but this job has "
                f"model.{key}={getattr(cfg.model, key)}: resume with the checkpoint's, or another name= (or --fresh)"
            )
