"""How long a checkpoint manifest's checksums take: sha256 against xxh3-64 (what `checkpointing.write_manifest` uses).

    .venv/bin/python bench/manifest_hash.py [--mib 256] [--rounds 3]

Writes one file of random bytes (it stays in the page cache, as a just-written checkpoint does), then hashes it
with each contender in turn, alternating, and prints seconds per GiB (best of the rounds) and the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

from app.sft.checkpointing import file_checksum


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    contenders = {"sha256": _sha256, "xxh3_64": file_checksum}  # the manifest's own checksum
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.bin"
        path.write_bytes(os.urandom(args.mib << 20))
        for _ in range(args.rounds):
            for name, hash_file in contenders.items():
                started = time.perf_counter()
                hash_file(path)
                times[name].append(time.perf_counter() - started)
    gib = args.mib / 1024
    best = {name: min(values) / gib for name, values in times.items()}
    for name, seconds in best.items():
        print(f"{name:8s} {seconds:.3f} s per GiB  ({1 / seconds:.1f} GiB/s)")
    print(f"sha256 / xxh3_64: {best['sha256'] / best['xxh3_64']:.1f}x")


if __name__ == "__main__":
    main()
