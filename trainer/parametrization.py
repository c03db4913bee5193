"""How the model's shape sets its initialisation, its forward multipliers and each
optimizer group's learning rate, weight decay and AdamW epsilon: `model.parametrization`.

Hyperparameters (train.lr, train.weight_decay, train.eps, model.init_std) are tuned on a
proxy of `model.base_width` x `model.base_depth`; with m_N = d_model / base_width and
m_L = n_layer / base_depth the rules below keep their optimum where it was as the model
grows. Torch-free arithmetic on parameter names: `trainer/model.py` applies the init and
the multipliers, `trainer/engine.py` the groups, `trainer/export.py` folds the
multipliers into the weights, `trainctl plan` prints them.

standard   GPT-2's: every matrix N(0, init_std), the two residual output projections
           (wo, w2) init_std / sqrt(2 * n_layer); one learning rate; attention 1/sqrt(D).
mup        width (Yang et al., Tensor Programs V; as EleutherAI/nanoGPT-mup's `mup` and
           Megatron-LM's `use_mup`): hidden matrices init_std / sqrt(m_N) (wo, w2 keep
           GPT-2's 1/sqrt(2 * n_layer) on top, as Megatron-LM does), their Adam learning
           rate lr / m_N and weight decay wd * m_N (so lr * wd, AdamW's decay per step, stays
           put); logits * 1/m_N; attention 1/D.
completep  width and depth (Dey et al., "Don't be lazy: CompleteP enables compute-efficient
           deep transformers", NeurIPS 2025, Table 1 with alpha = 1; as nanoGPT-mup's
           `completep` branch): mup's width rules, each residual branch scaled by
           m_L^-alpha (x + m_L^-1 * f(x)), hidden matrices init_std / sqrt(m_N) with no depth
           term (the branch multiplier carries depth), hidden learning rates * m_L^(alpha-1)
           (= 1 at alpha = 1).

AdamW epsilon follows the gradients it is added to (Adam divides by sqrt(v) + eps, so an
eps that does not shrink with the gradients takes over the update): with the logit
multiplier 1/m_N every gradient entry scales as 1/m_N, and inside a residual branch also
as m_L^-alpha. So eps * 1/m_N for every group, and * m_L^-alpha for the parameters inside
the branches only (hidden matrices, block norms, q/k/v biases). nanoGPT-mup's completep
branch scales one global eps by both, the embedding and final norm included, whose
gradients have no depth factor; Megatron-LM's depth-muP (PR #4999) scales the hidden
eps by depth alone. Under `standard` train.eps is used as it is, for every group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PARAMETRIZATIONS = ("standard", "mup", "completep")
ALPHA = 1.0  # CompleteP's depth exponent: branches scaled by m_L^-alpha

# Parameter kinds, by where they sit; the groups in this order (the first is the base
# learning rate's own group: the learning rate trainctl logs is group 0's).
EMBEDDING, HIDDEN_MATRIX, HIDDEN_VECTOR, FINAL_NORM, HEAD = (
    "embedding",
    "hidden_matrices",
    "hidden_vectors",
    "final_norm",
    "head",
)
KINDS = (EMBEDDING, HIDDEN_MATRIX, HIDDEN_VECTOR, FINAL_NORM, HEAD)
RESIDUAL_OUTPUTS = ("attn.wo.weight", "mlp.w2.weight")
BLOCK_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the projections that write into the stream


def kind_of(name: str) -> str:
    """The kind of one of `Transformer`'s parameters, by its name.

    >>> kind_of("blocks.3.mlp.w1.weight"), kind_of("blocks.0.attn_norm.weight")
    ('hidden_matrices', 'hidden_vectors')
    """
    if name.startswith("blocks."):
        *_, layer, what = name.split(".")
        return HIDDEN_MATRIX if what == "weight" and layer in BLOCK_MATRICES else HIDDEN_VECTOR
    return {"tok_emb.weight": EMBEDDING, "norm.weight": FINAL_NORM, "lm_head.weight": HEAD}[name]


@dataclass(frozen=True)
class Rules:
    """One model shape's rules. `Rules.of(model_config)`; m_N and m_L are 1 under standard."""

    parametrization: str = "standard"
    init_std: float = 0.02
    n_layer: int = 1
    width_mult: float = 1.0  # m_N = d_model / base_width
    depth_mult: float = 1.0  # m_L = n_layer / base_depth

    @classmethod
    def of(cls, mc) -> Rules:
        """The rules of a `ModelConfig` (its parametrization, base_width, base_depth, init_std)."""
        p = mc.parametrization
        return cls(
            parametrization=p,
            init_std=mc.init_std,
            n_layer=mc.n_layer,
            width_mult=mc.d_model / mc.base_width if p != "standard" and mc.base_width else 1.0,
            depth_mult=mc.n_layer / mc.base_depth if p == "completep" and mc.base_depth else 1.0,
        )

    @property
    def standard(self) -> bool:
        return self.parametrization == "standard"

    # Forward multipliers.
    @property
    def residual_scale(self) -> float:
        """Each residual branch's multiplier: x + scale * f(x)."""
        return self.depth_mult**-ALPHA if self.parametrization == "completep" else 1.0

    @property
    def output_mult(self) -> float:
        """The logits' multiplier (applied to the final norm's output)."""
        return 1.0 if self.standard else 1.0 / self.width_mult

    def attention_scale(self, head_dim: int) -> float | None:
        """q.k's multiplier: None for scaled_dot_product_attention's own 1/sqrt(D) (standard),
        else muP's 1/D (attention logits of aligned q and k stay O(1) as D grows)."""
        return None if self.standard else 1.0 / head_dim

    # Initialisation.
    def init_std_of(self, name: str) -> float:
        """The standard deviation a weight matrix is drawn with (vectors: norms are ones, biases zeros)."""
        kind = kind_of(name)
        if kind != HIDDEN_MATRIX:
            return self.init_std
        std = self.init_std / math.sqrt(self.width_mult)
        if self.parametrization != "completep" and name.endswith(RESIDUAL_OUTPUTS):
            std /= math.sqrt(2 * self.n_layer)  # GPT-2's depth rule; CompleteP's branch multiplier replaces it
        return std

    # The optimizer's groups.
    def group_settings(self, kind: str, lr: float, weight_decay: float, eps: float) -> dict:
        """lr, weight_decay and eps of one kind's AdamW group under these rules."""
        in_branch = kind in (HIDDEN_MATRIX, HIDDEN_VECTOR)
        depth_lr = self.depth_mult ** (ALPHA - 1) if in_branch and self.parametrization == "completep" else 1.0
        depth_eps = self.residual_scale if in_branch else 1.0
        if kind == HIDDEN_MATRIX:
            return {
                "lr": lr / self.width_mult * depth_lr,
                "weight_decay": weight_decay * self.width_mult,
                "eps": eps / self.width_mult * depth_eps,
            }
        decays = kind in (EMBEDDING, HEAD)
        return {
            "lr": lr * depth_lr,
            "weight_decay": weight_decay if decays else 0.0,
            "eps": eps / self.width_mult * depth_eps,
        }

    def optim_groups(self, named_params, lr: float, weight_decay: float, eps: float) -> list[dict]:
        """AdamW parameter groups for (name, parameter) pairs (trainable ones only; a tied
        head once, as the embedding). standard: two groups as GPT-2 trains them, matrices
        decayed and vectors not, taking the optimizer's own lr and eps; otherwise one group
        per kind with its own lr, weight_decay and eps, named, the embedding's first."""
        params = [(n, p) for n, p in named_params if p.requires_grad]
        if self.standard:
            return [
                {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
        groups = []
        for kind in KINDS:
            members = [p for n, p in params if kind_of(n) == kind]
            if members:
                groups.append({"params": members, "name": kind, **self.group_settings(kind, lr, weight_decay, eps)})
        return groups

    def export_scale(self, name: str, head_dim: int) -> float:
        """What a weight is multiplied by when the multipliers are folded into it (export to
        a standard Llama): the branch scale into wo and w2, the attention scale (relative to
        1/sqrt(D)) into wq and its bias, the logit multiplier into the final norm."""
        scale = 1.0
        if name.endswith(RESIDUAL_OUTPUTS):
            scale *= self.residual_scale
        if name.endswith(("attn.wq.weight", "attn.wq.bias")) and not self.standard:
            scale *= self.attention_scale(head_dim) * math.sqrt(head_dim)
        if name == "norm.weight":
            scale *= self.output_mult
        return scale

    def describe(self, lr: float, weight_decay: float, eps: float) -> list[tuple[str, dict]]:
        """(kind, its group's settings) for every kind, for `trainctl plan`."""
        if self.standard:
            return [
                ("matrices", {"lr": lr, "weight_decay": weight_decay, "eps": eps}),
                ("vectors", {"lr": lr, "weight_decay": 0.0, "eps": eps}),
            ]
        return [(kind, self.group_settings(kind, lr, weight_decay, eps)) for kind in KINDS]
