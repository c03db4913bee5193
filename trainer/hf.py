"""Hugging Face model folders in: `model.init_from`.

A folder (local, or any URL `data_pipeline.sources` reads: http(s), s3://, ...) holding
config.json, model.safetensors (or shards listed in model.safetensors.index.json) and
tokenizer.json. `model_fields` maps config.json onto the `model:` section (Llama family:
Llama 2/3, SmolLM, TinyLlama, Mistral; Qwen2 with its q/k/v biases), refusing in one line
what trainctl's blocks cannot reproduce; `load_model` builds the model without a random
init and reads each tensor straight into its parameter, shard by shard, so host memory peaks
at one copy of the weights plus one tensor in the file's dtype. `base_files` keeps the small
files (config, tokenizer config, chat template) that `export` writes back out, so a Qwen2
stays a Qwen2.

Module level imports no torch: the launcher resolves `init_from` before any worker starts.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

from trainer.hf_names import hf_name

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED = "LlamaForCausalLM (Llama 2/3, SmolLM, TinyLlama), MistralForCausalLM and Qwen2ForCausalLM"
# What export copies back out beside the weights (tokenizer.json travels in the tokenizer dict).
BASE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
# `model:` fields that are training choices, not the pre-trained weights' shape: a job may set them.
FREE_FIELDS = ("init_from", "max_seq_len", "dropout", "activation_checkpointing")


class HFError(ValueError):
    """A Hugging Face folder trainctl cannot start from: one line for the user, a URL's
    password in it redacted (as DataError's)."""

    def __init__(self, message: object = "", *args: object):
        from data_pipeline.redact import redact_text

        super().__init__(redact_text(str(message)), *args)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if "://" in base else os.path.join(base, name)


def read_file(base: str, name: str) -> bytes | None:
    """A file of the folder, or None when it has none."""
    path = _join(base, name)
    if "://" not in base:
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()
    from data_pipeline.errors import DataError
    from data_pipeline.sources import read_bytes

    try:
        return read_bytes(path)
    except DataError as e:
        if "HTTP 404" in str(e) or "FileNotFoundError" in str(e):
            return None
        raise


def _exists(base: str, name: str) -> bool:
    """Whether the folder has the file, without reading it (a URL: its first 8 bytes)."""
    if "://" not in base:
        return os.path.isfile(_join(base, name))
    import urllib.error

    from data_pipeline.sources import describe_error, read_range

    try:
        read_range(_join(base, name), 0, 8)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # refused, not missing: say so rather than "no weights"
            raise HFError(f"cannot read {_join(base, name)}: {describe_error(e)}") from None
        return False
    except Exception:  # noqa: BLE001 - missing, unreachable or too short: not a weights file
        return False
    return True


def local_tokenizer(base: str, cache_dir: str) -> str:
    """A local folder holding the tokenizer files of `base` (itself when local; for a URL,
    downloaded once into `cache_dir`)."""
    if "://" not in base:
        return base
    import hashlib

    folder = os.path.join(cache_dir, "models", "tokenizer-" + hashlib.sha256(base.encode()).hexdigest()[:16])
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raw = read_file(base, "tokenizer.json")
        if raw is None:
            raise HFError(f"model.init_from={base} has no tokenizer.json: trainctl needs the model's own tokenizer")
        tmp = f"{folder}.partial-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (more := read_file(base, name)) is not None:
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(more)
        with open(os.path.join(tmp, "tokenizer.json"), "wb") as f:
            f.write(raw)
        os.replace(tmp, folder)
    return folder


def hf_config(base: str) -> dict:
    """config.json of the folder."""
    if "://" not in base and not os.path.isdir(base):
        raise HFError(f"model.init_from={base} is not a folder: give a Hugging Face model folder or its URL")
    raw = read_file(base, "config.json")
    if raw is None:
        raise HFError(
            f"model.init_from={base} has no config.json: give a Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer.json)"
        )
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise HFError(f"{_join(base, 'config.json')} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise HFError(f"{_join(base, 'config.json')} is not a JSON object")
    return config


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from config.json: top-level keys (transformers 4) or
    `rope_parameters` (transformers 5)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta), scaling


def model_fields(config: dict, where: str = "config.json") -> dict[str, Any]:
    """The `model:` section's fields for a config.json; HFError naming what is not supported."""
    archs = config.get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs):
        raise HFError(f"{where}: architectures {archs} is not supported: trainctl imports {SUPPORTED}")
    arch = next(a for a in archs if a in ARCHITECTURES)
    try:
        d_model, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
        fields = {
            "vocab_size": int(config["vocab_size"]),
            "n_layer": int(config["num_hidden_layers"]),
            "n_head": n_head,
            "n_kv_head": int(config.get("num_key_value_heads") or n_head),
            "d_model": d_model,
            "d_ff": int(config["intermediate_size"]),
            "max_seq_len": int(config.get("max_position_embeddings", 2048)),
            "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
            "qkv_bias": arch == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise HFError(f"{where}: missing or bad field {e}: is it a {arch} config?") from None
    if config.get("hidden_act", "silu") != "silu":
        raise HFError(f"{where}: hidden_act={config['hidden_act']!r} is not supported: trainctl's MLP is SwiGLU (silu)")
    if config.get("mlp_bias"):
        raise HFError(f"{where}: mlp_bias=true is not supported: trainctl's MLP has no biases")
    if config.get("attention_bias") and arch != "Qwen2ForCausalLM":
        raise HFError(f"{where}: attention_bias=true is not supported for {arch} (its output projection has one)")
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * n_head != d_model:
        raise HFError(
            f"{where}: head_dim={head_dim} is not hidden_size / num_attention_heads = {d_model // n_head}: "
            "trainctl's attention needs head_dim * heads = hidden_size"
        )
    theta, scaling = rope_settings(config)
    fields["rope_theta"] = theta
    fields["rope_scaling"] = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise HFError(f"{where}: RoPE scaling {kind!r} is not supported: trainctl supports none or llama3")
        fields["rope_scaling"] = {
            k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        }
    window = config.get("sliding_window")
    if window is not None and config.get("use_sliding_window", True):
        fields["sliding_window"] = int(window)  # checked against data.seq_len by `resolve`
    return fields


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def resolve(tree: dict, base_dir: str) -> None:
    """Fill a job tree's `model:` section (and `data.tokenizer`) from `model.init_from`'s
    config.json, in place. A field the job sets to another value than config.json's is
    refused, naming both; the folder's tokenizer is the job's unless it names that same folder."""
    model = tree.setdefault("model", {})
    base = str(model["init_from"])
    if "://" not in base:
        base = os.path.normpath(os.path.join(base_dir, os.path.expanduser(base)))
    model["init_from"] = base
    fields = model_fields(hf_config(base), _join(base, "config.json"))
    window = fields.pop("sliding_window", None)
    for key, value in fields.items():
        if key in model and key not in FREE_FIELDS and not _same(model[key], value):
            raise HFError(
                f"model.{key}={model[key]} conflicts with model.init_from's config.json ({key} = {value}): "
                f"leave model.{key} out"
            )
        model.setdefault(key, value)
    seq_len = (tree.get("data") or {}).get("seq_len", 256)
    if window is not None and int(seq_len) > window:
        raise HFError(
            f"model.init_from's config.json has sliding_window={window}, shorter than data.seq_len={seq_len}: "
            f"trainctl attends to the whole sequence; use data.seq_len<={window}"
        )
    data = tree.setdefault("data", {})
    if "tokenizer" in data and not _is_folder_tokenizer(data["tokenizer"], base, base_dir):
        raise HFError(
            f"data.tokenizer={data['tokenizer']} conflicts with model.init_from={base}: the model's own "
            "tokenizer is used; leave data.tokenizer out"
        )
    cache = os.path.join(base_dir, os.path.expanduser(str(data.get("cache_dir", ".cache/trainctl"))))
    data["tokenizer"] = local_tokenizer(base, cache)


def _is_folder_tokenizer(spec: str, base: str, base_dir: str) -> bool:
    if "://" in base:
        return spec.rstrip("/") == base.rstrip("/") or "/models/tokenizer-" in spec  # a dumped config
    path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(str(spec))))
    return path in (base, os.path.join(base, "tokenizer.json"))


