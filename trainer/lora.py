"""LoRA: low-rank adapters on a frozen pre-trained model (`train.lora`), through `peft`.

`apply` puts peft's LoRA layers on the targeted linear layers of a `Transformer` (peft's
`inject_adapter_in_model`: it works on any torch module, and its layers are plain modules
DeepSpeed ZeRO 0-3 partitions like any other) and freezes everything else, so the optimizer
holds state for the adapters only and checkpoints save them alone (DeepSpeed's
`exclude_frozen_parameters`), with the base's path and a hash of its weights beside them.
Export merges W + (alpha / r) B A into each targeted weight (`merged`), or writes the
adapters as a PEFT adapter folder that `peft` loads onto the base (`adapter_files`).

Parameter names: the base weight of a targeted layer becomes `...attn.wq.base_layer.weight`,
its adapters `...attn.wq.lora_A.default.weight` (r, in) and `...lora_B.default.weight` (out, r).
"""

from __future__ import annotations

import re

import torch

from trainer.config import LoraSection
from trainer.hf_names import LORA_TARGETS, hf_name

ADAPTER = re.compile(r"^(?P<layer>.+)\.lora_(?P<ab>[AB])\.default\.weight$")


def apply(model: torch.nn.Module, lora: LoraSection) -> torch.nn.Module:
    """`model` with adapters on `lora.targets`, everything else frozen (in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=[LORA_TARGETS[t] for t in lora.targets],
        bias="none",
    )
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = ADAPTER.match(name) is not None
    if model.config.tie_embeddings:
        # DeepSpeed's exclude_frozen_parameters drops frozen weights by named_parameters(), which
        # names a tied weight once: the head's alias (the whole embedding) would stay in checkpoints.
        model.lm_head.register_state_dict_post_hook(_drop_tied_head)
    return model


def _drop_tied_head(module, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(f"{prefix}weight", None)


def adapter_shapes(mc, lora: LoraSection) -> dict[str, list[int]]:
    """The adapters' names and shapes for a model config, without building the model."""
    from trainer.model import Transformer

    with torch.device("meta"):
        model = apply(Transformer(mc), lora)
    return {n: list(p.shape) for n, p in model.named_parameters() if ADAPTER.match(n)}


def merged(name: str, weight: torch.Tensor, adapters: dict, lora: LoraSection) -> torch.Tensor:
    """`weight` (our name `name`, without adapters) with its adapters merged in, if it has any."""
    layer = name.removesuffix(".weight")
    a, b = adapters.get(f"{layer}.lora_A.default.weight"), adapters.get(f"{layer}.lora_B.default.weight")
    if a is None:
        return weight
    return weight + (lora.alpha / lora.rank) * (b.float() @ a.float())  # (out, r) @ (r, in)


def adapter_files(adapters: dict[str, torch.Tensor], lora: LoraSection, base: str) -> tuple[dict, dict]:
    """(adapter_config.json's dict, adapter_model.safetensors' tensors) in PEFT's layout for
    the Hugging Face model of `base`: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`."""
    from peft import LoraConfig

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
        inference_mode=True,
    ).to_dict()
    config["peft_type"], config["task_type"] = "LORA", "CAUSAL_LM"
    config["target_modules"] = sorted(config["target_modules"])
    tensors = {}
    for name, t in adapters.items():
        m = ADAPTER.match(name)
        hf_layer = hf_name(f"{m['layer']}.weight").removesuffix(".weight")
        tensors[f"base_model.model.{hf_layer}.lora_{m['ab']}.weight"] = t.float().contiguous()
    return config, tensors
