"""`trainctl export`: a checkpoint as a Hugging Face folder.

    config.json              LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases): widths,
                             heads, GQA, RoPE, RMSNorm eps, tying; a run from model.init_from
                             keeps its base's config.json and tokenizer files instead
    model.safetensors        fp32 weights under Llama's names
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    trainctl_export.json     where it came from: run, step, tokens seen; our tokenizer

Our blocks are Llama's (RMSNorm pre-norm, rotary embeddings on half-split pairs, SwiGLU,
grouped-query attention, no biases), so the weights map name for name; a mup or
completep model's forward multipliers (branch scale, attention scale, logit multiplier)
are folded into wo and w2, wq, and the final norm. The weights are
gathered from the ZeRO checkpoint one tensor at a time (DeepSpeed's lazy zero_to_fp32
over memory-mapped shards, or the memory-mapped model file for stage 0) and written
straight into a safetensors file whose header is known in advance from the model's
shapes: peak memory is about one tensor, not the model. The folder is built beside OUT
and moved into place when complete. A LoRA run's export reads its base tensor by tensor
(trainer/hf.py) and merges each one's adapters, or writes a PEFT adapter folder
(`write_adapter`). Nothing here imports transformers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from trainer import checkpoint
from trainer.config import JobConfig, LoraSection
from trainer.hf_names import hf_name
from trainer.model import ModelConfig, Transformer
from trainer.parametrization import Rules


class ExportError(ValueError):
    """Bad input to export (no checkpoint, a non-empty output folder): one line for the user."""


def llama_config(mc: ModelConfig, eot: int) -> dict:
    """config.json for a run from scratch: Llama's, or Qwen2's when the model has q/k/v biases
    (Llama's attention_bias would put one on the output projection too)."""
    qwen2 = mc.qkv_bias
    return {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": mc.vocab_size,
        "hidden_size": mc.d_model,
        "intermediate_size": mc.ffn_dim,
        "num_hidden_layers": mc.n_layer,
        "num_attention_heads": mc.n_head,
        "num_key_value_heads": mc.kv_heads,
        "head_dim": mc.head_dim,
        "max_position_embeddings": mc.max_seq_len,
        "rms_norm_eps": mc.norm_eps,
        "rope_theta": mc.rope_theta,
        "rope_scaling": None if mc.rope_scaling is None else {"rope_type": "llama3", **mc.rope_scaling.model_dump()},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        **({"use_sliding_window": False, "sliding_window": None} if qwen2 else {}),
        "attention_dropout": 0.0,
        "tie_word_embeddings": mc.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def model_config(ckpt: Path) -> ModelConfig:
    cfg = JobConfig.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    return cfg.model


def weight_shapes(mc: ModelConfig) -> dict[str, list[int]]:
    """Our parameter names and shapes in the model's order (a tied head once, as the embedding)."""
    with torch.device("meta"):
        model = Transformer(mc)
    return {name: list(p.shape) for name, p in model.named_parameters()}  # named_parameters skips the tied head


def model_tensors(ckpt: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) for each of `names`, gathered one at a time.

    Below ZeRO-3 the model file holds every weight whole; when they are fp32 (fp32
    training) they are read from it, memory-mapped. Otherwise (ZeRO-3, or bf16/fp16 weights
    whose fp32 masters live in the optimizer shards) DeepSpeed's lazy zero_to_fp32 gathers
    each tensor from the memory-mapped shards."""
    stage = checkpoint.meta(ckpt).get("zero_stage", 0)
    if stage < 3:
        module = checkpoint.load_torch(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True)["module"]
        if stage == 0 or all(module[name].dtype == torch.float32 for name in names):
            for name in names:
                yield name, module[name].float()
            return
        del module
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
    for name in names:
        t = lazy[name]
        yield name, (t if isinstance(t, torch.Tensor) else t.contiguous()).float()


def write_safetensors(path: Path, shapes: dict[str, list[int]], tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file of fp32 tensors written as they come, in `shapes` order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, tensor), (expected, shape) in zip(tensors, shapes.items()):
            if name != expected or list(tensor.shape) != shape:
                raise ExportError(
                    f"the checkpoint's {name} {list(tensor.shape)} does not match the model's {expected} {shape}"
                )
            f.write(tensor.detach().contiguous().numpy().data)  # the array's own buffer, not a copy


def base_folder_files(files: dict[str, str], mc: ModelConfig, tokenizer: dict) -> dict[str, str]:
    """The small files of the `model.init_from` folder as export writes them: config.json keeps
    its architecture and settings, with the shape fields trainctl trained and fp32 weights
    (a GGUF origin's `quantization_config` dropped); the tokenizer files as they were."""
    config = json.loads(files["config.json"])
    config.pop("quantization_config", None)
    config.update(
        vocab_size=mc.vocab_size,
        hidden_size=mc.d_model,
        intermediate_size=mc.ffn_dim,
        num_hidden_layers=mc.n_layer,
        num_attention_heads=mc.n_head,
        num_key_value_heads=mc.kv_heads,
        rms_norm_eps=mc.norm_eps,
        tie_word_embeddings=mc.tie_embeddings,
    )
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = "float32"
    out = {name: text for name, text in files.items() if name != "config.json"}
    out["config.json"] = json.dumps(config, indent=2) + "\n"
    if "json" in tokenizer:
        out["tokenizer.json"] = tokenizer["json"]
    return out


def tokenizer_files(tokenizer: dict) -> dict[str, str]:
    """tokenizer.json & co. for the checkpoint's tokenizer. The byte tokenizer becomes a
    byte-level BPE without merges whose id for each byte is the byte's value (and 256 for
    end-of-text), so Hugging Face encodes exactly as we do."""
    from data_pipeline.tokenizer import EOT_NAMES

    if tokenizer["name"] == "byte":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        byte_char = dict(enumerate(_bytes_to_unicode()))
        tok = Tokenizer(models.BPE(vocab={byte_char[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<|endoftext|>"])
        text, eot_name = tok.to_str(), "<|endoftext|>"
    else:
        text = tokenizer["json"]
        vocab = json.loads(text)
        added = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
        eot_name = next((n for n in EOT_NAMES if added.get(n) == tokenizer["eot"]), EOT_NAMES[0])
    special = {"bos_token": eot_name, "eos_token": eot_name, "unk_token": eot_name, "pad_token": eot_name}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    return {
        "tokenizer.json": text,
        "tokenizer_config.json": json.dumps(config, indent=1),
        "special_tokens_map.json": json.dumps(special, indent=1),
    }


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte → printable character table (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def lora_adapters(ckpt: Path, info: dict, base: str | None = None) -> tuple[LoraSection, dict[str, torch.Tensor]]:
    """A LoRA checkpoint's settings and adapters (fp32), after checking that its base (where
    it was trained, or `base`) is still the one it was trained on."""
    from trainer import hf, lora

    meta = info["lora"]
    base = base or meta["base"]
    settings = LoraSection(**{k: meta[k] for k in ("rank", "alpha", "dropout", "targets")})
    try:
        digest = hf.weights_sha256(base)
    except (hf.HFError, OSError, ValueError) as e:
        raise ExportError(
            f"cannot read the base model of {ckpt} at {base} ({e}): pass --base PATH to a copy of it"
        ) from None
    if digest != meta["base_sha256"]:
        raise ExportError(
            f"the base model {base} is not the one {ckpt} was trained on (its weights' sha256 differs): "
            "export against that base (--base PATH)"
        )
    names = list(lora.adapter_shapes(model_config(ckpt), settings))
    return settings, dict(model_tensors(ckpt, names))


def export(path: str | Path, out_dir: str | Path, lora_mode: str = "merged", base: str | None = None) -> Path:
    """Write the Hugging Face folder for a run's latest checkpoint (or a given one). A LoRA
    run's export is its base with the adapters merged in (`lora_mode="merged"`), or a PEFT
    adapter folder (`"adapter"`)."""
    from trainer.checkpoint import NoCheckpoint, find_checkpoint

    try:
        ckpt = find_checkpoint(path)
    except NoCheckpoint as e:
        raise ExportError(str(e)) from None
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder: choose a new output folder")
    info = checkpoint.meta(ckpt)
    mc = model_config(ckpt)
    if lora_mode not in ("merged", "adapter"):
        raise ExportError(f"--lora {lora_mode}: give merged (the default) or adapter")
    if lora_mode == "adapter" and "lora" not in info:
        raise ExportError(f"--lora adapter: {ckpt} has no LoRA adapters (its run did not set train.lora)")
    if base is not None and "lora" not in info:
        raise ExportError(f"--base: {ckpt} has no LoRA adapters; its checkpoint holds every weight")
    adapters = lora_adapters(ckpt, info, base) if "lora" in info else None
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if adapters is not None and lora_mode == "adapter":
            write_adapter(tmp, adapters, info)
        else:
            write_model_folder(tmp, ckpt, info, mc, adapters, base)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_model_folder(
    folder: Path, ckpt: Path, info: dict, mc: ModelConfig, adapters: tuple | None, base: str | None
) -> None:
    """config.json, model.safetensors, the tokenizer files and trainctl_export.json: the
    checkpoint's weights, or a LoRA run's base (at `base`, else where it was trained) with
    its adapters merged in."""
    shapes = weight_shapes(mc)
    if adapters is not None:  # the base's tensors, each with its adapters merged in
        from trainer import hf, lora

        settings, tensors = adapters
        index = hf.TensorIndex(base or info["lora"]["base"])
        source = ((n, lora.merged(n, index.read(hf_name(n)), tensors, settings)) for n in shapes)
    else:
        source = model_tensors(ckpt, list(shapes))
        rules = Rules.of(mc)
        if not rules.standard:  # mup / completep: the forward multipliers folded into the weights
            source = ((n, t * rules.export_scale(n, mc.head_dim)) for n, t in source)
    write_safetensors(
        folder / "model.safetensors", {hf_name(n): s for n, s in shapes.items()}, ((hf_name(n), t) for n, t in source)
    )
    eot = info["tokenizer"]["eot"]
    if info.get("hf_base"):  # started from a Hugging Face folder: its architecture and tokenizer files go back out
        files = base_folder_files(info["hf_base"]["files"], mc, info["tokenizer"])
    else:
        files = {
            "config.json": json.dumps(llama_config(mc, eot), indent=1) + "\n",
            "generation_config.json": json.dumps({"bos_token_id": eot, "eos_token_id": eot}, indent=1) + "\n",
            **tokenizer_files(info["tokenizer"]),
        }
    files["trainctl_export.json"] = (
        json.dumps(
            {
                "checkpoint": str(ckpt.resolve()),
                "step": info.get("step"),
                "tokens_seen": info.get("tokens_seen"),
                "run": info.get("name"),
                "tokenizer": info["tokenizer"],
            },
            indent=1,
        )
        + "\n"
    )
    for name, text in files.items():
        (folder / name).write_text(text)


def write_adapter(folder: Path, adapters: tuple[LoraSection, dict], info: dict) -> None:
    """A PEFT adapter folder: adapter_config.json, adapter_model.safetensors and the tokenizer."""
    from trainer import lora

    settings, tensors = adapters
    config, hf_tensors = lora.adapter_files(tensors, settings, info["lora"]["base"])
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    write_safetensors(
        folder / "adapter_model.safetensors",
        {n: list(t.shape) for n, t in hf_tensors.items()},
        iter(hf_tensors.items()),
    )
    files = {**info["hf_base"]["files"], "tokenizer.json": info["tokenizer"]["json"]}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if name in files:
            (folder / name).write_text(files[name])


def load_export(folder: Path) -> tuple[Transformer, dict]:
    """(our model in eval mode, its tokenizer dict) from an export folder, or any Hugging Face
    folder `model.init_from` takes."""
    from data_pipeline.tokenizer import build_tokenizer
    from trainer import hf

    fields = hf.model_fields(hf.hf_config(str(folder)), str(folder / "config.json"))
    fields.pop("sliding_window", None)
    model = hf.load_model(ModelConfig(**fields), str(folder))
    model.eval()
    info = folder / "trainctl_export.json"
    if info.is_file():
        return model, json.loads(info.read_text())["tokenizer"]
    return model, build_tokenizer(str(folder)).to_dict()
