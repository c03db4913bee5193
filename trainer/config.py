"""The job config tree: one typed model per YAML section, validated once, at load.

Every field is documented where it is declared. The launcher builds a `JobConfig` from
defaults, the YAML file and `key=value` overrides (launcher/config.py); workers receive
the resolved tree as a plain dict and rebuild it with `JobConfig.model_validate`.
The schema lives here, not in launcher/, because trainer/ must read it and nothing may
import launcher/.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# is_secret_name and redact_text: imported from here by the modules that read the config
from data_pipeline.redact import is_secret_name as is_secret_name
from data_pipeline.redact import redact_text as redact_text
from trainer.hf_names import LORA_TARGETS
from trainer.model_config import ModelConfig
from trainer.redaction import redact


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MixSource(Section):
    path: str = Field(min_length=1, description="a dataset, as data.path takes it")
    weight: float = Field(gt=0, description="relative share of the sequences drawn from it")


class DataSection(Section):
    path: str = Field(
        "stdlib",
        description="a prepared dataset (folder with manifest.json), raw text (file, folder or glob) "
        "prepared automatically into cache_dir, or 'stdlib' for the Python standard library's source",
    )
    tokenizer: str = Field(
        "byte",
        description="byte, bpe:VOCAB_SIZE or a tokenizer.json path: used when raw text is "
        "prepared automatically, and for raw-text shards (byte or a file)",
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="tail of each file held out for validation (auto-prepare)")
    seq_len: int = Field(256, gt=0, description="tokens per training sequence (context length)")
    shuffle_buffer: int = Field(8192, ge=1, description="raw-text shards: sequences held in the seeded shuffle buffer")
    lanes: int = Field(
        256,
        ge=1,
        description="prepared shards: the global batch reads this many separate parts of the corpus "
        "(capped at a divisor of the global batch); ranks up to this many each read only their own",
    )
    num_workers: int = Field(
        1,
        ge=0,
        description="DataLoader worker processes that build the batches (0: in the "
        "training process); they split the rank's reads between them",
    )
    cache_dir: str = Field(".cache/trainctl", description="where automatically prepared datasets are kept")
    format: Literal["text", "chat", "prompt-completion"] = Field(
        "text",
        description="how raw files named by data.path are prepared: text documents, or .jsonl/.parquet "
        "chat (messages) / prompt-completion records packed into rows of data.seq_len + 1 tokens",
    )
    text_field: str = Field(
        "text", description="raw-text shards: the field of .json/.jsonl members that holds the text"
    )
    allow_pipe: bool = Field(False, description="allow pipe:COMMAND shard URLs (they run shell commands)")
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="a corrupt, truncated or unreachable shard: fail (stop, naming it) or skip (warn, count, go on)",
    )
    document_masking: bool | None = Field(
        None,
        description="keep attention inside each document (or chat example) of a packed sequence (a masked "
        "attention kernel, slower than the plain causal one); null = on for chat and prompt-completion "
        "datasets, off for plain text",
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant",
        description="chat and prompt-completion datasets: train on the assistant turns (completions) only, "
        "or on every token but padding",
    )
    sources: list[MixSource] | None = Field(
        None, description="several datasets mixed by weight, [{path, weight}, ...], instead of data.path"
    )

    @field_validator("path", "cache_dir")
    @classmethod
    def _not_empty(cls, v: str, info) -> str:
        if not v.strip():
            raise ValueError(f"data.{info.field_name} is empty: give a path")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if self.sources is not None:
            if not self.sources:
                raise ValueError("data.sources is empty: give at least one {path, weight} or use data.path")
            if self.path != DataSection.model_fields["path"].default:  # a dumped config carries the default
                raise ValueError("set data.path or data.sources, not both")
        return self


class LoraSection(Section):
    rank: int = Field(8, gt=0, description="the adapters' rank r")
    alpha: float = Field(16.0, gt=0, description="scaling: each adapter's update is multiplied by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="the layers that get adapters, by their Hugging Face names: "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or all-linear",
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _all_linear(cls, v):
        return list(LORA_TARGETS) if v in ("all-linear", ["all-linear"]) else v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"train.lora.targets is empty: name layers from {', '.join(LORA_TARGETS)}")
        for name in v:
            if name not in LORA_TARGETS:
                raise ValueError(
                    f"train.lora.targets: {name!r} matches no layer: choose from {', '.join(LORA_TARGETS)} or all-linear"
                )
        return sorted(set(v), key=list(LORA_TARGETS).index)


PROFILE_HELP = "give N (N steps after a 5-step warm-up) or FIRST-LAST with FIRST <= LAST, e.g. 20-22"


class EvalTaskSpec(Section):
    path: str = Field(description="a multiple-choice task file: JSONL of {query, choices, gold} (see `trainctl eval`)")
    name: str | None = Field(
        None, description="the name its metrics are logged under (eval/NAME/acc); default the file's stem"
    )
    every: int | None = Field(
        None, gt=0, description="steps between its evaluations (and at the end); default train.eval_every"
    )
    limit: int | None = Field(None, gt=0, description="score only the file's first N items")
    chat: bool = Field(
        False,
        description="score each choice as the assistant's reply to the query as a user's message, through the "
        "tokenizer's chat template (lm-eval's --apply_chat_template); needs a tokenizer with one",
    )

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


class TrainSection(Section):
    max_steps: int = Field(
        1000,
        ge=0,
        description="optimizer steps to train; 0 (with model.init_from) = validate the imported model and "
        "save it as the step-0 checkpoint",
    )
    micro_batch_size: int = Field(8, gt=0, description="sequences per rank per forward pass")
    grad_accum_steps: int | None = Field(
        None, gt=0, description="micro batches per optimizer step; null = derived from global_batch_size, else 1"
    )
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="sequences per optimizer step over all ranks = micro_batch_size * num_workers * grad_accum_steps",
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(1e-4, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    lr_decay_steps: int | None = Field(None, gt=0, description="steps of cosine decay; null = max_steps")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(
        1e-8,
        gt=0,
        description="AdamW epsilon; under model.parametrization mup/completep the base value each group's is "
        "scaled from",
    )
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip; 0 = off")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp16 needs a GPU (loss scaling)")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="keep optimizer state on the CPU (ZeRO 1-3)")
    profile: str | None = Field(
        None,
        description="steps to trace with the torch "
        "profiler into the run folder: N (N steps after a 5-step warm-up) or FIRST-LAST "
        "(`trainctl run --profile`)",
    )
    compile: bool = Field(
        False, description="torch.compile the model (Module.compile: the first steps pay the compile time)"
    )
    lora: LoraSection | None = Field(
        None,
        description="train low-rank adapters on a frozen model.init_from: {rank, alpha, dropout, targets}; "
        "checkpoints hold the adapters and a hash of the base; null = train every weight",
    )
    eval_every: int = Field(100, gt=0, description="steps between validation passes (and at the end)")
    evals: list[EvalTaskSpec] = Field(
        default_factory=list,
        description="multiple-choice tasks scored during training, each rank its share of the items: "
        "eval/NAME/acc and acc_norm at every `every` steps and at the end",
    )
    eval_sequences: int = Field(
        320,
        gt=0,
        description="validation sequences per pass from each source's val split (capped by the split): the first "
        "ones, the same set for any number of workers, micro batch and accumulation; each rank evaluates its share",
    )
    log_every: int = Field(10, gt=0, description="steps between metric lines")
    seed: int = Field(1337, description="seeds the model init, the data order and every rank's RNG")
    sample_tokens: int = Field(200, ge=0, description="tokens sampled from the model at the end of the run; 0 = none")
    spike_factor: float | None = Field(
        4.0,
        gt=1,
        description="a step whose loss exceeds this factor times the mean of the last 20 is a spike: roll back "
        "(like a non-finite loss); null = only non-finite losses roll back",
    )
    skip_steps: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="steps whose data windows are passed over untrained, as a rollback after a spike does "
        "(a batch known to be bad; Megatron's --iterations-to-skip)",
    )
    max_rollbacks: int = Field(
        3,
        ge=0,
        description="rollbacks to the last checkpoint allowed before the run stops; 0 = stop at "
        "the first non-finite or spiking loss",
    )

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str | None) -> str | None:
        m = re.fullmatch(r"([1-9][0-9]*)(?:-([1-9][0-9]*))?", v) if v is not None else None
        if v is not None and (m is None or (m[2] is not None and int(m[1]) > int(m[2]))):
            raise ValueError(f"train.profile={v!r}: {PROFILE_HELP}")
        return v

    @model_validator(mode="after")
    def _lr(self) -> TrainSection:
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must not exceed train.lr={self.lr}")
        labels = [e.label for e in self.evals]
        if twice := sorted({x for x in labels if labels.count(x) > 1}):
            raise ValueError(f"train.evals names {twice[0]!r} twice: give each task its own name")
        return self


class CheckpointSection(Section):
    storage_path: str = Field(
        "runs",
        description="folder holding every run's folder (NAME/ inside it); or an object-store "
        "URL (s3://bucket/runs, gs://..., any fsspec URL) that gets the checkpoints",
    )
    local_path: str = Field(
        "runs",
        description="with an object-store storage_path: the local folder holding the run folder "
        "(metrics, W&B files, and the checkpoints on their way up or down)",
    )
    async_save: bool = Field(
        True,
        description="write checkpoints in a background thread: training waits only for a copy "
        "of the state in CPU memory (which costs that much memory while the save runs)",
    )
    every: int = Field(500, gt=0, description="steps between checkpoints (one is always written at the end)")
    keep: int = Field(2, gt=0, description="newest checkpoints kept; older ones are deleted")
    resume_from: str | None = Field(
        None,
        description="a checkpoint folder to resume from instead of the run's latest (`trainctl run --resume PATH`)",
    )
    preempt_grace_s: float = Field(
        120,
        gt=0,
        description="after SIGTERM: seconds to save a checkpoint at the next step "
        "boundary and exit before the job is stopped without one",
    )


class TrackingSection(Section):
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="W&B mode; offline needs no account (`wandb sync` uploads later); WANDB_MODE overrides"
    )
    project: str = Field("trainctl")
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    backends: list[Literal["wandb", "tensorboard", "mlflow"]] = Field(
        default_factory=lambda: ["wandb"],
        description="the dashboards each logged step goes to (metrics.jsonl always): wandb (its mode: "
        "tracking.mode), tensorboard (runs/NAME/tensorboard), mlflow (tracking.mlflow_uri)",
    )

    @field_validator("backends")
    @classmethod
    def _once_each(cls, backends: list[str]) -> list[str]:
        if len(set(backends)) != len(backends):
            raise ValueError(f"{backends} names a dashboard twice: name each once")
        return backends

    mlflow_uri: str | None = Field(
        None, description="MLflow's tracking URI (a server or a store); default <checkpoint.local_path>/mlruns"
    )
    start_timeout_s: float = Field(
        120,
        gt=0,
        description="seconds W&B may take to start (from the run's start); past them tracking is off "
        "for the run with one warning, and the run ends without waiting for it (metrics.jsonl has every step)",
    )
    verbose: bool = Field(
        False,
        description="Ray's, DeepSpeed's and torch's own output on the console (else in the "
        "run's workers.log) and DeepSpeed's INFO lines; `trainctl run --verbose` sets it",
    )


class ClusterSection(Section):
    address: str = Field(
        "local",
        description="'local' starts a private Ray on 127.0.0.1; 'auto' joins the running cluster; or HOST:PORT / ray://HOST:PORT",
    )
    num_workers: int = Field(2, gt=0, description="training processes (ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker and NCCL; false = CPU and gloo")
    cpus_per_worker: float = Field(
        1,
        gt=0,
        description="CPUs Ray reserves for each worker (a fraction, in steps of 0.0001, packs more workers "
        "than cores onto a machine on purpose)",
    )
    max_failures: int = Field(0, ge=-1, description="restarts of the worker group after a failure (-1 = unlimited)")
    restart_timeout_s: float = Field(
        600,
        gt=0,
        description="after a failure, seconds to wait for the cluster to hold the workers again (a lost node, "
        "no replacement) before the job stops with exit 1; the same command then resumes",
    )
    collective_timeout_s: float = Field(
        1800,
        gt=0,
        description="seconds a rank waits in a collective (an all-reduce, a barrier) before the job fails: long "
        "enough for rank 0 to convert a checkpoint for another number of workers while the others wait",
    )
    placement: Literal["PACK", "SPREAD"] = Field(
        "PACK",
        description="PACK workers onto few nodes, or SPREAD them over "
        "as many as possible (Ray placement-group strategy)",
    )
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables for every worker")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="extra Ray resources each worker needs, e.g. {memory: 32e9} or a custom resource a node declares",
    )
    accelerator_type: str | None = Field(
        None, description="GPU type the workers must run on, as Ray names it (A100, H100, ...)"
    )
    gpu_memory_gb: float = Field(
        80, gt=0, description="memory of each GPU, for `trainctl plan` and the fit check before launch"
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="peak dense TFLOP/s of one worker's device, for MFU and "
        "`trainctl plan`; null = by the GPU's name (H100/H200 SXM 989, A100 312, bf16), "
        "or measured with a matmul on a CPU (plan assumes an H100 for a GPU job)",
    )

    @field_validator("cpus_per_worker")
    @classmethod
    def _cpu_steps(cls, v: float) -> float:
        units = v * CPU_UNITS
        if abs(units - round(units)) > 1e-6 * max(units, 1) or round(units) < 1:
            down = math.floor(units + 1e-6) / CPU_UNITS
            hint = f"e.g. {down:g}" if down > 0 else f"at least {1 / CPU_UNITS:g}"
            raise ValueError(
                f"cluster.cpus_per_worker={v:g}: Ray counts CPUs in steps of {1 / CPU_UNITS:g} (it would round this "
                f"one, and the workers might no longer fit): give a multiple of {1 / CPU_UNITS:g}, {hint}"
            )
        return v


CPU_UNITS = 10_000  # Ray's resource quantities are fixed-point, in units of 0.0001

# A run's name is a single folder name under checkpoint.storage_path: never a path ("..", "/", "a/b").
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class JobConfig(Section):
    name: str = Field("run", description="the run's name: its folder under checkpoint.storage_path")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)

    @model_validator(mode="before")
    @classmethod
    def _eval_batches(cls, data: Any) -> Any:
        """A config.yaml an older trainctl wrote (a checkpoint's: export, generate and a resume's
        checks read it) may hold train.eval_batches, the global validation batches it had
        before train.eval_sequences: read as the sequences they were. A job file with it is
        refused by launcher/config.py (`eval_batches_moved`), naming the value to set."""
        train = data.get("train") if isinstance(data, dict) else None
        if not isinstance(train, dict) or "eval_batches" not in train:
            return data
        if "eval_sequences" in train:
            raise ValueError("train.eval_batches is replaced by train.eval_sequences: give only train.eval_sequences")
        train = {k: v for k, v in train.items() if k != "eval_batches"}
        train["eval_sequences"] = old_eval_sequences(data)[0]
        return {**data, "train": train}

    @model_validator(mode="after")
    def _combinations(self) -> JobConfig:
        if not NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"name={self.name!r} must be letters, digits, '_', '.' or '-', starting with a letter or digit (it "
                "names one folder under checkpoint.storage_path)"
            )
        t, c = self.train, self.cluster
        per_step = t.micro_batch_size * c.num_workers
        if t.global_batch_size is not None:
            if t.global_batch_size % per_step:
                raise ValueError(
                    f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size "
                    f"* cluster.num_workers = {t.micro_batch_size} * {c.num_workers} = {per_step}"
                )
            accum = t.global_batch_size // per_step
            if t.grad_accum_steps is not None and t.grad_accum_steps != accum:
                raise ValueError(
                    f"train.grad_accum_steps={t.grad_accum_steps} contradicts train.global_batch_size="
                    f"{t.global_batch_size} (which gives {accum}); set only one of them"
                )
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if t.precision == "fp16" and not c.use_gpu:
            raise ValueError("train.precision=fp16 needs cluster.use_gpu=true (use bf16 or fp32 on a CPU)")
        if t.lora is not None and not self.model.init_from:
            raise ValueError("train.lora needs model.init_from: the pre-trained model the adapters train on")
        if t.max_steps == 0 and not self.model.init_from:
            raise ValueError("train.max_steps=0 needs model.init_from (it saves the imported model as a checkpoint)")
        if t.offload_optimizer and t.zero_stage == 0:
            raise ValueError("train.offload_optimizer=true needs train.zero_stage 1, 2 or 3")
        return self

    # Derived quantities: one definition each, used by the launcher and the workers.
    @property
    def accum_steps(self) -> int:
        t = self.train
        if t.grad_accum_steps is not None:
            return t.grad_accum_steps
        if t.global_batch_size is not None:
            return t.global_batch_size // (t.micro_batch_size * self.cluster.num_workers)
        return 1

    @property
    def global_batch(self) -> int:
        return self.train.micro_batch_size * self.cluster.num_workers * self.accum_steps

    def to_yaml(self) -> str:
        """The resolved config as YAML, loadable again as a job file, its secrets redacted
        (`redact`): what the run folder and its checkpoints keep (config.yaml)."""
        return yaml.safe_dump(self.redacted(), sort_keys=False)

    def redacted(self) -> dict[str, Any]:
        """The config as a plain dict (model_dump(mode="json")) with its secrets replaced by
        REDACTED: for what a run writes down (config.yaml, W&B). The workers get the real one."""
        return redact(self.model_dump(mode="json"))


def old_eval_sequences(tree: dict) -> tuple[Any, str]:
    """(the validation sequences train.eval_batches counted in a config `tree`, how:
    batches × micro_batch_size × cluster.num_workers, the job's values or the defaults)."""
    train, cluster = tree.get("train") or {}, tree.get("cluster") or {}
    batches = train["eval_batches"]
    micro = train.get("micro_batch_size", TrainSection.model_fields["micro_batch_size"].default)
    workers = cluster.get("num_workers", ClusterSection.model_fields["num_workers"].default)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (batches, micro, workers)):
        return batches, f"{batches!r} x micro_batch_size x cluster.num_workers"
    return batches * micro * workers, f"{batches} x micro_batch_size {micro} x {workers} workers"


def eval_batches_moved(tree: dict) -> str | None:
    """The one line for a job file that still sets train.eval_batches; None when it does not."""
    train = tree.get("train")
    if not isinstance(train, dict) or "eval_batches" not in train:
        return None
    sequences, how = old_eval_sequences(tree)
    return (
        "train.eval_batches is replaced by train.eval_sequences, validation sequences per pass (the same set for "
        f"any number of workers): this job's eval_batches evaluated {how} = {sequences} sequences; set "
        f"train.eval_sequences: {sequences} instead"
    )
