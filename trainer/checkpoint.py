"""Checkpoints: DeepSpeed's engine state plus our own per-rank state, complete or invisible.

Layout, under RUN/checkpoints/:
    step_00000500/          DeepSpeed's files (model, optimizer, LR schedule, loss scaler)
        rank_00000.pt       per-rank state: data position, RNG states, counters
        trainctl.json       written last, by rank 0, once every rank has saved: "complete"
    latest                  the tag of the newest complete checkpoint (atomically replaced)

This module owns the layout, the stores (a folder, or an object store with a local
mirror), finding and loading checkpoints; writing them is saver.py's. DeepSpeed writes
client_state from rank 0 only, so per-rank state lives in files of its own;
`load_checkpoint` returns (None, None) silently when nothing is there (handled in `load`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.sources import is_url
from trainer import patches
from trainer.console import warn

COMPLETE = "trainctl.json"
# A checkpoint's tag, its folder's name: the only names taken from a listing, a `latest`
# file or an object store's trainctl.json as a path (never "..", "/x" or "a/b").
TAG_RE = re.compile(r"step_\d{8}")


def is_tag(name: str) -> bool:
    return TAG_RE.fullmatch(name) is not None


def check_tag(tag: str) -> str:
    if not is_tag(tag):
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (step_ and 8 digits)")
    return tag


def inside(folder: Path, name: str) -> Path:
    """folder / name, for a relative file name read from a checkpoint's trainctl.json;
    CheckpointError when it would leave the folder (absolute, `..`)."""
    path = folder / name
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        raise CheckpointError(
            f"checkpoint {folder} lists a file outside it ({name!r}): it is not a trainctl checkpoint"
        )
    return path


class CheckpointError(Exception):
    """A checkpoint that cannot be used, named, with what to do."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write_durably(tmp, lambda f: f.write(data))
    os.replace(tmp, path)


def barrier() -> None:
    """Wait for every rank, if there is a group. NCCL's barrier is given this rank's GPU
    (without device_ids it guesses, and warns on every call)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
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


def write_durably(path: Path, write: Callable[[Any], None]) -> None:
    """write(file) then fsync: a checkpoint declared complete must survive a power cut. A full
    disk is named as such (torch.save reports it as 'unexpected pos ...')."""
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        full = shutil.disk_usage(path.parent).free < 2**20
        path.unlink(missing_ok=True)  # give back the space at once (the run's logs need some too)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def describe_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return f"{type(e).__name__}: {e}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if is_tag(p.name) and (p / COMPLETE).is_file())


def damage(ckpt: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be used (a file missing or of another size
    than when it was saved: truncated, or half replaced), or None when it is whole."""
    found = {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    return _damage(meta(ckpt).get("files", {}), found)


def _damage(saved: dict[str, int], found: dict[str, int]) -> str | None:
    for name, size in saved.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != size:
            return f"{name} has {found[name]:,} bytes, {size:,} when saved"
    return None


def find_latest(root: Path) -> Path | None:
    """The newest whole checkpoint under root. Partial (no completion marker) and damaged
    ones are passed over with a warning naming them; None when there is none at all.
    CheckpointError when every checkpoint there is damaged (so a run never silently starts
    over on top of them)."""
    pointer = root / "latest"
    named = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    if named is not None and not is_tag(named):  # only ever a tag: never followed as a path
        warn(f"{pointer} holds {named[:40]!r}, not a checkpoint tag (step_ and 8 digits); ignoring it")
    elif named is not None and not (root / named / COMPLETE).is_file():
        warn(f"checkpoint {root / named} is incomplete (a save was interrupted); using an earlier one")
    done = complete_checkpoints(root)
    for ckpt in reversed(done):
        why = damage(ckpt)
        if why is None:
            return ckpt
        warn(f"checkpoint {ckpt} is damaged ({why}); falling back to the previous one")
    if done:
        raise CheckpointError(
            f"every checkpoint in {root} is damaged: restore them, or start over with --fresh --force"
        )
    return None


def meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / COMPLETE).read_text())


