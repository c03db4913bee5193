"""MB/s of `prepare` on JSONL inputs, one process against `--workers N` processes, side by
side in one run, and a check that both write the same bytes; and MB/s of one process on the
same documents as .jsonl, .jsonl.gz, .jsonl.zst and .parquet, with each one's ratio to .jsonl.

    python benchmarks/prepare_throughput.py [--files 8] [--workers 2] [--tokenizer byte] [--compare both] [--rounds 3]

Builds --files JSONL files from the Python standard library's source (one document per
paragraph, ~34 MB in all) in a temporary folder, prepares them twice with each setting,
interleaved, and prints the best time of each and the ratio last. `--compare formats` runs
only the formats (gzip level 6, zstandard level 3, parquet with pyarrow's defaults); MB/s
counts the documents' text, the same for every format.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import prepare  # noqa: E402
from data_pipeline.resolve import stdlib_files  # noqa: E402


def make_inputs(root: Path, n_files: int) -> list[str]:
    files, inputs = stdlib_files(), []
    for k in range(n_files):
        path = root / f"part{k}.jsonl"
        with open(path, "w") as f:
            for source in files[k::n_files]:
                for para in Path(source).read_text(errors="replace").split("\n\n"):
                    f.write(json.dumps({"text": para}) + "\n")
        inputs.append(str(path))
    return inputs


def convert(inputs: list[str], ext: str) -> list[str]:
    """The JSONL files `inputs` as `ext` files beside them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    out = []
    for path in inputs:
        data, target = Path(path).read_bytes(), path[: -len(".jsonl")] + ext
        if ext == ".jsonl.gz":
            Path(target).write_bytes(gzip.compress(data, compresslevel=6, mtime=0))
        elif ext == ".jsonl.zst":
            Path(target).write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
        elif ext == ".parquet":
            texts = [json.loads(line)["text"] for line in data.splitlines()]
            pq.write_table(pa.table({"text": texts}), target)
        else:
            target = path
        out.append(target)
    return out


def compare_formats(tmp: str, inputs: list[str], tokenizer: str, rounds: int) -> None:
    formats = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
    files = {ext: convert(inputs, ext) for ext in formats}
    best: dict[str, float] = {}
    digests, text_mb = set(), 0.0
    for _ in range(rounds):
        for ext in formats:
            out = Path(tmp, "out" + ext)
            t0 = time.perf_counter()
            m = prepare(
                files[ext], str(out), tokenizer=tokenizer, shard_size_bytes=16 * 2**20, workers=1, overwrite=True
            )
            best[ext] = min(best.get(ext, float("inf")), time.perf_counter() - t0)
            digests.add(digest(out))
            text_mb = m["input_bytes"] / 2**20
    print(f"{text_mb:.1f} MB of text in {len(inputs)} files per format, tokenizer {tokenizer}, one process")
    for ext in formats:
        size = sum(os.path.getsize(p) for p in files[ext]) / 2**20
        print(
            f"  {ext:<11} {size:6.1f} MB on disk {best[ext]:6.2f} s {text_mb / best[ext]:6.1f} MB/s of text"
            f"  {best['.jsonl'] / best[ext]:.2f}x .jsonl"
        )
    print(f"same shards for every format: {len(digests) == 1}")


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.tar")))).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--tokenizer", default="byte", help="byte, or a tokenizer.json (bpe:N would train a new one each run)"
    )
    ap.add_argument("--compare", choices=("workers", "formats", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each format, interleaved; the best counts")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp), args.files)
        if args.compare != "workers":
            compare_formats(tmp, inputs, args.tokenizer, args.rounds)
        if args.compare == "formats":
            return
        mb = sum(os.path.getsize(p) for p in inputs) / 2**20
        best: dict[int, float] = {}
        digests = set()
        for _ in range(2):
            for workers in (1, args.workers):
                out = Path(tmp, f"out-{workers}")
                t0 = time.perf_counter()
                prepare(
                    inputs,
                    str(out),
                    tokenizer=args.tokenizer,
                    shard_size_bytes=16 * 2**20,
                    workers=workers,
                    overwrite=True,
                )
                best[workers] = min(best.get(workers, float("inf")), time.perf_counter() - t0)
                digests.add(digest(out))
        print(f"{mb:.1f} MB of JSONL in {args.files} files, tokenizer {args.tokenizer}, {os.cpu_count()} cores")
        for workers, seconds in best.items():
            print(f"  --workers {workers:<3} {seconds:6.2f} s  {mb / seconds:6.1f} MB/s")
        print(
            f"same shards: {len(digests) == 1}; --workers {args.workers} / --workers 1 speed = {best[1] / best[args.workers]:.2f}"
        )


if __name__ == "__main__":
    main()
