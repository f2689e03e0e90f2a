"""Prepare the device kit: everything one GPU call needs, in an ignored folder of the checkout.

    python benchmarks/device_kit/prepare.py --pool ALIGNED_POOL --lfw ALIGNED_LFW [--kit .gpu]

Writes <kit>/pool/train.rec (+ .idx, property): the aligned pool re-encoded as JPEG (quality 75 by
default, so pool + code stay under the 64 MiB a device call carries), <kit>/validation.bin (LFW
fold 5 pairs, written by `facerec align --preset lfw`), and <kit>/whl/: the wheels of what the GPU
machine lacks (pydantic for the typed configs), for Python 3.12 / manylinux x86-64. Nothing here
installs anything on this machine. Then run `bash benchmarks/device_kit/run.sh` there (see it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import cv2

from facerec.data.recordio import FaceRecWriter

WHEELS = ["pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
          "typing-inspection==0.4.5", "typing-extensions==4.16.0"]


def pack_pool(pool: Path, out: Path, quality: int, shard: int = 0, shards: int = 1) -> tuple[int, int]:
    """Pack identities ``shard::shards`` of the sorted identity folders (all of them by default)."""
    identities = sorted(d for d in pool.iterdir() if d.is_dir())[shard::shards]
    images = 0
    with FaceRecWriter(out) as writer:
        for label, folder in enumerate(identities):
            for path in sorted(folder.glob("*.jpg")):
                ok, data = cv2.imencode(".jpg", cv2.imread(str(path)), [cv2.IMWRITE_JPEG_QUALITY, quality])
                if not ok:
                    raise RuntimeError(f"could not re-encode {path}")
                writer.add(data.tobytes(), label)  # cv2 encodes BGR, as insightface's .rec
                images += 1
    return images, len(identities)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="aligned pool tree (facerec align --preset pool)")
    parser.add_argument("--lfw", required=True, help="aligned LFW tree with validation.bin")
    parser.add_argument("--kit", default=".gpu", help="output folder, ignored by git (default: %(default)s)")
    parser.add_argument("--jpeg-quality", type=int, default=75)
    parser.add_argument("--shards", type=int, default=1,
                        help="split the pool into N .rec shards <kit>/pool_K (identities K::N) to carry "
                             "over N calls; merge_shards.py joins them on the device")
    args = parser.parse_args()
    kit = Path(args.kit)
    for old in [kit / "pool", *kit.glob("pool_*")]:
        shutil.rmtree(old)
    images = ids = 0
    for k in range(args.shards):
        name = "pool" if args.shards == 1 else f"pool_{k}"
        n_img, n_ids = pack_pool(Path(args.pool), kit / name, args.jpeg_quality, k, args.shards)
        mib = sum(p.stat().st_size for p in (kit / name).iterdir()) / 2**20
        print(f"{kit / name}: {n_img} images of {n_ids} identities, {mib:.1f} MiB")
        images, ids = images + n_img, ids + n_ids
    shutil.copy(Path(args.lfw) / "validation.bin", kit / "validation.bin")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform",
                    "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "-d",
                    str(kit / "whl"), *WHEELS], check=True)
    size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file()) / 2**20
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout
    checkout = sum(Path(f).stat().st_size for f in tracked.decode().split("\0") if f and Path(f).is_file())
    shard_mib = max(sum(p.stat().st_size for p in d.iterdir()) for d in [kit / "pool", *kit.glob("pool_*")]
                    if d.is_dir()) / 2**20
    size = size - (sum(p.stat().st_size for p in kit.rglob("*") if p.is_file() and "pool" in p.parent.name)
                   / 2**20) + shard_mib  # one shard travels per call
    total = size + checkout / 2**20
    print(f"kit {kit}: {images} images of {ids} identities; the largest call carries {size:.1f} MiB, with "
          f"the checkout {total:.1f} MiB of the 64 MiB a device call carries")
    if total > 62:
        print("too large for one call: lower --jpeg-quality (35 fitted beside a 27 MiB checkout, at a "
              "cost in image quality) or stage "
              "the pool over two calls", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
