"""Join pool shards (prepare.py --shards N) into one insightface .rec on the device machine.

    python3 benchmarks/device_kit/merge_shards.py .gpu/pool_0 .gpu/pool_1 --out /tmp/pool

Shard K holds identities K::N of the sorted identity folders, each shard labelled 0..n_K-1; the
merged set labels shard 0's identities first, then shard 1's, and so on. The encoded images are
copied as they are (no re-encoding).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from facerec.data.recordio import FaceRecReader, FaceRecWriter  # noqa: E402


def merge(shards: list[Path], out: Path) -> tuple[int, int]:
    offset = images = 0
    with FaceRecWriter(out) as writer:
        for shard in shards:
            reader = FaceRecReader(shard)
            labels = set()
            for i in range(len(reader)):
                data, label = reader.read_raw(i)
                writer.add(data, offset + label)
                labels.add(label)
                images += 1
            if labels != set(range(len(labels))):
                raise ValueError(f"{shard}: labels are not 0..C-1")
            offset += len(labels)
    return images, offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    missing = [s for s in args.shards if not (s / "train.rec").exists()]
    if missing:
        raise SystemExit(f"missing shards (carry them in earlier calls): {missing}")
    images, classes = merge(args.shards, args.out)
    print(f"merged {len(args.shards)} shards: {images} images, {classes} identities -> {args.out}")


if __name__ == "__main__":
    main()
