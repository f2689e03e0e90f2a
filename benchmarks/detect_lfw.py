"""How often the detector finds the labelled face of LFW, and how fast, on this machine.

Runs ``detect_faces`` (policy 'central', pad-and-retry on) over every LFW deep-funneled image.
The labelled face of a deep-funneled image is the central one, so an image counts as found when
the kept face's box centre lies within ``--radius`` px (30) of the image centre. Writes
``benchmarks/results/detect_lfw_<detector>_<backend>.{json,md}``.

    python benchmarks/detect_lfw.py --backend onnx            # all 13,233 images
    python benchmarks/detect_lfw.py --backend torch --limit 2000
    FACEREC_DATA=/path/to/data python benchmarks/detect_lfw.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from facerec.data.detect import create_detector, detect_faces  # noqa: E402
from facerec.data.image_io import ImageDecodeError, load_image  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("FACEREC_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--detector", default="mtcnn")
    ap.add_argument("--backend", default="onnx", choices=["torch", "onnx"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (torch: process-wide)")
    ap.add_argument("--limit", type=int, default=0, help="first N images in sorted order (0 = all)")
    ap.add_argument("--radius", type=float, default=30.0, help="px from the image centre that count as central")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    root = Path(args.data) / "lfw" / "lfw-deepfunneled"
    files = sorted(root.glob("*/*.jpg"))
    if not files:
        print(f"no LFW images under {root}; pass --data or set FACEREC_DATA", file=sys.stderr)
        return 2
    if args.limit:
        files = files[: args.limit]

    det = create_detector(args.detector, device=args.device, backend=args.backend,
                          model_dir=args.model_dir, threads=args.threads)
    det.detect(np.zeros((250, 250, 3), np.uint8))  # warm-up: first-call allocations, lazy init

    first_pass = retried = 0
    misses, off_centre, undecodable = [], [], []
    t_decode = t_detect = 0.0
    start = time.perf_counter()
    for i, f in enumerate(files):
        t0 = time.perf_counter()
        try:
            img = load_image(f)
        except ImageDecodeError as e:
            undecodable.append(f"{f.relative_to(root)}: {e}")
            continue
        t1 = time.perf_counter()
        faces = detect_faces(det, img, policy="central", pad_retry=False)
        used_retry = False
        if not faces:
            faces = detect_faces(det, img, policy="central", pad_retry=True)
            used_retry = bool(faces)
        t_detect += time.perf_counter() - t1
        t_decode += t1 - t0
        h, w = img.shape[:2]
        rel = str(f.relative_to(root))
        if not faces:
            misses.append(rel)
            continue
        b = faces[0].box
        dist = float(np.hypot((b[0] + b[2]) / 2 - w / 2, (b[1] + b[3]) / 2 - h / 2))
        if dist > args.radius:
            off_centre.append({"image": rel, "distance_px": round(dist, 1)})
        elif used_retry:
            retried += 1
        else:
            first_pass += 1
        if (i + 1) % 1000 == 0:
            rate = (i + 1) / (time.perf_counter() - start)
            print(f"{i + 1}/{len(files)}  {rate:.1f} img/s  misses {len(misses)}  off-centre {len(off_centre)}",
                  flush=True)
    wall = time.perf_counter() - start

    n = len(files)
    found = first_pass + retried
    result = {
        "detector": args.detector, "backend": args.backend, "device": args.device,
        "threads": args.threads, "images": n, "found": found,
        "found_pct": round(100.0 * found / n, 3),
        "found_first_pass": first_pass, "found_after_pad_retry": retried,
        "no_face": len(misses), "only_off_centre_face": len(off_centre),
        "undecodable": len(undecodable),
        "images_per_s": round(n / wall, 2), "detect_ms_per_image": round(1000 * t_detect / n, 2),
        "decode_ms_per_image": round(1000 * t_decode / n, 2), "wall_s": round(wall, 1),
        "radius_px": args.radius, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "command": "python benchmarks/detect_lfw.py " + " ".join(sys.argv[1:]),
        "misses": misses, "off_centre": off_centre, "undecodable_files": undecodable,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"detect_lfw_{args.detector}_{args.backend}" + (f"_limit{args.limit}" if args.limit else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        f"# LFW deep-funneled: {args.detector} ({args.backend}, {args.device}, {args.threads} thread(s))", "",
        f"Command: `{result['command']}`", "",
        "| images | central face found | first pass | after pad-and-retry | no face | only an off-centre face | images/s |",
        "|---|---|---|---|---|---|---|",
        f"| {n} | {found} ({result['found_pct']}%) | {first_pass} | {retried} | {len(misses)} | "
        f"{len(off_centre)} | {result['images_per_s']} |", "",
        f"Detection {result['detect_ms_per_image']} ms/image, decoding {result['decode_ms_per_image']} ms/image, "
        f"{os.cpu_count()} CPU cores. 'Found' = the face kept by policy 'central' has its box centre within "
        f"{args.radius:g} px of the image centre. Misses: `{stem}.json`.", "",
    ]
    (out / f"{stem}.md").write_text("\n".join(md))
    print(json.dumps({k: v for k, v in result.items() if k not in ("misses", "off_centre", "undecodable_files")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
