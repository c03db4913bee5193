"""Unit tier: the transformer on a CPU (shapes, causality, parameter counts, learning, sampling)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.model import ModelConfig, Transformer, apply_rope, count_params, document_segments, rope_table

TINY = dict(vocab_size=64, n_layer=2, n_head=4, d_model=32, max_seq_len=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread for these tiny models (set back after the module): on 2 cores
    beside a busy process, two threads made test_overfits_one_batch's 100 steps take 46-74 s
    (each parallel region waiting for a descheduled thread), one thread well under a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**TINY, **overrides}))


def tokens(B: int, T: int, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_initial_loss():
    model = tiny(vocab_size=257, n_layer=4)
    idx, targets = tokens(3, 16, 257), tokens(3, 16, 257, seed=2)
    logits = model(idx)
    assert logits.shape == (3, 16, 257)
    logits2, loss = model(idx, targets)
    assert logits2.shape == (3, 16, 257)
    assert loss.shape == () and loss.dtype == torch.float32
    # Small init: near-uniform predictions, so the loss is about ln(V).
    assert abs(loss.item() - math.log(257)) < 0.3


def test_attention_is_causal():
    model = tiny().eval()
    idx = tokens(2, 20)
    t = 11
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 64
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t], b[:, t], atol=1e-4)


def test_grouped_query_attention_has_fewer_params():
    mha, gqa = tiny(), tiny(n_kv_head=2)
    out = gqa(tokens(2, 8))
    assert out.shape == (2, 8, 64) and torch.isfinite(out).all()
    assert gqa.num_params() < mha.num_params()
    # wk and wv shrink from d_model x d_model to d_model x (2 * head_dim) in each layer.
    head_dim = 32 // 4
    assert mha.num_params() - gqa.num_params() == 2 * 2 * 32 * (32 - 2 * head_dim)
    assert gqa.num_params() == count_params(gqa.config)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"n_kv_head": 2},
        {"n_kv_head": 1, "tie_embeddings": False},
        {"d_ff": 100},
        {"n_layer": 3, "d_model": 48, "n_head": 6, "n_kv_head": 3, "d_ff": 96, "vocab_size": 101},
    ],
    ids=["tied", "untied", "gqa", "mqa-untied", "d_ff", "mixed"],
)
@pytest.mark.parametrize("non_embedding", [True, False])
def test_count_params_matches_model(overrides, non_embedding):
    model = tiny(**overrides)
    assert count_params(model.config, non_embedding) == model.num_params(non_embedding)


def test_num_params_embedding_accounting():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    embedding = 64 * 32
    assert tied.num_params() == untied.num_params()
    assert tied.num_params(False) == tied.num_params() + embedding
    assert untied.num_params(False) == untied.num_params() + 2 * embedding


def test_default_ffn_dim_rounds_up_to_64():
    assert ModelConfig(d_model=128).ffn_dim == 384  # int(341.3) = 341 -> 384
    assert ModelConfig(d_model=768, n_head=12).ffn_dim == 2048  # exactly 2048
    assert ModelConfig(d_ff=100).ffn_dim == 100


@pytest.mark.parametrize("tie", [True, False])
def test_optim_groups_cover_each_param_once(tie):
    model = tiny(tie_embeddings=tie, n_kv_head=2)
    decay, no_decay = model.optim_groups(0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params(False)
    # 2 norms per block + the final norm, each one weight vector.
    assert len(no_decay["params"]) == 2 * 2 + 1


def test_rope_is_a_rotation_that_sees_relative_position():
    cos, sin = rope_table(ModelConfig(d_model=64, n_head=4, max_seq_len=32))  # (32, 8) each
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 32, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 32, 16)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (1, 1, 32, 16): same vector at every position
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rq[..., 0, :], q[..., 0, :])  # position 0 is not rotated
    # The score between positions i and j depends only on i - j.
    scores = rq[0, 0] @ rk[0, 0].T  # (32, 32)
    for offset in (0, 3, 17):
        diagonal = torch.diagonal(scores, offset=-offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores[5, 0], scores[5, 4], atol=1e-3)


def test_rope_tables_stay_out_of_the_state_dict():
    model = tiny()
    assert not any("rope" in k for k in model.state_dict())
    fresh = tiny(max_seq_len=64)  # a longer context loads the same weights
    fresh.load_state_dict(model.state_dict())


@pytest.mark.timeout(120)
def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, "d_model": 64}))
    idx = torch.randint(0, 64, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]  # (4, 32) each
    opt = torch.optim.AdamW(model.optim_groups(0.0), lr=3e-3)
    first = None
    for _ in range(100):
        _, loss = model(x, y)
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _, loss = model(x, y)
    assert first > 3.5
    assert loss.item() < 0.5


def test_activation_checkpointing_matches_plain():
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    results = []
    for ckpt in (False, True):
        model = tiny(activation_checkpointing=ckpt).train()
        _, loss = model(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_dropout_only_while_training():
    model = tiny(dropout=0.5)
    idx = tokens(2, 8)
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_generate_shapes_greedy_and_top_k():
    model = tiny().eval()
    prompt = tokens(2, 5)
    greedy = model.generate(prompt, 10, temperature=0)
    assert greedy.shape == (2, 15) and greedy.dtype == torch.long
    assert torch.equal(greedy[:, :5], prompt)
    assert torch.equal(model.generate(prompt, 10, temperature=0), greedy)
    top1 = model.generate(prompt, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, greedy)


def test_generate_sampling_is_seeded_and_crops_context():
    model = tiny(max_seq_len=8).eval()
    prompt = tokens(1, 6)
    runs = [model.generate(prompt, 12, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0].shape == (1, 18)  # longer than max_seq_len: the context is cropped
    assert torch.equal(runs[0], runs[1])
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < 64


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"d_model": 130, "n_head": 4}, "n_head"),
        ({"n_head": 4, "n_kv_head": 3}, "n_kv_head"),
        ({"d_model": 12, "n_head": 4}, "d_model"),  # head_dim 3 is odd
        ({"vocab_size": 0}, "vocab_size"),
        ({"n_layer": -1}, "n_layer"),
        ({"n_head": 0}, "n_head"),
        ({"n_kv_head": 0}, "n_kv_head"),
        ({"d_model": 0}, "d_model"),
        ({"d_ff": 0}, "d_ff"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"dropout": 1.0}, "dropout"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = tiny(max_seq_len=16)
    model(tokens(1, 16))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(tokens(1, 17))


def test_document_segments_close_at_end_of_text():
    idx = torch.tensor([[3, 256, 4, 5, 256, 256, 6], [1, 2, 3, 4, 5, 6, 7]])
    assert document_segments(idx, 256).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0] * 7]


def test_document_masking_makes_each_document_see_only_itself():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=2, d_model=64, n_head=4, max_seq_len=32)).eval()
    first, second = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 12))
    packed = torch.cat([first, torch.tensor([[256]]), second], dim=1)  # (1, 22): doc, end-of-text, doc
    masked = model(packed, segments=document_segments(packed, 256))  # (1, 22, V)
    alone = model(second)  # (1, 12, V): the second document from position 0
    # RoPE sees only relative positions, so inside its own document the second one is unchanged.
    assert torch.allclose(masked[:, 10:], alone, atol=1e-4)
    assert not torch.allclose(model(packed)[:, 10:], alone, atol=1e-2)  # without the mask it sees the first
    assert torch.allclose(masked[:, :10], model(packed)[:, :10], atol=1e-5)  # the first document is causal either way
    logits, loss = model(packed[:, :-1], packed[:, 1:], document_segments(packed[:, :-1], 256))
    assert logits.shape == (1, 21, 257) and torch.isfinite(loss)
