"""Unit tier: model.parametrization (trainer/parametrization.py) against CompleteP's Table 1
and its reference code (EleutherAI/nanoGPT-mup, branch completep: model.py's Block and
configure_optimizers), standard left as GPT-2's, the multipliers folding into a standard
model, and the config's refusals."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.model import Transformer
from trainer.model_config import ModelConfig
from trainer.parametrization import Rules, kind_of

SHAPE = dict(vocab_size=64, n_head=4, max_seq_len=32)


def model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SHAPE, **kw}))


def groups_by_name(m: Transformer, lr=1e-3, wd=0.1, eps=1e-8) -> dict[str, dict]:
    return {g["name"]: g for g in m.optim_groups(wd, lr, eps)}


def test_completep_groups_and_multipliers_follow_the_reference():
    """d_model 128 on a base of 32 (m_N = 4), 8 layers on a base of 2 (m_L = 4), alpha = 1.
    nanoGPT-mup's configure_optimizers: width_lr_scaling = 1/m_N, depth_lr_scaling =
    m_L^(alpha-1) = 1; embeddings (lr_scale 1, wd), hidden LayerNorms (lr_scale depth, wd 0),
    hidden weights (lr_scale width*depth, wd / width_lr_scaling), hidden biases as the
    LayerNorms, the final norm (lr_scale 1, wd 0); its Block: x + m_L^-alpha * branch; its
    forward: logits of x * 1/m_N; attention 1/d_head; hidden init std / sqrt(m_N). Adam eps:
    the reference scales one global eps by 1/m_N * m_L^-alpha; here only the parameters
    inside the branches take the depth factor (their gradients alone carry m_L^-alpha)."""
    lr, wd, eps = 2e-3, 0.1, 1e-8
    m = model(d_model=128, n_layer=8, parametrization="completep", base_width=32, base_depth=2, qkv_bias=True)
    g = groups_by_name(m, lr, wd, eps)
    assert list(g) == ["embedding", "hidden_matrices", "hidden_vectors", "final_norm"]  # the tied head is the embedding
    width, depth = 1 / 4, 4 ** (1.0 - 1)
    expect = {
        "embedding": (lr * 1.0, wd, eps / 4),
        "hidden_matrices": (lr * width * depth, wd / width, eps / 4 / 4),
        "hidden_vectors": (lr * depth, 0.0, eps / 4 / 4),
        "final_norm": (lr * 1.0, 0.0, eps / 4),
    }
    for name, (want_lr, want_wd, want_eps) in expect.items():
        assert (g[name]["lr"], g[name]["weight_decay"]) == pytest.approx((want_lr, want_wd), rel=1e-12), name
        assert g[name]["eps"] == pytest.approx(want_eps, rel=1e-12), name
    # each trainable tensor exactly once, each in the group of its kind
    seen = [id(p) for grp in g.values() for p in grp["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters()) and len(seen) == len(set(seen))
    assert len(g["hidden_matrices"]["params"]) == 8 * 7 and len(g["hidden_vectors"]["params"]) == 8 * (2 + 3)
    # forward multipliers
    assert all(b.residual_scale == 0.25 for b in m.blocks) and m.output_mult == 0.25
    assert m.blocks[0].attn.scale == 1 / 32  # head_dim 32: muP's 1/d_head
    # init: hidden matrices (the residual outputs too: no GPT-2 depth term) std / sqrt(m_N); embedding std
    stds = {n: p.std().item() for n, p in m.named_parameters() if p.dim() == 2}
    for name, std in stds.items():
        want = 0.02 if name == "tok_emb.weight" else 0.02 / 2
        assert std == pytest.approx(want, rel=0.06), name


def test_an_untied_head_keeps_the_base_learning_rate_and_its_logits_shrink_with_width():
    m = model(d_model=64, n_layer=2, parametrization="mup", base_width=16, tie_embeddings=False)
    g = groups_by_name(m)
    assert list(g) == ["embedding", "hidden_matrices", "hidden_vectors", "final_norm", "head"]
    assert (g["head"]["lr"], g["head"]["weight_decay"], g["head"]["eps"]) == pytest.approx((1e-3, 0.1, 1e-8 / 4))
    # mup is width only: no branch multiplier, hidden eps without a depth factor, GPT-2's depth
    # term kept on the residual outputs (as Megatron-LM's use_mup)
    assert m.blocks[0].residual_scale == 1.0 and g["hidden_matrices"]["eps"] == pytest.approx(1e-8 / 4)
    std = dict(m.named_parameters())["blocks.0.attn.wo.weight"].std().item()
    assert std == pytest.approx(0.02 / 2 / math.sqrt(2 * 2), rel=0.1)


def test_standard_is_gpt2_as_before():
    """standard: two groups without their own lr or eps (the optimizer's), no multiplier
    anywhere (not even x1.0: the same kernels as before), GPT-2's init."""
    m = model(d_model=64, n_layer=6)
    decay, no_decay = m.optim_groups(0.1, 5e-3, 1e-6)
    assert set(decay) == {"params", "weight_decay"} and set(no_decay) == {"params", "weight_decay"}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert all(b.residual_scale == 1.0 and b.attn.scale is None for b in m.blocks) and m.output_mult == 1.0
    params = dict(m.named_parameters())
    assert params["blocks.2.mlp.w2.weight"].std().item() == pytest.approx(0.02 / math.sqrt(12), rel=0.1)
    assert params["blocks.2.mlp.w1.weight"].std().item() == pytest.approx(0.02, rel=0.06)
    # the same parametrization with its defaults named is the same model, bit for bit
    again = model(d_model=64, n_layer=6, parametrization="standard", init_std=0.02)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))


