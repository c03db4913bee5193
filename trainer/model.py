"""The transformer: a decoder-only language model in plain PyTorch, and its own small config.

Owns the architecture (RMSNorm pre-norm blocks, grouped-query attention with rotary
position embeddings, SwiGLU MLP, optionally tied output head), its initialisation, the
optimizer's parameter groups, the closed-form parameter count and sampling. How init,
forward multipliers and groups follow the shape is `model.parametrization`'s, whose rules
live in trainer/parametrization.py (torch-free) and are applied here. Its config,
`ModelConfig` (trainer/model_config.py, torch-free so the launcher validates a job without
importing torch), is the job file's `model:` section itself: one schema, so the two cannot
drift. It never sees the rest of the training config and imports nothing else of trainctl
but those two.

Shape letters: B batch, T sequence, C d_model, H query heads, K key/value heads,
D head_dim, F ffn_dim, V vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.model_config import ModelConfig
from trainer.parametrization import HIDDEN_MATRIX, RESIDUAL_OUTPUTS, Rules, kind_of


def document_segments(idx: torch.Tensor, eot: int) -> torch.Tensor:
    """A document number per token of idx (B, T): an end-of-text token closes its document.

    >>> document_segments(torch.tensor([[5, 9, 0, 7]]), eot=0).tolist()
    [[0, 0, 0, 1]]
    """
    ends = (idx == eot).long()  # (B, T)
    return ends.cumsum(dim=1) - ends  # (B, T): the count of documents closed before each token


def count_params(config: ModelConfig, non_embedding: bool = True) -> int:
    """Parameters of `Transformer(config)` without building it (a tied matrix counts once).

    >>> count_params(ModelConfig()) == Transformer(ModelConfig()).num_params()
    True
    """
    c = config
    attn = c.d_model * c.d_model * 2 + 2 * c.d_model * c.kv_heads * c.head_dim  # wq, wo; wk, wv
    if c.qkv_bias:
        attn += c.d_model + 2 * c.kv_heads * c.head_dim
    mlp = 3 * c.d_model * c.ffn_dim  # w1, w3, w2
    norms = 2 * c.d_model
    total = c.n_layer * (attn + mlp + norms) + c.d_model  # + final norm
    if non_embedding:
        return total
    embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return total + embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: bf16's mean of squares loses too much for wide d_model.
        xf = x.float()  # (..., C)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., C)
        return xf.type_as(x) * self.weight


def rope_table(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_seq_len, head_dim / 2): angle of pair i at position t."""
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-torch.arange(half, dtype=torch.float32) / half)  # (D/2,)
    if config.rope_scaling is not None:
        inv_freq = llama3_scaled(inv_freq, config.rope_scaling)
    t = torch.arange(config.max_seq_len, dtype=torch.float32)  # (T_max,)
    angles = torch.outer(t, inv_freq)  # (T_max, D/2)
    return angles.cos(), angles.sin()


