"""Writing checkpoints: every rank's part, in the background or not, made complete only
when every rank has written (see `Saver`). `save_checkpoint` must run on every rank with
the same tag or the job hangs: only `Saver.save` calls it. The layout and reading are
checkpoint.py's."""

from __future__ import annotations

import atexit
import copy
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.checkpoint import CheckpointError, Store, barrier, describe_error, load_torch, rng_state, write_durably


class _Writer:
    """One background thread that runs a rank's checkpoint jobs in order. The first job
    that raises stops the rest until `wait` hands its error to the training thread."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._done = threading.Condition()
        self._queued = 0  # jobs submitted and not yet run
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="trainctl-checkpoint-writer", daemon=True)
        self._thread.start()
        # A daemon thread stopped inside torch.save at interpreter exit aborts the process
        # ("terminate called without an active exception"): let the jobs finish first.
        atexit.register(self.stop)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def submit(self, job: Callable[[], None]) -> None:
        with self._done:
            self._queued += 1
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self.error is None:
                try:
                    job()
                except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                    self.error = e
            with self._done:
                self._queued -= 1
                self._done.notify_all()

    def idle(self) -> bool:
        with self._done:
            return self._queued == 0

    def wait(self) -> BaseException | None:
        """Block until every job submitted so far has run; returns (and clears) the first error."""
        with self._done:
            self._done.wait_for(lambda: self._queued == 0)
        error, self.error = self.error, None
        return error


def _snapshot(item: Any, pool: dict[str, torch.Tensor], key: str) -> Any:
    """A copy of `item` whose tensors are copies in CPU memory, made into the buffers of `pool`
    (kept from one save to the next: copying into memory already mapped is several times
    faster than into fresh allocations). Containers are copied as needed, keeping their
    types (DeepSpeed's clone_tensors_for_torch_save turns torch.Size into a tuple, which its
    ZeRO-3 reader then fails on)."""
    if torch.is_tensor(item):
        buf = pool.get(key)
        if buf is None or buf.shape != item.shape or buf.dtype != item.dtype:
            buf = pool[key] = torch.empty(item.shape, dtype=item.dtype, pin_memory=item.is_cuda)
        return buf.copy_(item.detach(), non_blocking=item.is_cuda)
    if isinstance(item, dict):
        out = copy.copy(item)
        for k, v in item.items():
            out[k] = _snapshot(v, pool, f"{key}/{k}")
        return out
    if isinstance(item, list):
        return [_snapshot(v, pool, f"{key}/{i}") for i, v in enumerate(item)]
    if type(item) is tuple:
        return tuple(_snapshot(v, pool, f"{key}/{i}") for i, v in enumerate(item))
    return item


def _checkpoint_engine(config_params, writer: _Writer, written: list[Path], background: bool):
    """DeepSpeed's file writer, recording each path in `written` (uploaded to an object store
    afterwards) and fsyncing each file. With `background` it is asynchronous: each state dict
    is copied to CPU memory in the training thread (the next optimizer step changes the live
    tensors) and written by the background writer. DeepSpeed clones only some of its state
    dicts before saving (not the ZeRO optimizer partitions), so the copy here is the only one
    and covers all; its memory is kept for the next save (one checkpoint is in flight at a time)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    pool: dict[str, torch.Tensor] = {}

    class Engine(TorchCheckpointEngine):
        def preserves_storage_sharing(self) -> bool:
            return not background  # in the background DeepSpeed skips its own clone: every tensor is copied once, here

        def load(self, path: str, map_location=None):
            # DeepSpeed's own reads (model states, ZeRO optimizer partitions) with weights_only=True:
            # its TorchCheckpointEngine loads with weights_only=False, which runs any pickle.
            return load_torch(Path(path), map_location=map_location)

        def save(self, state_dict, path: str) -> None:
            written.append(Path(path))
            zipfile = self.zipfile_serialization
            if not background:
                write_durably(Path(path), lambda f: torch.save(state_dict, f, _use_new_zipfile_serialization=zipfile))
                return
            snapshot = _snapshot(state_dict, pool, Path(path).name)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the copies out of GPU memory are done before the writer reads them
            writer.submit(
                lambda: write_durably(
                    Path(path), lambda f: torch.save(snapshot, f, _use_new_zipfile_serialization=zipfile)
                )
            )

    return Engine(config_params)


class SaveFailed(CheckpointError):
    """A checkpoint could not be written (disk full, storage unreachable); the previous ones are intact."""