def base_files(base: str) -> dict[str, str]:
    """The folder's small files that export writes back out (those it has)."""
    out = {}
    for name in BASE_FILES:
        raw = read_file(base, name)
        if raw is not None:
            out[name] = raw.decode("utf-8")
    return out


def weight_files(base: str) -> list[str]:
    """The safetensors files holding the weights: the index's shards, or model.safetensors."""
    index = read_file(base, "model.safetensors.index.json")
    if index is not None:
        return sorted(set(json.loads(index)["weight_map"].values()))
    if _exists(base, "model.safetensors"):
        return ["model.safetensors"]
    bins = _exists(base, "pytorch_model.bin") or _exists(base, "pytorch_model.bin.index.json")
    hint = " (it has pytorch_model.bin: save it with safe_serialization=True)" if bins else ""
    raise HFError(f"model.init_from={base} has no model.safetensors or model.safetensors.index.json{hint}")


def _read_range(url: str, start: int, size: int) -> bytes:
    """Bytes of a weights file, retried like the data's reads when the network fails."""
    from data_pipeline.sources import read_range, with_retries

    if "://" not in url:
        return read_range(url, start, size)
    return with_retries(lambda: read_range(url, start, size), f"{url} bytes {start:,}-{start + size:,}")


def _header(url: str) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", _read_range(url, 0, 8))
    return 8 + n, json.loads(_read_range(url, 8, n))


def load_weights(model, base: str) -> None:
    """Read the folder's weights into `model`'s parameters, one tensor at a time."""
    index = TensorIndex(base)
    for name, p in model.named_parameters():  # a tied head once, as the embedding
        if (problem := index.problem(hf_name(name), name, p)) is not None:
            raise HFError(problem)
        index.read_into(hf_name(name), p.data)