def llama3_scaled(inv_freq: torch.Tensor, s) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: long wavelengths slowed by `factor`, short ones kept, the band
    between interpolated (as transformers' `_compute_llama3_parameters`)."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # (D/2,)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + D/2]) pair of x, (B, heads, T, D), by its position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, heads, T, D/2) each
    cos, sin = cos.float(), sin.float()  # (T, D/2), broadcast over B and heads
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, heads, T, D)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dropout = config.dropout
        self.scale = Rules.of(config).attention_scale(self.head_dim)  # None: 1/sqrt(D)
        bias = config.qkv_bias
        self.wq = nn.Linear(config.d_model, self.n_head * self.head_dim, bias=bias)
        self.wk = nn.Linear(config.d_model, self.n_kv_head * self.head_dim, bias=bias)
        self.wv = nn.Linear(config.d_model, self.n_kv_head * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=False)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_head != self.n_head:
            # Each K/V head serves n_head / n_kv_head consecutive query heads.
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)  # (B, H, T, D)
            v = v.repeat_interleave(rep, dim=1)  # (B, H, T, D)
        # mask (B, 1, T, T), True = may attend, already causal; None = plain causal (the fast kernels).
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None,
            scale=self.scale,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_drop(self.wo(y))  # (B, T, C)


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(config.d_model, config.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(config.ffn_dim, config.d_model, bias=False)  # down
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.w1(x)) * self.w3(x)  # (B, T, F)
        return self.resid_drop(self.w2(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.residual_scale = Rules.of(config).residual_scale  # completep: 1 / m_L

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.residual_scale == 1.0:  # no multiply at all: standard stays bit for bit, and as fast
            x = x + self.attn(self.attn_norm(x), cos, sin, mask)  # (B, T, C)
            return x + self.mlp(self.mlp_norm(x))  # (B, T, C)
        x = x + self.residual_scale * self.attn(self.attn_norm(x), cos, sin, mask)  # (B, T, C)
        return x + self.residual_scale * self.mlp(self.mlp_norm(x))  # (B, T, C)


class Transformer(nn.Module):
    """Decoder-only language model. For token ids idx and targets, both (B, T):

    model = Transformer(ModelConfig(n_layer=2))
    logits, loss = model(idx, targets)                      # (B, T, V), scalar
    out = model.eval().generate(idx, 20, temperature=0)     # (B, T + 20)
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Derived from the config, so kept out of the state dict: checkpoints stay portable
        # across max_seq_len and rope_theta changes.
        cos, sin = rope_table(config)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, D/2)
        rules = Rules.of(config)
        self.output_mult = rules.output_mult  # mup, completep: 1 / m_N
        self.apply(self._init_weights)
        # Then the matrices whose std is not init_std: under standard (GPT-2) the two output
        # projections each block adds to the residual stream, init_std / sqrt(2 * n_layer), so
        # its variance does not grow with depth; under mup and completep every hidden matrix.
        for name, p in self.named_parameters():
            if name.endswith(RESIDUAL_OUTPUTS) or not rules.standard and kind_of(name) == HIDDEN_MATRIX:
                nn.init.normal_(p, mean=0.0, std=rules.init_std_of(name))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        reduction: str = "mean",
    ):
        """Logits (B, T, V) for token ids (B, T); with targets (B, T), (logits, loss): the mean
        (or with reduction="sum" the sum) over the targets that are not -100.

        segments (B, T), optional: a document number per token; attention then stays
        within each document (document masking for packed sequences).
        """
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
        mask = None
        if segments is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
            mask = (segments[:, :, None] == segments[:, None, :]) & causal  # (B, T, T)
            mask = mask[:, None]  # (B, 1, T, T)
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, cos, sin, mask)  # (B, T, C)
        x = self.norm(x)  # (B, T, C)
        if self.output_mult != 1.0:
            x = x * self.output_mult  # (B, T, C): the logits' multiplier, before the head as nanoGPT-mup
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        # float32 softmax: in bf16 the log-sum-exp over V loses the small probabilities.
        loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), reduction=reduction)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the token embedding (and an untied head)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def optim_groups(self, weight_decay: float, lr: float = 1e-3, eps: float = 1e-8) -> list[dict]:
        """AdamW groups, each trainable tensor once. standard: two, matrices (embeddings
        included) decayed and vectors not, at the optimizer's own lr and eps; mup and
        completep: one group per kind of parameter with its own lr, weight decay and eps
        (trainer/parametrization.py), from the base values given here.

            torch.optim.AdamW(model.optim_groups(0.1, lr=1e-3), lr=1e-3)
        """
        return Rules.of(self.config).optim_groups(self.named_parameters(), lr, weight_decay, eps)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); returns (B, T + max_new_tokens),
        or fewer once every row has produced the `stop` token.

        temperature 0 picks the most likely token; top_k keeps the k most likely before
        sampling. Only the last max_seq_len tokens are fed back. No KV cache: each step
        re-runs the cropped context. Call model.eval() first, or dropout stays on.
        """
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k={top_k} must be positive")
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # (B,): rows that produced `stop`
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.max_seq_len :]  # (B, <=max_seq_len)
            logits = self(context)[:, -1, :].float()  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature  # (B, V)
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
                probs = F.softmax(logits, dim=-1)  # (B, V)
                next_id = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)  # (B, T + i + 1)
            if stop is not None:
                done |= next_id[:, 0] == stop  # (B,)
                if bool(done.all()):
                    break
        return idx
