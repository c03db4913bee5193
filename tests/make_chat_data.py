"""Writes tests/data/trainctl-chat.jsonl: a small chat set for fine-tuning tests and
configs/smollm2-sft.yaml: questions about trainctl's own job-file keys, answered from the
config schema's descriptions (so the facts are the project's own, and new to any model).

    python -m tests.make_chat_data
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from trainer.config import JobConfig

OUT = Path(__file__).resolve().parent / "data" / "trainctl-chat.jsonl"
SYSTEM = "You are the help assistant of trainctl, a tool that trains transformers."


def facts() -> list[tuple[str, str]]:
    """(key, answer) for every documented key of the job file."""
    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            if inner:
                walk(inner[0], f"{prefix}{name}.")
            elif field.description:
                default = field.get_default(call_default_factory=True)
                out.append(
                    (f"{prefix}{name}", f"{prefix}{name} is {field.description.rstrip('.')}. Default: {default!r}.")
                )

    walk(JobConfig, "")
    return out


def records() -> list[dict]:
    items = facts()
    rows = []
    for i, (key, answer) in enumerate(items):
        messages = [
            {"role": "user", "content": f"What is {key} in trainctl?"},
            {"role": "assistant", "content": answer},
        ]
        if i % 2:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        rows.append({"messages": messages})
    for (k1, a1), (k2, a2) in zip(items[::2], items[1::2]):  # two-turn chats
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"What is {k1} in trainctl?"},
                    {"role": "assistant", "content": a1},
                    {"role": "user", "content": f"And {k2}?"},
                    {"role": "assistant", "content": a2},
                ]
            }
        )
    return rows


if __name__ == "__main__":
    OUT.write_text("".join(json.dumps(r) + "\n" for r in records()))
    print(f"{OUT}: {len(records())} chats")