class Saver:
    """Writes the run's checkpoints into `store`; every rank builds one and calls `save`
    together (DeepSpeed's save is collective).

    With `background`, `save` only copies the state to CPU memory and returns: a writer
    thread writes (and uploads) the files while training goes on. A checkpoint becomes
    complete when every rank has written its part: the training loop learns that in the
    all-reduce it makes every step anyway (`written()` is one of its values) and calls
    `commit()`, which has rank 0 write trainctl.json and `latest`. A checkpoint a rank never
    finished (killed, disk full) is never committed, so it stays invisible. `flush()` waits
    for everything, collectively: before the next save, a rollback, and at the end."""

    def __init__(self, engine, store: Store, rank: int, keep: int, background: bool = True, frozen: bool = True):
        """`frozen=False`: leave frozen parameters (a LoRA run's base) out of the checkpoints."""
        self.engine, self.store, self.rank, self.keep, self.background = engine, store, rank, keep, background
        self.frozen = frozen
        self.writer = _Writer()
        self.files: list[Path] = []  # what this rank wrote of the pending checkpoint
        self.ckpt_engine = _checkpoint_engine(engine._config, self.writer, self.files, background)
        engine.checkpoint_engine = self.ckpt_engine  # its loads too (weights_only), from the first resume on
        self.pending: tuple[str, dict[str, Any]] | None = None  # (tag, meta) of the checkpoint being written

    def save(
        self, step: int, rank_state: dict[str, Any], meta: dict[str, Any], files: dict[str, str] | None = None
    ) -> Path:
        """Start (background) or write (synchronous) the checkpoint of `step`; rank 0 also writes
        `files` (name → text, e.g. the resolved config) into it. Returns its folder."""
        self.flush()  # one checkpoint in flight at a time
        tag = f"step_{step:08d}"
        folder = self.store.root / tag
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # the remains of an interrupted save of the same step
        barrier()
        self.files.clear()
        self.started = time.perf_counter()
        self.engine.checkpoint_engine = self.ckpt_engine  # DeepSpeed writes each file through it
        try:
            self.engine.save_checkpoint(
                str(self.store.root),
                tag=tag,
                client_state={"step": step},
                save_latest=False,
                exclude_frozen_parameters=not self.frozen,
            )
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.writer.error = e
        own = folder / f"rank_{self.rank:05d}.pt"
        state = {**rank_state, "rng": rng_state()}  # plain values and fresh RNG tensors: no copy needed
        self.files.append(own)
        self.writer.submit(lambda: write_durably(own, lambda f: torch.save(state, f)))
        if self.rank == 0:
            for name, text in (files or {}).items():
                self.files.append(folder / name)
                self.writer.submit(lambda p=folder / name, t=text: write_durably(p, lambda f: f.write(t.encode())))
        if self.store.url is not None:
            mine = list(self.files)
            self.writer.submit(lambda: self.store.upload(mine))
        self.pending = (tag, meta)
        self.blocked = time.perf_counter() - self.started
        if not self.background:
            self.flush()
        return folder

    def written(self) -> float:
        """1.0 when this rank has nothing left to write (its part of the pending checkpoint is on
        storage, or failed: `commit` finds out which), else 0.0."""
        return float(self.writer.idle())

    def commit(self) -> None:
        """Every rank has written (all voted `written`): make the pending checkpoint complete.
        A failure on any rank raises SaveFailed on every rank."""
        if self.pending is None:
            return
        tag, meta = self.pending
        self.pending = None
        error = self.writer.wait()
        sizes: dict[str, int] = {}
        if not _any_rank(error is not None) and self.rank == 0:
            try:  # the completion marker itself can meet a full disk or a failing store
                info = {**meta, "step": int(tag.split("_")[1]), "tag": tag, "saved_at": time.time()}
                sizes = self.store.commit(tag, info, self.keep)
            except Exception as e:  # noqa: BLE001 - reported below, on every rank
                error = e
        if _any_rank(error is not None):  # every rank agrees, so none is left waiting in a collective
            if self.rank == 0:
                shutil.rmtree(self.store.root / tag, ignore_errors=True)
                self.store.discard(tag)
            why = describe_error(error) if error is not None else "another rank could not write its part"
            raise SaveFailed(
                f"checkpoint {self.store.where(tag)} could not be written ({why}); the previous checkpoints "
                "are intact: free space or fix the storage, then run the same command to resume"
            )
        if self.rank == 0:
            print(
                f"trainctl: checkpoint {self.store.where(tag)} ({sum(sizes.values()) / 2**20:,.0f} MB, complete "
                f"{time.perf_counter() - self.started:.1f} s after the save began; training waited {self.blocked:.2f} s "
                "of it)",
                flush=True,
            )

    def flush(self) -> None:
        """Wait until the pending checkpoint (if any) is written on every rank and complete (collective)."""
        if self.pending is not None:
            self.commit()


def _any_rank(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() > 0
