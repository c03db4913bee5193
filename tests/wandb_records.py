"""Reads a W&B offline run file (run-ID.wandb) for assertions, through trainer/tracking.py's
reader of it (wandb 0.31 dropped its own Python reader)."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.tracking import history_rows, wandb_records


def records(path: Path) -> list[bytes]:
    assert Path(path).read_bytes()[:4] == b":W&B", f"{path} is not a W&B run file"
    return list(wandb_records(path))


def history(path: Path) -> list[dict]:
    """Every logged row as {key: value}, with '_step'."""
    return list(history_rows(path))


def summary(path: Path) -> dict:
    """The run's summary as the file leaves it: every summary update, in order, merged."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {}
    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "summary":
            for i in rec.summary.update:
                out[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return out
