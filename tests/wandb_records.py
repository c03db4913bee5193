"""Reads the history rows out of a W&B offline run file (run-ID.wandb), for assertions.

wandb 0.31 dropped its Python reader of this file; the format is LevelDB's log format
(32 KiB blocks of records with a 7-byte header: crc32, length, type) after a 7-byte
':W&B' file header, each record a wandb_internal_pb2.Record.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, buf, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer too short for a record header: skipped
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        buf += data[pos : pos + length]
        pos += length
        if kind in (FULL, LAST):
            out.append(buf)
            buf = b""
    return out


def history(path: Path) -> list[dict]:
    """Every logged row as {key: value}, with '_step'."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


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
