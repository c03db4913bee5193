"""MFU's arithmetic: FLOPs per token and MFU against hand-computed values, the peak table,
the profile window and the progress line."""

from __future__ import annotations

import pytest

from trainer import perf
from trainer.console import CONSOLE_LINE, progress_line, summary_table
from trainer.model import ModelConfig


def test_flops_per_token_of_gpt2_small_by_hand():
    # GPT-2 124M shape as configs/gpt2-124m.yaml: L=12, C=768, H=12 heads of Q=64, V=50304, T=1024, SwiGLU F=2048
    c = ModelConfig(vocab_size=50304, n_layer=12, n_head=12, d_model=768, max_seq_len=1024)
    assert c.ffn_dim == 2048
    # per block: wq, wk, wv, wo 4 x 768 x 768 = 2,359,296; w1, w3, w2 3 x 768 x 2048 = 4,718,592
    n = 12 * (2_359_296 + 4_718_592) + 50304 * 768  # blocks + output head = 123,568,128
    assert perf.matmul_params(c) == n == 123_568_128
    assert perf.flops_per_token(c, 1024) == 6 * 123_568_128 + 12 * 12 * 12 * 64 * 1024 == 854_654_976


def test_flops_per_token_of_a_grouped_query_model_by_hand():
    # llama-1b: L=16, C=2048, 32 heads of 64, 8 KV heads, F=8192, V=128256, T=2048
    c = ModelConfig(vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192, max_seq_len=2048)
    attn = 2 * 2048 * 2048 + 2 * 2048 * 512  # wq, wo full width; wk, wv 8 x 64 = 512 wide
    mlp = 3 * 2048 * 8192
    n = 16 * (attn + mlp) + 128256 * 2048
    assert n == 1_235_746_816 and perf.matmul_params(c) == n
    assert perf.flops_per_token(c, 2048) == 6 * n + 12 * 16 * 32 * 64 * 2048 == 8_219_787_264


def test_mfu_by_hand():
    # 470,000 tokens/s of GPT-2 124M on one H100 (llm.c's figure): 470e3 x 854.6 MFLOP / 989 TFLOP/s = 40.6%
    assert perf.mfu(470_000, 854_654_976, 1, 989) == pytest.approx(0.40615, abs=1e-4)
    assert perf.mfu(8 * 470_000, 854_654_976, 8, 989) == pytest.approx(0.40615, abs=1e-4)  # per device
    assert perf.mfu(1000, 10**9, 1, None) is None


def test_gpu_peaks_by_name():
    assert perf.gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert perf.gpu_peak_tflops("NVIDIA H100 PCIe") == 756
    assert perf.gpu_peak_tflops("NVIDIA H200") == 989
    assert perf.gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert perf.gpu_peak_tflops("Tesla T4") is None
    assert perf.device_peak_tflops(123.0, use_gpu=True) == (123.0, "cluster.peak_tflops")


def test_cpu_peak_is_measured_without_touching_the_global_generator():
    import torch

    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    peak = perf.measure_cpu_peak_tflops(seconds=0.05, n=128)
    assert 1e-4 < peak < 100 and torch.equal(torch.rand(1), before)


def test_profile_window():
    assert perf.profile_window("2", 0, 100) == (6, 7)
    assert perf.profile_window("2", 0, 4) == (3, 4)  # a short run: less warm-up
    assert perf.profile_window("3", 50, 100) == (56, 58)  # after a resume, from where it resumed
    assert perf.profile_window("20-22", 0, 100) == (20, 22)
    assert perf.profile_window("20-200", 0, 100) == (20, 100)


def test_the_progress_line_and_the_summary_are_console_lines():
    import re

    m = {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 12345.6, "mfu": 0.42, "step_time_s": 0.25, "data_wait": 0.03}
    line = progress_line(150, 1500, m, eta_s=95)
    assert line == (
        "step    150/1500 [##------------------]  10% | loss 2.5000 | lr 1.00e-03 | 12,346 tok/s | MFU 42.0% | "
        "step 250 ms (data 3%) | ETA 1m35s"
    )
    table = summary_table([("tokens seen", "1,000"), ("restarts", "0")])
    assert table.splitlines() == ["| tokens seen | 1,000 |", "| restarts    | 0     |"]
    console = re.compile(CONSOLE_LINE)
    assert all(console.match(x) for x in [line, *table.splitlines(), "trainctl: done: 1 steps"])
    assert not any(
        console.match(x)
        for x in [
            "[2026-11-25 10:00:00] INFO config.py: ...",
            "  return func(*args)",
            "stepping",
            "Setting up process group",
        ]
    )
