"""MB/s of `prepare` on JSONL inputs, one process against `--workers N` processes, side by
side in one run, and a check that both write the same bytes.

    python benchmarks/prepare_throughput.py [--files 8] [--workers 2] [--tokenizer byte]

Builds --files JSONL files from the Python standard library's source (one document per
paragraph, ~34 MB in all) in a temporary folder, prepares them twice with each setting,
interleaved, and prints the best time of each and the ratio last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import prepare  # noqa: E402
from data_pipeline.prepare import stdlib_files  # noqa: E402


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


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.tar")))).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--tokenizer", default="byte", help="byte, or a tokenizer.json (bpe:N would train a new one each run)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp), args.files)
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