def check_weights(mc, base: str) -> None:
    """The folder holds every weight of the model in its shape (safetensors headers only, a
    few small reads): HFError naming the first that is missing or differs."""
    import torch

    from trainer.model import Transformer

    with torch.device("meta"):
        model = Transformer(mc)
    index = TensorIndex(base)
    for name, p in model.named_parameters():
        if (problem := index.problem(hf_name(name), name, p)) is not None:
            raise HFError(problem)


def load_model_partitioned(mc, base: str, ds_config: dict):
    """The Transformer of `mc` holding the folder's weights, built under ZeRO-3's
    `zero.Init`: each rank holds only its partition of every weight. Rank 0 reads each
    tensor from the folder and `GatheredParameters` hands every rank its slice, so a rank's
    memory peaks at its partition plus one tensor (not a whole model on every rank of a
    node, which for 8 ranks of an 8B model would be 8 x 32 GB)."""
    import deepspeed
    import torch.distributed as dist

    from trainer.model import Transformer

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(mc)  # its random init touches only empty partitions
    # Problems travel as objects (broadcast_object_list picks the group's device: NCCL has no
    # CPU tensors), and only after every rank has finished each collective.
    problem, index = [None], None
    if dist.get_rank() == 0:
        try:
            index = TensorIndex(base)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it before the collectives below
            problem[0] = str(e)
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise HFError(problem[0])
    for name, p in model.named_parameters():  # a tied head once, as the embedding
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if index is not None and problem[0] is None:
                problem[0] = index.problem(hf_name(name), name, p)
                if problem[0] is None:
                    index.read_into(hf_name(name), p.data)
    dist.broadcast_object_list(problem, src=0)  # after the loop: every rank finished each gather
    if problem[0] is not None:
        raise HFError(problem[0])
    return model


def load_model(mc, base: str):
    """The Transformer of `mc` holding the folder's weights (fp32, CPU, train mode)."""
    import torch

    from trainer.model import Transformer, rope_table

    with torch.device("meta"):
        model = Transformer(mc)
    model.to_empty(device="cpu")  # storage without a random init: every weight is read below
    if mc.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    cos, sin = rope_table(mc)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    load_weights(model, base)
    return model


def weights_sha256(base: str) -> str:
    """A hash of the folder's weights: sha256 over its safetensors files' bytes, in order
    (what a LoRA checkpoint records of its base; about 1 s per GB)."""
    import hashlib

    from data_pipeline.sources import open_stream

    h = hashlib.sha256()
    for file in weight_files(base):
        url = _join(base, file)
        with open(url, "rb") if "://" not in base else open_stream(url) as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


# safetensors dtype codes trainctl reads, by torch's names.
DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class TensorIndex:
    """The folder's tensors by Hugging Face name (safetensors headers), each read on its own."""

    def __init__(self, base: str):
        self.base, self.where = base, {}
        for file in weight_files(base):
            url = _join(base, file)
            start, header = _header(url)
            for name, spec in header.items():
                if name != "__metadata__":
                    a, b = spec["data_offsets"]
                    self.where[name] = (url, start + a, b - a, spec["dtype"], list(spec["shape"]))

    def problem(self, hf: str, name: str, p) -> str | None:
        """Why the tensor `hf` cannot fill our parameter `name`, `p` (None: it can)."""
        if hf not in self.where:
            return f"model.init_from={self.base} lacks the weight {hf} (its safetensors files hold {len(self.where)} tensors)"
        url, _, _, dtype, shape = self.where[hf]
        if shape != list(p.shape):
            return f"{url}: {hf} has shape {shape} but the model's {name} is {list(p.shape)}"
        if dtype not in DTYPES:
            return f"{url}: {hf} is {dtype}: trainctl reads {', '.join(DTYPES)} weights"
        return None

    def read_into(self, hf: str, dst) -> None:
        """The tensor's bytes straight into `dst` when the dtypes agree (no copy of the weights
        beside the model), else through one temporary of the file's dtype."""
        import torch

        url, start, size, dtype, _ = self.where[hf]
        file_dtype = getattr(torch, DTYPES[dtype])
        buf = dst if file_dtype == dst.dtype else torch.empty(dst.shape, dtype=file_dtype)
        view = memoryview(buf.view(-1).view(torch.uint8).numpy())
        if "://" in url:
            view[:] = _read_range(url, start, size)
        else:
            with open(url, "rb") as f:
                f.seek(start)
                if f.readinto(view) != size:
                    raise HFError(f"{url} ends inside {hf}: the file is truncated")
        if buf is not dst:
            dst.copy_(buf)

    def read(self, hf: str):
        """The tensor as a new fp32 tensor."""
        import torch

        if hf not in self.where:
            raise HFError(f"{self.base} has no tensor {hf}")
        *_, dtype, shape = self.where[hf]
        out = torch.empty(shape, dtype=getattr(torch, DTYPES[dtype]))
        self.read_into(hf, out)
        return out.float()