class Store:
    """Where a run's checkpoints live. A local or shared folder (`root`), or an object-store
    folder (`url`: s3://, gs://, any fsspec URL) with a local mirror at `root`: checkpoints
    are written into the mirror and uploaded by the background writer, and downloaded into
    it before they are loaded (once per machine: ranks on one machine share the mirror).
    With a URL the object store is the truth: a checkpoint is complete when its
    trainctl.json is there, uploaded last, and `latest` there names the newest."""

    def __init__(self, root: Path | str, url: str | None = None):
        self.root = Path(root)
        self.url = url.rstrip("/") if url else None
        self._fs = None

    def where(self, tag: str) -> str:
        return f"{self.url}/{tag}" if self.url else str(self.root / tag)

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            self._fs = fsspec.core.url_to_fs(self.url)
        return self._fs

    def _remote(self, name: str) -> str:
        return f"{self.fs[1]}/{name}"

    def check(self) -> None:
        """Raise CheckpointError when the object store cannot be written (before any worker starts)."""
        if self.url is None:
            return
        try:
            fs, base = self.fs
            probe = f"{base}/.trainctl-write-check-{os.getpid()}"
            fs.pipe_file(probe, b"ok")
            fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - network, credentials, missing bucket alike
            raise CheckpointError(
                f"cannot write checkpoint.storage_path {self.url.rsplit('/', 2)[0]} ({describe_error(e)}): "
                "check the URL, that the bucket exists and the credentials"
            ) from None

    def upload(self, paths: list[Path]) -> None:
        fs, _ = self.fs
        for path in paths:
            if path.is_file():
                fs.put_file(str(path), self._remote(path.relative_to(self.root).as_posix()))

    def _sizes(self, tag: str) -> dict[str, int]:
        fs, base = self.fs
        fs.invalidate_cache()
        found = fs.find(f"{base}/{tag}", detail=True)
        return {k[len(base) + len(tag) + 2 :]: int(v["size"]) for k, v in found.items()}

    def tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if self.url is None:
            return [p.name for p in complete_checkpoints(self.root)]
        fs, base = self.fs
        fs.invalidate_cache()
        return sorted(t for p in fs.glob(f"{base}/step_*/{COMPLETE}") if is_tag(t := p.rstrip("/").split("/")[-2]))

    def meta(self, tag: str) -> dict[str, Any]:
        if self.url is None:
            return meta(self.root / tag)
        return json.loads(self.fs[0].cat_file(self._remote(f"{tag}/{COMPLETE}")))

    def commit(self, tag: str, info: dict[str, Any], keep: int) -> dict[str, int]:
        """Rank 0, once every rank's files are written: record every file's size in
        trainctl.json (written last: from then on the checkpoint exists), point `latest` at
        it and delete all but the newest `keep`. Returns the sizes."""
        folder = self.root / tag
        if self.url is None:
            sizes = {
                p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
            }
        else:
            sizes = self._sizes(tag)  # every rank's writer uploaded what it wrote
        data = json.dumps({**info, "files": sizes}, indent=1).encode()
        _atomic_write(folder / COMPLETE, data)
        if self.url is not None:
            self.fs[0].pipe_file(self._remote(f"{tag}/{COMPLETE}"), data)
            self.fs[0].pipe_file(self._remote("latest"), tag.encode())
        _atomic_write(self.root / "latest", tag.encode())
        try:  # the checkpoint is complete: failing to delete old ones must not undo it
            self.delete(self.tags()[:-keep])
            if self.url is not None:  # the mirror keeps the same ones (and no half-written older folders)
                keep_local = set(self.tags()[-keep:])
                for old in self.root.glob("step_*"):
                    if old.name < tag and old.name not in keep_local:
                        shutil.rmtree(old, ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            warn(
                f"could not delete checkpoints older than the newest {keep} in {self.url or self.root} ({describe_error(e)})"
            )
        return sizes

    def discard(self, tag: str) -> None:
        """Remove what a failed save uploaded (best effort)."""
        if self.url is not None:
            try:
                self.fs[0].rm(self._remote(tag), recursive=True)
            except Exception:  # noqa: BLE001 - the failure being reported matters more
                pass

    def delete(self, tags: list[str]) -> None:
        for tag in map(check_tag, tags):
            if self.url is not None:
                self.fs[0].rm(self._remote(tag), recursive=True)
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def set_latest(self, tag: str) -> None:
        check_tag(tag)
        if self.url is not None:
            self.fs[0].pipe_file(self._remote("latest"), tag.encode())
        _atomic_write(self.root / "latest", tag.encode())

    def latest(self) -> Path | None:
        """The newest whole checkpoint, on local disk (downloaded first from an object store).
        Partial and damaged ones are passed over with a warning; CheckpointError when every
        one is damaged; None when there is none."""
        if self.url is None:
            return find_latest(self.root)
        tags = self.tags()
        for tag in reversed(tags):
            why = _damage(self.meta(tag).get("files", {}), self._sizes(tag))
            if why is None:
                return self.fetch(tag)
            warn(f"checkpoint {self.where(tag)} is damaged ({why}); falling back to the previous one")
        if tags:
            raise CheckpointError(
                f"every checkpoint in {self.url} is damaged: restore them, or start over with --fresh --force"
            )
        return None

    def fetch(self, tag: str) -> Path:
        """The checkpoint `tag` on local disk: downloaded into the mirror (by the first rank of
        this machine to get here; the others find it done)."""
        folder = self.root / check_tag(tag)
        if self.url is None:
            return folder
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".fetch.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            info = self.meta(tag)
            for name, size in info["files"].items():
                local = inside(folder, name)  # the object store's word: never a path out of the mirror
                if not (local.is_file() and local.stat().st_size == size):
                    local.parent.mkdir(parents=True, exist_ok=True)
                    tmp = local.with_name(f".{local.name}.part")
                    self.fs[0].get_file(self._remote(f"{tag}/{name}"), str(tmp))
                    os.replace(tmp, local)
            _atomic_write(folder / COMPLETE, json.dumps(info, indent=1).encode())
        return folder


def url_cache(url: str) -> Path:
    """A local folder mirroring the object-store folder `url` (for export, generate, --resume)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trainctl" / "checkpoints"
    return base / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


class NoCheckpoint(FileNotFoundError):
    """The path holds no complete checkpoint."""


def find_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest whole checkpoint), a checkpoints folder, or a checkpoint
    itself (NoCheckpoint if it is damaged); any of these may be an object-store URL, whose
    checkpoint is downloaded into a local cache first."""
    if is_url(str(path)):
        return _find_remote(str(path).rstrip("/"))
    p = Path(path)
    if (p / COMPLETE).is_file():
        why = damage(p)
        if why:
            raise NoCheckpoint(f"checkpoint {p} is damaged ({why}): give an earlier one")
        return p
    for root in (p / "checkpoints", p):
        try:
            found = find_latest(root)
        except CheckpointError as e:
            raise NoCheckpoint(str(e)) from None
        if found is not None:
            return found
    raise NoCheckpoint(
        f"no complete checkpoint in {p}: give a run folder (checkpoint.storage_path/NAME) or a checkpoint folder"
    )


def _find_remote(url: str) -> Path:
    parent, tag = url.rsplit("/", 1)
    try:
        if is_tag(tag):
            store = Store(url_cache(parent), parent)
            if tag in store.tags():
                return store.fetch(tag)
        for root in (f"{url}/checkpoints", url):
            found = Store(url_cache(root), root).latest()
            if found is not None:
                return found
    except CheckpointError as e:
        raise NoCheckpoint(str(e)) from None
    except Exception as e:  # noqa: BLE001 - network, credentials, a missing bucket alike
        raise NoCheckpoint(f"cannot read {url} ({type(e).__name__}: {e}): check the URL and the credentials") from None
    raise NoCheckpoint(
        f"no complete checkpoint in {url}: give a run folder (checkpoint.storage_path/NAME) or a checkpoint folder"
    )


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
    args = argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(out / ckpt.name),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        ds_to_universal(args)


def _numpy_globals() -> list:
    """What a rank file's state holds besides tensors: numpy's MT19937 state array (and any
    numpy scalar a counter may be)."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct, scalar
    types = (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)
    dtypes = [type(np.dtype(t)) for t in (*types, np.float16, np.float32, np.float64)]
    # Files written under numpy 1 name these by their old module.
    old = [(_reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar")]
    return [_reconstruct, scalar, *old, np.ndarray, np.dtype, *dtypes]


def _deepspeed_globals() -> list:
    """The few DeepSpeed classes its checkpoint files hold besides tensors and plain values."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_torch(path: Path, **kwargs) -> Any:
    """torch.load(path) with weights_only=True: tensors, plain containers and numbers, and
    only the few other types trainctl's and DeepSpeed's checkpoint files hold (numpy's RNG
    state, DeepSpeed's loss scaler and ZeRO enums), never arbitrary code. DeepSpeed is
    imported only for a file that needs its classes."""
    with torch.serialization.safe_globals(_numpy_globals()):
        try:
            return torch.load(path, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            if "deepspeed." not in str(e):
                raise
    with torch.serialization.safe_globals(_numpy_globals() + _deepspeed_globals()):
        return torch.load(path, weights_only=True, **kwargs)


def load(engine, ckpt: Path, rank: int, universal: Path | None = None, strict: bool = True) -> dict[str, Any]:
    """Restore the engine (collective) and return this rank's own state. `universal`: a
    scratch folder where rank 0 converts the checkpoint first, for an engine built with
    `universal=True` on another number of ranks than the checkpoint's. `strict=False`: the
    checkpoint holds only some of the weights (LoRA's adapters; the base is already loaded)."""
    patches.set_load_universal(engine, universal is not None)
    if universal is not None:
        if rank == 0:
            to_universal(ckpt, universal)
        barrier()
        with patches.fix_zero3_universal_load(engine):
            path, _ = engine.load_checkpoint(str(universal), tag=ckpt.name, load_module_strict=strict)
        barrier()
        if rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
    else:
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=strict)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {ckpt}")
    own = ckpt / f"rank_{rank:05d}.pt"
    # A rank that did not exist when the checkpoint was written (more workers now) takes
    # rank 0's state; the data position is global, and its RNG is re-seeded by the caller.
    state = load_torch(own if own.exists() else ckpt / "rank_00000.pt")
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
        state = load_torch(ckpt / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    return {k: v.float() for k, v in state.items()}
