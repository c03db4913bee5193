"""Where `prepare` writes: token shards (`ShardWriter`: USTAR tars of token members, grouped
into sha256-checked chunks), the output folder's checks (`check_out`), and an object-store
output (`RemoteOut`: each shard uploaded as it closes, manifest.json last)."""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Callable

import numpy as np

from data_pipeline import ustar
from data_pipeline.errors import DataError
from data_pipeline.sources import describe_error

# A shard's members are grouped into checksummed chunks of about this size: what a rank
# reads with one ranged request (data_pipeline.lanes). 3.5 MB: under 300 requests per GB
# read, while a rank holding 512 lanes (about half a chunk each) stays under 1 GB.
CHUNK_BYTES = 7 * 2**19


class ShardWriter:
    """Writes `{split}-{i:06d}.tar` shards of token samples, rolling over at a byte budget.

    Each shard is a plain USTAR archive (data_pipeline.ustar), byte for byte what tarfile
    would write for the same members (tests/test_data_prepare.py checks), hashed as it is
    written. Its members are grouped into chunks of about `chunk_bytes` (whole members,
    headers included), each listed as [byte offset, bytes, tokens, sha256] in the shard's
    `chunks`: the unit a rank reads with one ranged request and checks before use
    (data_pipeline.lanes).
    """

    def __init__(
        self,
        folder: str,
        split: str,
        shard_size_bytes: int,
        on_close: Callable[[str], None] | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.folder, self.split, self.limit, self.on_close = folder, split, shard_size_bytes, on_close
        self.chunk_bytes = chunk_bytes
        self.shards: list[dict] = []
        self.file, self.sha, self.size = None, None, 0
        self.chunk = None  # [offset, bytes, tokens, sha256 object] of the chunk being written
        self.key = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self.file, self.sha, self.size = open(os.path.join(self.folder, name), "wb"), hashlib.sha256(), 0
        self.shards.append({"path": name, "samples": 0, "tokens": 0, "chunks": []})

    def _put(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data)
        if self.chunk is not None:
            self.chunk[1] += len(data)
            self.chunk[3].update(data)

    def _end_chunk(self) -> None:
        if self.chunk is not None:
            offset, size, tokens, sha = self.chunk
            self.shards[-1]["chunks"].append([offset, size, tokens, sha.hexdigest()])
            self.chunk = None

    def _close(self) -> None:
        self._end_chunk()
        self._put(ustar.END)
        self._put(ustar.record_padding(self.size))
        self.file.close()
        self.file = None
        self.shards[-1].update(bytes=self.size, sha256=self.sha.hexdigest())
        if self.on_close is not None:
            self.on_close(os.path.join(self.folder, self.shards[-1]["path"]))

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.tobytes()
        if self.file is not None and self.shards[-1]["tokens"] * tokens.itemsize + len(data) > self.limit:
            self._close()
        if self.file is None:
            self._open()
        if self.chunk is not None and self.chunk[1] >= self.chunk_bytes:
            self._end_chunk()
        if self.chunk is None:
            self.chunk = [self.size, 0, 0, hashlib.sha256()]
        self.chunk[2] += len(tokens)
        self._put(ustar.header(f"{self.key:09d}.tokens", len(data)))
        self._put(ustar.padded(data))
        self.key += 1
        self.shards[-1]["samples"] += 1
        self.shards[-1]["tokens"] += len(tokens)

    def finish(self) -> dict:
        if self.file is not None:
            self._close()
        return {
            "shards": self.shards,
            "samples": sum(s["samples"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
        }


def check_out(out_dir: str, overwrite: bool) -> None:
    if not os.path.exists(out_dir):
        above = os.path.dirname(os.path.abspath(out_dir))
        while not os.path.exists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise DataError(f"--out {out_dir}: {above} is a file, not a folder: choose a folder")
        if not os.access(above, os.W_OK | os.X_OK):
            raise DataError(f"--out {out_dir}: {above} is not writable: choose a folder you can write")
        return
    if not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir} is a file: choose a folder")
    if not os.listdir(out_dir):
        return
    if not os.path.isfile(os.path.join(out_dir, "manifest.json")):
        raise DataError(f"--out {out_dir} is not empty and holds no dataset: choose an empty or new folder")
    if not overwrite:
        raise DataError(f"--out {out_dir} already holds a dataset: pass --overwrite to replace it")


class RemoteOut:
    """An object-store folder (s3://, gs://, any fsspec URL) that `prepare` writes to: each
    shard is uploaded as soon as it is closed (and its local copy removed, so the local
    disk holds at most one shard per split), manifest.json last."""

    def __init__(self, url: str, overwrite: bool):
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            bucket = self.root.split("/")[0]
            if not self.fs.exists(bucket):
                raise DataError(f"--out {url}: {bucket} does not exist: create it first, or check the URL")
            names = (
                {posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root)}
                if self.fs.exists(self.root)
                else set()
            )
        except (ImportError, ValueError) as e:
            raise DataError(f"--out {url}: {e}") from None
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - network and credential errors alike, named
            raise DataError(
                f"--out {url} is not reachable ({describe_error(e)}): check the URL and the credentials"
            ) from None
        if names and "manifest.json" not in names:
            raise DataError(f"--out {url} is not empty and holds no dataset: choose an empty or new folder")
        if names and not overwrite:
            raise DataError(f"--out {url} already holds a dataset: pass --overwrite to replace it")
        self.replacing, self.uploaded = bool(names), []

    def upload(self, path: str) -> None:
        name = os.path.basename(path)
        try:
            if self.replacing:  # the old manifest goes before its first shard is replaced: never a mixed dataset
                self.fs.rm(f"{self.root}/manifest.json")
                self.replacing = False
            self.fs.put_file(path, f"{self.root}/{name}")
        except Exception as e:  # noqa: BLE001 - network, permission and quota errors alike, named
            raise DataError(
                f"--out {self.url}: uploading {name} failed ({describe_error(e)}): check the storage and run again"
            ) from None
        self.uploaded.append(f"{self.root}/{name}")
        os.remove(path)

    def abort(self) -> None:
        """Remove what this run uploaded (best effort), so a failed prepare leaves no half dataset."""
        try:
            if self.uploaded:
                self.fs.rm(self.uploaded)
        except Exception:  # noqa: BLE001 - the error that stopped prepare is the one to report
            pass

    def finish(self, manifest_path: str, manifest: dict) -> None:
        self.upload(manifest_path)
        keep = {s["path"] for split in manifest["splits"].values() for s in split["shards"]} | {"manifest.json"}
        self.fs.invalidate_cache(self.root)
        stale = [p for p in self.fs.ls(self.root) if posixpath.basename(p.rstrip("/")) not in keep]
        if stale:  # shards of the replaced dataset beyond the new one's
            self.fs.rm(stale)
