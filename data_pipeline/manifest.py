"""The manifest of a dataset: its format mark (`FORMAT`), the splits (`SPLITS`, and `is_val`,
which picks a document's), `load_manifest` (a prepared dataset's manifest.json, local or a
URL, each shard given its `url`), and `open_dataset`: the manifest of anything data.path
names, a prepared dataset, a shard list of one (`manifest_subset`), or raw-text shards (one
made up by data_pipeline.raw). Reading data needs only this, never the writer (prepare).
"""

from __future__ import annotations

import hashlib
import json
import os

from data_pipeline.errors import DataError
from data_pipeline.raw import RawOptions, is_shard_list, raw_manifest, shard_urls
from data_pipeline.sources import is_url, join, parent, read_bytes

FORMAT = "trainctl.tokens/1"
SPLITS = ("train", "val")


def is_val(text: bytes, val_fraction: float) -> bool:
    """Whether a document goes to validation: its blake2b-64 hash, as a fraction of 2**64, is
    below `val_fraction`. Streaming and deterministic: the same document lands in the same
    split whatever file or format it came in."""
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") < val_fraction * 2**64


def load_manifest(path: str) -> dict:
    """The manifest of a prepared dataset: a folder or manifest.json, local or a URL
    (http(s)://, s3://, any fsspec URL). Each shard gains its `url`."""
    file = path if path.endswith(".json") else join(path, "manifest.json")
    if not is_url(file) and not os.path.isfile(file):
        raise DataError(
            f"no manifest.json in {path}: run `trainctl prepare` first or point data.path at a prepared dataset"
        )
    raw = read_bytes(file)  # DataError naming the file when it cannot be read
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{file} is not valid JSON ({e}): prepare the dataset again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{file} is not a trainctl dataset (format {got!r}, expected {FORMAT})")
    root = parent(file)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard["url"] = join(root, shard["path"])
    manifest["root"] = root
    return manifest


def open_dataset(data: str, raw: RawOptions | None = None) -> dict:
    """The manifest of a prepared dataset; for a shard list, the part of the manifest
    beside the shards that lists them (a subset of a prepared dataset), or one made up for
    raw-text shards."""
    if not is_shard_list(data):
        return load_manifest(data)
    raw = raw or RawOptions()
    urls = shard_urls(data, raw.allow_pipe)
    return manifest_subset(data, urls) or raw_manifest(data, raw, urls)


def manifest_subset(spec: str, urls: list[str]) -> dict | None:
    """The manifest.json beside `urls`, cut down to those shards (each keeps its split);
    None when there is none or it does not list them all (raw-text shards)."""
    folders = {parent(u) for u in urls}
    if len(folders) != 1 or urls[0].startswith("pipe:"):
        return None
    root = folders.pop()
    if not is_url(root) and not os.path.isfile(os.path.join(root, "manifest.json")):
        return None
    try:
        manifest = load_manifest(root)
    except DataError:
        if not is_url(root):
            raise  # a local manifest beside the shards that is broken: say so
        return None  # no manifest at that URL: raw-text shards
    by_url = {shard["url"]: (split, shard) for split, s in manifest["splits"].items() for shard in s["shards"]}
    wanted = [u if is_url(u) else os.path.abspath(u) for u in urls]
    if not all(u in by_url for u in wanted):
        missing = [u for u in wanted if u not in by_url]
        raise DataError(
            f"data.path {spec!r}: {len(missing)} of the shards, the first {missing[0]}, are not in "
            f"{join(root, 'manifest.json')}: name shards of one prepared dataset, or its folder"
        )
    splits = {split: {"shards": []} for split in manifest["splits"]}
    for u in wanted:
        split, shard = by_url[u]
        splits[split]["shards"].append(shard)
    for split in splits.values():
        split["tokens"] = sum(s["tokens"] for s in split["shards"])
    return {**manifest, "name": spec, "splits": splits}
