"""Images/s per core for decode + augment of 112x112 JPEGs, from a folder tree and from a .rec.

The set is made from the bundled LFW sample (160 real faces, centre-cropped to 112x112, JPEG
quality 95, repeated to --images), because the JPEG decoder's speed depends on image content and
random noise would understate it. "Per core" = one process with one torch and one cv2 thread
iterating the Dataset; the DataLoader row shows what --workers processes deliver together.

    python benchmarks/dataloader_speed.py --images 2000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facerec.data.align import center_crop
from facerec.data.datasets import (
    FolderDataset,
    RecDataset,
    TrainTransform,
    create_dataloader,
)
from facerec.data.folders import load_or_build_manifest
from facerec.data.recordio import write_face_rec
from facerec.sysinfo import cpu_name

SAMPLE = ROOT / "tests" / "data" / "lfw_sample"


def make_sets(tmp: Path, n_images: int) -> tuple[Path, Path]:
    sources = sorted(SAMPLE.glob("*/*.jpg"))
    folder = tmp / "folder"
    items = []
    for i in range(n_images):
        src = sources[i % len(sources)]
        identity = src.parent.name
        bgr = center_crop(cv2.imread(str(src)), 112, 0.6)
        _, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        (folder / identity).mkdir(parents=True, exist_ok=True)
        (folder / identity / f"{i:06d}.jpg").write_bytes(buf.tobytes())
    samples = load_or_build_manifest(folder)
    items = [((folder / s.path).read_bytes(), s.label) for s in samples]
    write_face_rec(tmp / "rec", items)
    return folder, tmp / "rec"


def per_core(dataset, repeats: int) -> float:
    """Images/s of one process iterating the dataset (decode + flip + normalise)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        best = max(best, len(dataset) / (time.perf_counter() - start))
    return best


def loader_rate(dataset, workers: int, batch: int) -> float:
    loader = create_dataloader(dataset, batch_size=batch, workers=workers, pin_memory=False)
    next(iter(loader))  # start the workers outside the timing
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "dataloader_speed.json")
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    transform = TrainTransform(flip_p=0.5)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, rec = make_sets(Path(tmp), args.images)
        for name, dataset in (
            ("folder", FolderDataset(folder, transform)),
            ("rec", RecDataset(rec, transform)),
        ):
            results[name] = {
                "images_per_s_per_core": round(per_core(dataset, args.repeats), 1),
                f"images_per_s_dataloader_{args.workers}_workers": round(
                    loader_rate(dataset, args.workers, args.batch), 1
                ),
            }
        jitter = TrainTransform(flip_p=0.5, photometric=0.2)
        results["rec_photometric"] = {
            "images_per_s_per_core": round(per_core(RecDataset(rec, jitter), args.repeats), 1)
        }
    report = {
        "benchmark": "dataloader_speed",
        "images": args.images,
        "image_size": 112,
        "jpeg_quality": 95,
        "transform": "decode + RGB + random flip + (x/255-0.5)/0.5",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
