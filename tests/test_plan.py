"""`trainctl plan` against parameter counts, FLOPs and memory worked out by hand."""

from __future__ import annotations

import pytest
from cli_helpers import REPO, trainctl, trainctl_here

from launcher.config import load_config
from launcher.plan import GIB, fit_warning, make_plan
from trainer import perf


def test_gpt2_124m_by_hand():
    cfg = load_config(REPO / "configs" / "gpt2-124m.yaml")
    p = make_plan(cfg, mfu=0.4)
    # per block: wq, wo 768x768; wk, wv 768x768 (12 kv heads of 64); SwiGLU 3 x 768x2048; two norms
    block = 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768
    assert block == 7_079_424
    assert p.params == 12 * block + 768 + 50304 * 768 == 123_587_328  # tied head counted once
    assert p.non_embedding == 84_953_856
    matmul = 12 * (4 * 768 * 768 + 3 * 768 * 2048) + 50304 * 768  # the tied head still multiplies
    assert p.flops_per_token == 6 * matmul + 12 * 12 * 768 * 1024 == 854_654_976
    assert p.tokens_per_step == 512 * 1024
    # ZeRO-2, bf16, 8 GPUs: 2 bytes of weights whole, 2 of gradients + 12 of Adam split 8 ways
    states = 2 * 123_587_328 + (2 + 12) * 123_587_328 // 8
    acts = 12 * 1024 * 32 * (6 * 768 + 2 * 768 + 3 * 2048) * 2 + 1024 * 32 * 50304 * (2 + 4)  # micro batch 32
    zero2 = next(m for m in p.memory if m.stage == 2 and not m.offload)
    assert zero2.gpu_bytes == states + acts
    assert p.step_seconds == pytest.approx(854_654_976 * 524_288 / (8 * 989e12 * 0.4))


def test_llama_1b_by_hand_and_what_fits():
    cfg = load_config(
        REPO / "configs" / "llama-1b.yaml",
        ["model.activation_checkpointing=true", "train.zero_stage=3", "train.micro_batch_size=4"],
    )
    p = make_plan(cfg, mfu=0.5)
    # grouped-query attention: 8 kv heads of 64 = 512 wide; SwiGLU 8192; untied head
    block = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    assert p.params == 16 * block + 2048 + 2 * 128256 * 2048 == 1_498_482_688
    matmul = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) + 128256 * 2048
    assert p.flops_per_token == 6 * matmul + 12 * 16 * 2048 * 2048
    # activation checkpointing: each block keeps its input; one block's full set at a time
    acts = 16 * 2048 * 4 * 2048 * 2 + 2048 * 4 * (6 * 2048 + 2 * 512 + 3 * 8192) * 2 + 2048 * 4 * 128256 * 6
    assert p.activation_bytes == acts
    zero3 = next(m for m in p.memory if m.stage == 3 and not m.offload)
    assert zero3.gpu_bytes == 16 * 1_498_482_688 // 16 + acts

    small = make_plan(cfg, mfu=0.5, gpu_memory_gb=12)  # ZeRO-0/1 do not fit 12 GiB, ZeRO-2 (10.96 GiB) does
    assert not small.fits(1, False) and small.fits(2, False) and small.smallest_fit().stage == 2
    tiny = make_plan(cfg, mfu=0.5, gpu_memory_gb=4)
    assert tiny.smallest_fit() is None and zero3.gpu_bytes > 4 * GIB


