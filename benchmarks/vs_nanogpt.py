"""trainctl against nanoGPT's own loop on nanoGPT's Shakespeare CPU recipe: tokens/s and the
wall time to a validation loss of 1.89, start-up included, in one run.

    python benchmarks/vs_nanogpt.py [--target 1.89] [--text tests/data/tinyshakespeare.txt]

The recipe (nanoGPT config/train_shakespeare_char.py with its README's CPU overrides):
4 layers, 4 heads, width 128, context 64, batch 12, AdamW lr 1e-3 (100 warm-up steps, cosine
to 1e-4 over 2000), beta2 0.99, weight decay 0.1, clip 1.0, no dropout, first 90% of the
text for training; validation every 250 steps on 20 batches.

- nanoGPT: a single process written here from nanoGPT's train.py and model.py (its GPT-2
  block: LayerNorm, GELU MLP, learned positions, tied head; random windows of the
  character-encoded text; torch's threads on every core). Its data preparation (encoding
  the text) is not timed, as nanoGPT's prepare.py runs beforehand.
- trainctl: `trainctl run configs/shakespeare-char.yaml` (a private Ray, 2 workers x 1 core,
  DeepSpeed on gloo, byte tokens prepared beforehand, W&B offline as by default), timed
  from the command's start to its first validation line at or under the target.
Both stop at the first evaluation at or under the target (or after 2000 steps). Prints
each, then trainctl's time / nanoGPT's (target <= 1.0).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
LAYERS, HEADS, WIDTH, CONTEXT, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, DECAY, MAX_ITERS = 1e-3, 1e-4, 100, 2000, 2000
EVAL_EVERY, EVAL_ITERS = 250, 20


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.c_attn, self.attn_proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.c_fc, self.mlp_proj = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f, self.lm_head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def nanogpt(text: str, target: float) -> tuple[float | None, float, int]:
    """(seconds to val <= target or None, tokens/s, steps)."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(data))
    splits = {"train": data[:cut], "val": data[cut:]}
    t0 = time.perf_counter()
    torch.manual_seed(1337)
    gen = torch.Generator().manual_seed(1337)

    def batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - CONTEXT, (BATCH,), generator=gen)
        return torch.stack([d[i : i + CONTEXT] for i in ix]), torch.stack([d[i + 1 : i + 1 + CONTEXT] for i in ix])

    model = GPT(len(chars))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.99)
    )
    train_s = 0.0
    for it in range(MAX_ITERS + 1):
        if it % EVAL_EVERY == 0 and it > 0:
            model.eval()
            with torch.no_grad():
                val = sum(model(*batch("val")).item() for _ in range(EVAL_ITERS)) / EVAL_ITERS
            model.train()
            print(f"  nanogpt step {it}: val {val:.4f} at {time.perf_counter() - t0:.1f} s", flush=True)
            if val <= target:
                return time.perf_counter() - t0, it * BATCH * CONTEXT / train_s, it
        if it == MAX_ITERS:
            break
        s0 = time.perf_counter()
        lr = (
            LR * (it + 1) / (WARMUP + 1)
            if it < WARMUP
            else MIN_LR + 0.5 * (1 + math.cos(math.pi * (it - WARMUP) / (DECAY - WARMUP))) * (LR - MIN_LR)
        )
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(*batch("train"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - s0
    return None, MAX_ITERS * BATCH * CONTEXT / train_s, MAX_ITERS


def trainctl(text_path: str, folder: str, target: float) -> tuple[float | None, float, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    data = Path(folder) / "data"
    subprocess.run(
        [sys.executable, "-m", "launcher.cli", "prepare", text_path, "--out", str(data), "--val-fraction", "0.1"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )  # nanoGPT's prepare.py, untimed
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "run",
        str(REPO / "configs" / "shakespeare-char.yaml"),
        f"data.path={data}",
        f"checkpoint.storage_path={folder}",
        f"train.eval_batches={EVAL_ITERS}",
        "train.sample_tokens=0",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    reached, rates, step = None, [], 0
    for line in proc.stdout:
        if m := re.search(r"step +(\d+)/\d+ .*\| ([\d,]+) tok/s", line):
            rates.append(float(m.group(2).replace(",", "")))
        if m := re.search(r"step +(\d+)/\d+ \| val_loss ([\d.]+)", line):
            step, val = int(m.group(1)), float(m.group(2))
            print(f"  trainctl step {step}: val {val:.4f} at {time.perf_counter() - t0:.1f} s", flush=True)
            if val <= target:
                reached = time.perf_counter() - t0
                os.killpg(proc.pid, signal.SIGKILL)
                break
    proc.wait()
    return reached, sum(rates[1:]) / max(len(rates) - 1, 1), step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=1.89)
    ap.add_argument("--text", default=str(REPO / "tests" / "data" / "tinyshakespeare.txt"))
    args = ap.parse_args()
    text = Path(args.text).read_text()
    print("nanoGPT's loop:", flush=True)
    n_time, n_rate, n_steps = nanogpt(text, args.target)
    with tempfile.TemporaryDirectory() as folder:
        print("trainctl:", flush=True)
        t_time, t_rate, t_steps = trainctl(args.text, folder, args.target)
    for name, secs, rate, steps in (("nanoGPT", n_time, n_rate, n_steps), ("trainctl", t_time, t_rate, t_steps)):
        when = f"{secs:.1f} s (step {steps})" if secs else f"not reached in {steps} steps"
        print(f"{name:<9} {rate:9,.0f} tokens/s while training; val <= {args.target}: {when}")
    if n_time and t_time:
        print(
            f"trainctl / nanoGPT: time to val {args.target} = {t_time / n_time:.2f} (target <= 1.0); "
            f"tokens/s = {t_rate / n_rate:.2f}"
        )


if __name__ == "__main__":
    main()
