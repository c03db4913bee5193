"""The transformer's shape, `ModelConfig`: the one schema of a job file's `model:` section
and of `trainer.model.Transformer`. Torch-free, so the launcher validates a job without
importing torch."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RopeScaling(BaseModel):
    """Llama 3's RoPE frequency scaling (`rope_scaling` with rope_type llama3 in config.json)."""

    model_config = ConfigDict(extra="forbid")

    factor: float = Field(gt=0)
    low_freq_factor: float = Field(gt=0)
    high_freq_factor: float = Field(gt=0)
    original_max_position_embeddings: int = Field(gt=0)


class ModelConfig(BaseModel):
    """The transformer's shape: the `model:` section of a job file, validated once, at load."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    init_from: str | None = Field(
        None,
        description="a Hugging Face model folder or URL (config.json, *.safetensors, tokenizer.json) to start "
        "from: its config.json sets the fields below and its tokenizer becomes data.tokenizer",
    )
    vocab_size: int = Field(
        257,
        gt=0,
        description="embedding rows; must be >= the tokenizer's vocabulary (257 = 256 bytes + one end-of-text token)",
    )
    n_layer: int = Field(4, gt=0, description="transformer blocks")
    n_head: int = Field(4, gt=0, description="query heads")
    n_kv_head: int | None = Field(None, gt=0, description="key/value heads (grouped-query attention); null = n_head")
    d_model: int = Field(128, gt=0, description="residual stream width")
    # None = 8/3 * d_model rounded up to a multiple of 64, which keeps the MLP's three
    # matrices at about the parameter count of a 4 * d_model GELU MLP.
    d_ff: int | None = Field(None, gt=0, description="SwiGLU hidden size; null = about 8/3 * d_model")
    max_seq_len: int = Field(256, gt=0, description="longest context the model accepts (RoPE table size)")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base: the longest rotation wavelength grows with it")
    rope_scaling: RopeScaling | None = Field(None, description="Llama 3 RoPE frequency scaling; null = none")
    norm_eps: float = Field(1e-5, gt=0, description="added to the RMS before dividing")
    qkv_bias: bool = Field(False, description="biases on the query, key and value projections (Qwen2)")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="on attention weights and on each block's two residual branches"
    )
    tie_embeddings: bool = Field(True, description="share the input embedding with the output head")
    activation_checkpointing: bool = Field(False, description="recompute each block in backward to save memory")
    parametrization: Literal["standard", "mup", "completep"] = Field(
        "standard",
        description="how init, forward multipliers and per-group learning rate, weight decay and AdamW eps follow "
        "the shape (trainer/parametrization.py): standard (GPT-2's; one learning rate), mup (width: "
        "hyperparameters tuned at base_width transfer), completep (width and depth: tuned at base_width x "
        "base_depth, they transfer to deeper models)",
    )
    base_width: int | None = Field(
        None, gt=0, description="mup, completep: the d_model the hyperparameters were tuned at; null = d_model"
    )
    base_depth: int | None = Field(
        None, gt=0, description="completep: the n_layer the hyperparameters were tuned at; null = n_layer"
    )
    init_std: float = Field(
        0.02, gt=0, description="standard deviation of the weights' initialisation (at the base shape)"
    )

    @model_validator(mode="after")
    def _shape(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"model.n_head={self.n_head} must divide model.d_model={self.d_model}")
        if self.head_dim % 2:
            raise ValueError(
                f"model.d_model / model.n_head = {self.head_dim} must be even (rotary embeddings rotate pairs)"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_kv_head={self.kv_heads} must divide model.n_head={self.n_head}")
        p = self.parametrization
        if p == "standard" and (self.base_width or self.base_depth):
            key = "base_width" if self.base_width else "base_depth"
            raise ValueError(
                f"model.{key} applies only with model.parametrization mup or completep (standard has no base shape): "
                f"set model.parametrization=completep, or drop model.{key}"
            )
        if p == "mup" and self.base_depth:
            raise ValueError("model.base_depth needs model.parametrization=completep (mup transfers across width only)")
        if p != "standard" and self.init_from:
            raise ValueError(
                f"model.parametrization={p} cannot start from model.init_from: a pre-trained model's weights "
                "were trained under the standard parametrization; drop one of them"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """n_kv_head resolved: the number of key/value heads."""
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        """d_ff resolved: the SwiGLU hidden size."""
        if self.d_ff is not None:
            return self.d_ff
        return 64 * math.ceil(int(8 * self.d_model / 3) / 64)
