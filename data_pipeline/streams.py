"""`dataset_stream`: the batch stream of one dataset, by the kind of its shards: a TokenStream
(per-rank lanes, data_pipeline.lanes) for prepared token shards, a ShardStream
(data_pipeline.shardstream) for raw-text shards, whose token counts are unknown until read.
"""

from __future__ import annotations

from data_pipeline.lanes import TokenStream
from data_pipeline.manifest import open_dataset
from data_pipeline.raw import FORMAT as RAW_FORMAT
from data_pipeline.raw import RawOptions
from data_pipeline.shardstream import ShardStream


def dataset_stream(
    data: str | dict,
    split: str,
    seq_len: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    *,
    raw: RawOptions | None = None,
    **options,
) -> TokenStream | ShardStream:
    """This rank's stream of (micro_batch_size, seq_len+1) int64 batches of `data` (a data.path,
    or a manifest), its manifest opened once. `options`: the streams' own (grad_accum_steps,
    seed, shuffle, shuffle_buffer, on_error, lanes), each taking those it uses.

    >>> stream = dataset_stream("data/book", "train", 256, 8, rank=0, world_size=2)  # doctest: +SKIP
    >>> batch = next(iter(stream))  # (8, 257); inputs batch[:, :-1], targets batch[:, 1:]
    """
    manifest = data if isinstance(data, dict) else open_dataset(data, raw)
    if manifest["format"] == RAW_FORMAT:
        return ShardStream(manifest, split, seq_len, micro_batch_size, rank, world_size, raw=raw, **options)
    return TokenStream(data, split, seq_len, micro_batch_size, rank, world_size, manifest=manifest, **options)
