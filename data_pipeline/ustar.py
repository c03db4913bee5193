"""The tar format of token shards, written and read by hand: plain USTAR archives of
regular files with fixed metadata, byte for byte what tarfile writes for them, so `tar`
and webdataset read them, at a fraction of tarfile's cost per member (BENCHMARKS.md)."""

from __future__ import annotations

import numpy as np

from data_pipeline.errors import DataError

BLOCK, RECORD = 512, 20 * 512
END = bytes(2 * BLOCK)  # the end-of-archive blocks


def header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a regular file with our fixed metadata
    (mode 0644, uid/gid 0, mtime 0, no user names), built directly: tarfile's own takes
    ~30 µs a member, which made it the bottleneck of `prepare` on many short documents."""
    h = bytearray(512)
    raw = name.encode()
    if len(raw) > 100 or size >= 8**11:
        raise ValueError(f"{name} ({size} bytes) does not fit a plain USTAR header")
    h[: len(raw)] = raw
    # mode, uid, gid. Joined with +: `ruff format` merges implicitly concatenated literals, and
    # b"...\0" b"000..." merged is the octal escape \000 (a 20-byte field; tar rejects it).
    h[100:124] = b"0000644\x00" + b"0000000\x00" + b"0000000\x00"
    h[124:156] = b"%011o\0" % size + b"00000000000\0" + b" " * 8  # size, mtime; checksum counted as spaces
    h[156:157] = b"0"  # a regular file
    h[257:265] = b"ustar\x0000"  # then empty user and group names, device numbers and prefix
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def padded(data: bytes) -> bytes:
    """A member's data, zero-padded to whole blocks."""
    return data + bytes(-len(data) % BLOCK)


def record_padding(size: int) -> bytes:
    """The zeros that make an archive of `size` bytes (end blocks included) whole records, as tarfile pads it."""
    return bytes(-size % RECORD)


def token_members(data: bytes, dtype: np.dtype, url: str) -> list[np.ndarray]:
    """The `.tokens` members of a token shard's bytes, as views (no copy).

    The 512-byte headers are walked directly; this is several times faster than a generic
    tar reader. Anything else in the archive is an error naming the shard.
    """
    arrays, pos = [], 0
    while pos + 512 <= len(data) and data[pos] != 0:  # a zero block ends the archive
        h = data[pos : pos + 512]
        name = h[:100].rstrip(b"\0").decode("utf-8", errors="replace")
        try:
            size = int(h[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise DataError(
                f"shard {url} is unreadable (bad tar header at byte {pos}): prepare the dataset again"
            ) from None
        if h[156:157] not in (b"0", b"\0") or not name.endswith(".tokens"):
            raise DataError(
                f"shard {url}: sample {name.rsplit('.', 1)[0]} has no .tokens member ({name}): "
                "it is not a trainctl token shard; prepare the dataset again"
            )
        pos += 512
        if pos + size > len(data):
            raise DataError(f"shard {url} is truncated inside {name}: prepare the dataset again")
        arrays.append(np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=pos))
        pos += -(-size // 512) * 512
    return arrays
