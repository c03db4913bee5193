"""Checkpoints: DeepSpeed's engine state plus our own per-rank state, complete or invisible.

Layout, under RUN/checkpoints/:
    step_00000500/          DeepSpeed's files (model, optimizer, LR schedule, loss scaler)
        rank_00000.pt       per-rank state: data position, RNG states, counters
        trainctl.json       written last, by rank 0, once every rank has saved: "complete"
    latest                  the tag of the newest complete checkpoint (atomically replaced)

DeepSpeed writes client_state from rank 0 only, so per-rank state lives in files of its
own. `save_checkpoint` must run on every rank with the same tag or the job hangs, and
`load_checkpoint` returns (None, None) silently when nothing is there: both are handled
here and nowhere else.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.tracking import warn

COMPLETE = "trainctl.json"


class CheckpointError(Exception):
    """A checkpoint that cannot be used, named, with what to do."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, rank: int, rank_state: dict[str, Any], meta: dict[str, Any], keep: int,
         files: dict[str, str] | None = None) -> Path:
    """Save on every rank (collective); rank 0 also writes `files` (name → text, e.g. the
    resolved config) into the checkpoint. Returns the checkpoint folder."""
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    folder = root / tag
    folder.mkdir(parents=True, exist_ok=True)
    buf = _to_bytes({**rank_state, "rng": rng_state()})
    _atomic_write(folder / f"rank_{rank:05d}.pt", buf)
    _barrier()  # every rank's files are on storage before rank 0 declares the checkpoint complete
    if rank == 0:
        for name, text in (files or {}).items():
            _atomic_write(folder / name, text.encode())
        sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        _atomic_write(folder / COMPLETE, json.dumps({**meta, "step": step, "tag": tag, "saved_at": time.time(),
                                                     "files": sizes}, indent=1).encode())
        _atomic_write(root / "latest", tag.encode())
        _prune(root, keep)
    _barrier()
    return folder


def _to_bytes(obj: Any) -> bytes:
    import io

    bio = io.BytesIO()
    torch.save(obj, bio)
    return bio.getvalue()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def _prune(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def damage(ckpt: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be used (a file missing or of another size
    than when it was saved: truncated, or half replaced), or None when it is whole."""
    for name, size in meta(ckpt).get("files", {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, {size:,} when saved"
    return None


def find_latest(root: Path) -> Path | None:
    """The newest whole checkpoint under root. Partial (no completion marker) and damaged
    ones are passed over with a warning naming them; None when there is none at all.
    CheckpointError when every checkpoint there is damaged (so a run never silently starts
    over on top of them)."""
    pointer = root / "latest"
    if pointer.is_file() and not (root / pointer.read_text().strip() / COMPLETE).is_file():
        warn(f"checkpoint {root / pointer.read_text().strip()} is incomplete (a save was interrupted); using an earlier one")
    done = complete_checkpoints(root)
    for ckpt in reversed(done):
        why = damage(ckpt)
        if why is None:
            return ckpt
        warn(f"checkpoint {ckpt} is damaged ({why}); falling back to the previous one")
    if done:
        raise CheckpointError(f"every checkpoint in {root} is damaged: restore them, or start over with --fresh --force")
    return None


def meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / COMPLETE).read_text())


def needs_resharding(ckpt: Path, world: int, zero_stage: int) -> bool:
    """A ZeRO checkpoint partitioned over another number of ranks: its optimizer state
    must go through DeepSpeed's universal format to be split again."""
    return zero_stage > 0 and meta(ckpt).get("world_size", world) != world


def to_universal(ckpt: Path, out: Path) -> None:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format in out/<tag> (rank 0)."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(out / ckpt.name), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        ds_to_universal(args)


def load(engine, ckpt: Path, rank: int, universal: Path | None = None) -> dict[str, Any]:
    """Restore the engine (collective) and return this rank's own state. `universal`: a
    scratch folder where rank 0 converts the checkpoint first, for an engine built with
    `universal=True` on another number of ranks than the checkpoint's."""
    # DeepSpeed reads this flag at each load: an engine built to load a universal checkpoint
    # (a resharded resume) later rolls back to checkpoints of its own world size.
    engine._config.load_universal_checkpoint = universal is not None
    if universal is not None:
        if rank == 0:
            to_universal(ckpt, universal)
        _barrier()
        path, _ = engine.load_checkpoint(str(universal), tag=ckpt.name)
        _barrier()
        if rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
    else:
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {ckpt}")
    own = ckpt / f"rank_{rank:05d}.pt"
    # A rank that did not exist when the checkpoint was written (more workers now) takes
    # rank 0's state; the data position is global, and its RNG is re-seeded by the caller.
    state = torch.load(own if own.exists() else ckpt / "rank_00000.pt", weights_only=False)
    if own.exists():
        set_rng_state(state["rng"])
    return state


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a checkpoint of any ZeRO stage, on the CPU, no engine."""
    info = meta(ckpt)
    if info.get("zero_stage", 0) == 3:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}
