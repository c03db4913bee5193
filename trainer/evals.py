"""Multiple-choice evaluation by log-likelihood: LLM Foundry's task files, lm-evaluation-harness's
scoring.

A task is a JSONL file, one item a line, as LLM Foundry's `scripts/eval/local_data` files for
HellaSwag, ARC and PIQA are: `{"query": "...", "choices": ["...", ...], "gold": i}`. Each
choice is scored as lm-evaluation-harness scores a `multiple_choice` task's (its `hf` model,
`loglikelihood` requests): the continuation is `" " + choice` (its default target_delimiter)
after the query; the pair is encoded as `_encode_pair` does (trailing spaces of the context
moved to the continuation, the continuation's tokens those of `encode(context + continuation)`
after `encode(context)`'s, no special tokens); the input is the last max_seq_len + 1 tokens
less the last; the score is the sum of the continuation tokens' log-probabilities.
With `chat` (a task of a chat model: `train.evals`' `chat: true`, `trainctl eval --chat`) the
context is the query as a user's message through the tokenizer's chat template with the
assistant's turn opened (`add_generation_prompt`), and the continuation the choice itself, as
lm-evaluation-harness's `--apply_chat_template` makes a `multiple_choice` request (no
target_delimiter, no system prompt beyond the template's own).
`acc`: the highest score is the gold choice; `acc_norm`: the highest score divided by the
choice's length in characters (lm-eval's `acc_norm`). Ties go to the first choice (argmax).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


class TaskError(ValueError):
    """A task file that cannot be scored: its message is the user's one line."""


@dataclass(frozen=True)
class Item:
    query: str
    choices: tuple[str, ...]
    gold: int


@dataclass
class Task:
    name: str
    items: list[Item]
    chat: bool = False  # scored after the chat template


def load_task(path: str | Path, limit: int | None = None, chat: bool = False) -> Task:
    """A task file's items in the file's order (the first `limit` of them), each checked."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist" if not path.exists() else f"task file {path} is a folder")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where} is not JSON ({e.msg}): one {{query, choices, gold}} object a line") from None
        if not isinstance(row, dict):
            raise TaskError(f"{where} is not a JSON object: one {{query, choices, gold}} object a line")
        missing = [k for k in ("query", "choices", "gold") if k not in row]
        if missing:
            raise TaskError(f"{where} has no {', '.join(missing)}: each item needs query, choices and gold")
        query, choices, gold = row["query"], row["choices"], row["gold"]
        if not isinstance(query, str):
            raise TaskError(f"{where}: query is {type(query).__name__}, not text")
        if not isinstance(choices, list) or not choices:
            raise TaskError(
                f"{where}: choices is {'empty' if choices == [] else 'not a list'}: give the answers to pick from"
            )
        if not all(isinstance(c, str) and c for c in choices):
            raise TaskError(f"{where}: every choice must be non-empty text")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise TaskError(
                f"{where}: gold {gold!r} is not an index of its {len(choices)} choices (0 to {len(choices) - 1})"
            )
        items.append(Item(query, tuple(choices), gold))
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise TaskError(f"task file {path} holds no items")
    return Task(path.stem, items, chat)


def check_chat(tok, task: Task, model: str) -> None:
    """A chat task needs a tokenizer with a chat template."""
    if task.chat and not getattr(tok, "chat_template", None):
        raise TaskError(
            f"task {task.name} is scored after the chat template but {model}'s tokenizer has none: "
            "score it without the chat template, or use a chat model"
        )


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness's `_encode_pair` makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation).tolist()
    head = tok.encode(context).tolist()
    return head, whole[len(head) :]


@torch.no_grad()
def choice_loglikelihoods(
    model, tok, item: Item, max_len: int, device: torch.device | str = "cpu", chat: bool = False
) -> list[float]:
    """The summed log-probability of each choice's tokens after the query (one forward for all);
    with `chat`, after the query as a chat's user message and the assistant's turn opened."""
    if chat:
        context = tok.render_chat([{"role": "user", "content": item.query}], add_generation_prompt=True)
        pairs = [encode_pair(tok, context, choice) for choice in item.choices]
    else:
        pairs = [encode_pair(tok, item.query, " " + choice) for choice in item.choices]
    rows = [(head + cont)[-(max_len + 1) :][:-1] for head, cont in pairs]
    batch = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = torch.tensor(r)  # right-padded: causal attention never sees the padding
    logits = model(batch.to(device))
    logits = getattr(logits, "logits", logits).float()
    out = []
    for i, (_, cont) in enumerate(pairs):
        end = len(rows[i])  # the logits at end-n .. end-1 predict the continuation's n tokens
        logprobs = torch.log_softmax(logits[i, end - len(cont) : end], dim=-1)
        out.append(logprobs.gather(1, torch.tensor(cont, device=logprobs.device)[:, None]).sum().item())
    return out


@dataclass
class Scores:
    task: str
    items: int
    correct: int
    correct_norm: int

    @property
    def acc(self) -> float:
        return self.correct / self.items

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.items


def verdicts(item: Item, ll: list[float]) -> tuple[bool, bool]:
    """(acc, acc_norm) of one item: is the best score, and the best per character, the gold choice."""
    norm = [v / len(c) for v, c in zip(ll, item.choices, strict=True)]
    return max(range(len(ll)), key=ll.__getitem__) == item.gold, max(
        range(len(norm)), key=norm.__getitem__
    ) == item.gold


@torch.no_grad()
def score(model, tok, task: Task, max_len: int, rank: int = 0, world: int = 1, device="cpu") -> Scores:
    """The task's accuracy, this rank scoring its share of the items (item k on rank k % world)
    and the counts all-reduced: the same numbers for any number of ranks, the items and their
    order the file's. Every rank runs the same number of forwards, a short share's last on the
    task's first item, not counted (under ZeRO-3 each forward is collective)."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # acc, acc_norm, items
    for j in range(-(-len(task.items) // world)):
        k = rank + j * world
        item = task.items[k] if k < len(task.items) else task.items[0]
        ll = choice_loglikelihoods(model, tok, item, max_len, device, task.chat)
        if k < len(task.items):
            counts += torch.tensor([*verdicts(item, ll), 1.0], dtype=torch.float64, device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts)
    correct, correct_norm, items = (int(c) for c in counts.tolist())
    return Scores(task.name, items, correct, correct_norm)


def evaluate_tasks(model, tok, tasks: list[tuple[str, Task]], rank: int, world: int, max_len: int, device) -> dict:
    """`score` of each (name, task) in eval mode, as {"eval/NAME/acc": ..., "eval/NAME/acc_norm": ...}
    on every rank."""
    was_training = model.training
    model.eval()
    out = {}
    for name, task in tasks:
        s = score(model, tok, task, max_len, rank, world, device)
        out[f"eval/{name}/acc"], out[f"eval/{name}/acc_norm"] = s.acc, s.acc_norm
    model.train(was_training)
    return out