def test_plan_command_and_the_fit_warning(tmp_path):
    small = [
        "model.activation_checkpointing=true",
        "train.micro_batch_size=4",
        "cluster.gpu_memory_gb=12",
        "train.zero_stage=1",
    ]
    r = trainctl("plan", "configs/llama-1b.yaml", *small, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "parameters          1,498,482,688 (973,146,112 without embeddings)" in r.stdout
    assert "ZeRO-1              13.58 GiB                   too big <- this job" in r.stdout
    assert r.stdout.strip().endswith("verdict: the smallest ZeRO stage that fits is ZeRO-2")
    cfg = load_config(REPO / "configs" / "llama-1b.yaml", small)
    assert fit_warning(cfg) == (
        "this job needs about 13.58 GiB per GPU at ZeRO-1 but cluster.gpu_memory_gb is 12: "
        "ZeRO-2 fits (see `trainctl plan`)"
    )
    assert fit_warning(load_config(REPO / "configs" / "llama-1b.yaml")) is None
    assert fit_warning(load_config(REPO / "configs" / "tiny-cpu.yaml")) is None  # CPU jobs declare no GPU memory


def test_llama3_8b_sft_fits_full_and_with_lora():
    """The shipped 8B fine-tuning config: every weight trained at ZeRO-3 on 8 H100s fits, and
    LoRA (all linear layers, rank 16: peft's 41,943,040 adapters for this shape) needs a
    fraction of it, its FLOPs without the frozen weights' gradients."""
    path = REPO / "configs" / "llama3-8b-sft.yaml"
    full = make_plan(load_config(path, model_folder_optional=True), mfu=0.4)
    assert full.params == 8_030_261_248 and full.fits(3, False)
    lora = load_config(path, ["train.lora={rank: 16, alpha: 32, targets: all-linear}"], model_folder_optional=True)
    assert perf.lora_params(lora.model, lora.train.lora) == 41_943_040
    small = make_plan(lora, mfu=0.4)
    z3 = next(m for m in small.memory if (m.stage, m.offload) == (3, False))
    full_z3 = next(m for m in full.memory if (m.stage, m.offload) == (3, False))
    assert small.fits(0, False) and z3.gpu_bytes < 0.5 * full_z3.gpu_bytes
    assert small.flops_per_token < 0.75 * full.flops_per_token


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--mfu", "0"], "--mfu 0 is out of range: give a positive number up to 1"),
        (["--mfu", "1.5"], "--mfu 1.5 is out of range"),
        (["--gpu-memory-gb", "-1"], "--gpu-memory-gb -1 is out of range"),
        (["model.n_layer=0"], "model.n_layer"),
    ],
)
def test_plan_bad_input_is_one_line_exit_2(args, fragment):
    # in this process, but one case as the real command (its exit status and whole stderr)
    if args == ["model.n_layer=0"]:
        r = trainctl("plan", "configs/gpt2-124m.yaml", *args, cwd=REPO, timeout=120)
    else:
        r = trainctl_here("plan", "configs/gpt2-124m.yaml", *args, cwd=REPO)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr, r.stderr


def test_scaling_model_by_hand():
    from launcher.plan import NIC_BYTES_S, NVLINK_BYTES_S, comm_bytes, scaling

    cfg = load_config(REPO / "configs" / "llama-1b.yaml")  # global batch 512, micro batch 8, bf16
    P = 1_498_482_688
    # 8 GPUs: 64 sequences each = 8 micro batches; ZeRO-2 reduce-scatters each one's gradients
    # (8 x 7/8 P x 2 bytes) and all-gathers the weights once (7/8 P x 2); ZeRO-1 reduces once
    z2, z1 = scaling(cfg, 0.5, 8, 2), scaling(cfg, 0.5, 8, 1)
    assert z2.accum == 8 and z2.comm_bytes == int(9 * 7 / 8 * P * 2) and z1.comm_bytes == int(2 * 7 / 8 * P * 2)
    assert z2.comm_s == pytest.approx(z2.comm_bytes / NVLINK_BYTES_S)
    assert z2.compute_s == pytest.approx(perf.flops_per_token(cfg.model, 2048) * 64 * 2048 / (989e12 * 0.5))
    # 64 GPUs: 8 sequences each (one micro batch), across nodes: each GPU's NIC
    z3 = scaling(cfg, 0.5, 64, 3)
    assert z3.accum == 1 and z3.comm_bytes == comm_bytes(P, 3, 64, 1) == int(3 * 63 / 64 * P * 2)
    assert z3.comm_s == pytest.approx(z3.comm_bytes / NIC_BYTES_S)
    slow, fast = z3.tokens_per_s
    assert slow == pytest.approx(512 * 2048 / (z3.compute_s + z3.comm_s)) and fast == 512 * 2048 / z3.compute_s
    r = trainctl("plan", "configs/gpt2-124m.yaml", "--mfu", "0.391", cwd=REPO, timeout=120)
    assert r.returncode == 0 and "      64     3              1        0.73 GB   0.015      0.018" in r.stdout, r.stdout
