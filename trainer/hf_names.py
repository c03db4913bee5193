"""Our parameter names and Hugging Face's (Llama's, which Mistral and Qwen2 share), in one
place: loading a folder's weights (trainer/hf.py), LoRA's targets and PEFT adapter files
(trainer/config.py, trainer/lora.py) and `trainctl export` (trainer/export.py) all read
these tables. Imports nothing: torch-free, below every module that uses it.
"""

from __future__ import annotations

# A block's layers: ours → Llama's (under model.layers.N).
BLOCK_LAYERS = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w3": "mlp.up_proj",
    "mlp.w2": "mlp.down_proj",
}

# The parameters outside the blocks: ours → Llama's.
TOP_LEVEL = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# LoRA targets by their Hugging Face names (what fine-tuners know) → trainctl's layer names,
# the block's linear layers in order: q_proj wq, k_proj wk, v_proj wv, o_proj wo, gate_proj w1,
# up_proj w3, down_proj w2.
LORA_TARGETS = {hf.rsplit(".", 1)[1]: ours.rsplit(".", 1)[1] for ours, hf in BLOCK_LAYERS.items() if "." in ours}


def hf_name(name: str) -> str:
    """Our parameter name → Llama's.

    >>> hf_name("blocks.3.mlp.w1.weight")
    'model.layers.3.mlp.gate_proj.weight'
    """
    parts = name.split(".")
    if parts[0] == "blocks":
        inner = ".".join(parts[2:-1])
        return f"model.layers.{parts[1]}.{BLOCK_LAYERS[inner]}.{parts[-1]}"
    return TOP_LEVEL[name]