def test_at_the_base_shape_completep_differs_from_mup_only_in_the_residual_init():
    """m_N = m_L = 1: no multiplier but attention 1/D, the base settings in every group."""
    m = model(d_model=64, n_layer=4, parametrization="completep", base_width=64, base_depth=4)
    assert m.blocks[0].residual_scale == 1.0 and m.output_mult == 1.0
    assert {(g["lr"], g["eps"]) for g in m.optim_groups(0.1, 1e-3, 1e-8)} == {(1e-3, 1e-8)}


@pytest.mark.parametrize("parametrization", ["mup", "completep"])
def test_the_multipliers_fold_into_a_standard_model_with_the_same_logits(parametrization):
    """What export does: each weight times export_scale gives a standard model (Llama's
    forward) the parametrized model's logits."""
    kw = dict(d_model=64, n_layer=6, qkv_bias=True, parametrization=parametrization, base_width=16)
    if parametrization == "completep":
        kw["base_depth"] = 2
    ours = model(**kw).eval()
    with torch.no_grad():  # weights of every size, not the small init, so a missed factor shows
        for p in ours.parameters():
            p.normal_(0, 0.3)
    plain = Transformer(ModelConfig(**{**SHAPE, "d_model": 64, "n_layer": 6, "qkv_bias": True})).eval()
    rules, head_dim = Rules.of(ours.config), ours.config.head_dim
    plain.load_state_dict({n: t * rules.export_scale(n, head_dim) for n, t in ours.state_dict().items()})
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(idx), plain(idx)
    assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item()
    assert a.abs().max().item() > 0.3  # not a comparison of near-zero logits


def test_every_parameter_has_a_kind():
    m = model(d_model=32, n_layer=2, qkv_bias=True, tie_embeddings=False)
    kinds = {n: kind_of(n) for n, _ in m.named_parameters()}
    assert kinds["blocks.1.attn.wq.bias"] == "hidden_vectors" and kinds["blocks.1.mlp.w3.weight"] == "hidden_matrices"
    assert kinds["lm_head.weight"] == "head" and kinds["norm.weight"] == "final_norm"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.base_width=32"], "model.base_width applies only with model.parametrization mup or completep"),
        (["model.parametrization=mup", "model.base_depth=2"], "model.base_depth needs model.parametrization=completep"),
        (["model.parametrization=muP"], "model.parametrization='muP' is not allowed"),
        (["model.parametrization=completep", "model.base_depth=0"], "model.base_depth=0"),
        (["model.init_std=-1"], "model.init_std=-1"),
        (["train.eps=0"], "train.eps=0"),
    ],
)
def test_bad_parametrization_settings_are_one_line(overrides, message):
    from launcher.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_pretrained_model_is_not_reparametrized():
    with pytest.raises(ValueError, match="model.parametrization=completep cannot start from model.init_from"):
        ModelConfig(init_from="some/folder", parametrization="completep")


def test_a_resume_under_another_parametrization_is_refused(tmp_path):
    """The optimizer's groups and the multipliers follow the parametrization: a checkpoint
    of one is refused before launch by a job of another, naming both."""
    from launcher.config import load_config
    from launcher.job import UsageError, check_shapes

    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    saved = load_config(None, ["model.parametrization=completep", "model.base_depth=2"])
    (ckpt / "config.yaml").write_text(saved.to_yaml())
    check_shapes(saved, ckpt)  # the same job resumes
    for overrides, what in (
        ([], "model.parametrization=completep but this job has model.parametrization=standard"),
        (
            ["model.parametrization=completep", "model.base_depth=1"],
            "model.base_depth=2 but this job has model.base_depth=1",
        ),
    ):
        with pytest.raises(UsageError, match=what):
            check_shapes(load_config(None, overrides), ckpt)


def test_plan_shows_the_parametrization_and_each_groups_learning_rate():
    from launcher.config import load_config
    from launcher.plan import render_parametrization

    cfg = load_config(
        None,
        ["model.parametrization=completep", "model.d_model=256", "model.base_width=64", "model.n_layer=32",
         "model.base_depth=4", "train.lr=4e-3", "train.weight_decay=0.1"],
    )  # fmt: skip
    text = "\n".join(render_parametrization(cfg))
    assert (
        "completep (base 64 wide x 4 deep: width x4, depth x8; branches x0.125, logits x0.25, attention 1/64)" in text
    )
    assert "hidden_matrices    0.001       0.4" in text and "embedding          0.004       0.1" in text
    assert "head" not in text  # tied: in the embedding's group
    standard = "\n".join(render_parametrization(load_config(None, ["train.lr=4e-3"])))
    assert "parametrization     standard" in standard and "matrices           0.004" in standard
