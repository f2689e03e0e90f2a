"""``facerec align``: detect and align faces into a model's crops (a folder tree or a ``.rec``).

The core, :func:`align_jobs`, takes a detector object or a detector factory, so tests and other
callers can inject any detector; the command line only builds the job list and the factory.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facerec.data.align import (
    ALIGNMENTS,
    TEMPLATE_ID,
    center_crop,
    ensure_three_channels,
    get_alignment,
    norm_crop,
)

REPORT_NAME = "align_report.json"
FAILURES = ("decode_error", "no_face", "many_faces")

EPILOG = """\
examples:
  facerec align tests/data/lfw_sample --out /tmp/aligned
  facerec align photos/ --out /tmp/rec --format rec --workers 8
  facerec align --pairs lfw/pairs.txt lfw/lfw-deepfunneled --out /tmp/lfw --bin /tmp/lfw.bin
  facerec align --preset pool --data ../shared/data --out /data/pool112
  facerec align --preset lfw  --data ../shared/data --out /data/lfw112
  facerec align --preset pool --pins /data/pins_raw --out /data/pool112 --prune

The input is a folder tree <input>/<identity>/<image>; the output is <out>/<identity>/<stem>.jpg
(JPEG quality 95), aligned to the ArcFace 5-point template (--alignment: another model's, such as
dlib-chip-5pt-150-v1 for `facerec import --dlib`; its folder's contract.json names it). Files already aligned are skipped,
so an interrupted run can be restarted. <out>/align_report.json lists every image that failed
(decode_error, no_face, many_faces) or got the centre-crop fallback. Grey images become RGB.
Presets follow ../shared/data/README.md: 'pool' = LFW folds 1-4 + celeba + yaleb + orl + yale
with identities prefixed by their source (lfw__Name, celeba__7201, ...); 'lfw' = every LFW image
(validation = fold 5 and LFW-H2 = folds 6-10 are read from it by facerec.data.protocol), with
validation.bin and lfw_h2.bin written beside it. --pins adds Pins to 'pool' (merged splits, without
the 35 reserved people and any LFW validation/test person; identities pins__Name); 'pins' aligns
only Pins. --prune deletes aligned files that the job list no longer produces (for example exact
duplicates dropped after an earlier run), so the tree matches the protocol.
"""


@dataclass(frozen=True)
class AlignOptions:
    size: int = 112
    policy: str = "largest"  # largest | central | single (more than one face is a failure)
    min_size: float = 20.0
    min_score: float = 0.0
    on_fail: str = "skip"  # skip | center-crop
    center_fraction: float = 0.5
    pad_retry: bool = True
    jpeg_quality: int = 95
    alignment: str = TEMPLATE_ID  # a registered alignment id (facerec.data.align.ALIGNMENTS)


@dataclass(frozen=True)
class AlignJob:
    src: str
    identity: str

    def output(self, out_root: Path) -> Path:
        return out_root / self.identity / (Path(self.src).stem + ".jpg")


def decode_rgb(path: str | os.PathLike) -> np.ndarray:
    """A file -> RGB uint8 (H, W, 3), through the hardened decoder (size limits, EXIF, alpha, 16-bit)."""
    from facerec.data.image_io import load_image

    return ensure_three_channels(load_image(path))


def find_faces(detector, image: np.ndarray, opts: AlignOptions) -> list:
    """Faces kept by the options' policy; 'single' keeps all so that a crowd can be refused."""
    from facerec.data.detect import detect_faces

    policy = "all" if opts.policy == "single" else opts.policy
    return detect_faces(
        detector, image, policy, opts.min_size, opts.min_score, pad_retry=opts.pad_retry
    )


def align_image(detector, image: np.ndarray, opts: AlignOptions) -> tuple[np.ndarray | None, str]:
    """(crop or None, status); status is 'ok', a failure name, or 'center_crop:<failure>'."""
    image = ensure_three_channels(image)
    faces = find_faces(detector, image, opts)
    if len(faces) == 1:
        return norm_crop(image, faces[0].landmarks, opts.size, opts.alignment), "ok"
    reason = "no_face" if not faces else "many_faces"
    if opts.on_fail == "center-crop":
        return center_crop(image, opts.size, opts.center_fraction), f"center_crop:{reason}"
    return None, reason


def _write_jpeg(path: Path, image_rgb: np.ndarray, quality: int) -> None:
    ok, buf = cv2.imencode(
        ".jpg",
        cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
        [int(cv2.IMWRITE_JPEG_QUALITY), quality],
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)  # an interrupted run never leaves a half file that a rerun would skip


def align_one(detector, job: AlignJob, out_root: Path, opts: AlignOptions) -> tuple[str, str, str]:
    """(source path, status, detail) for one job; never raises on bad input."""
    dst = job.output(out_root)
    if dst.exists():
        return job.src, "exists", ""
    try:
        image = decode_rgb(job.src)
    except Exception as exc:  # noqa: BLE001 - any decoder error is the input's fault, not the run's
        return job.src, "decode_error", f"{type(exc).__name__}: {exc}"
    crop, status = align_image(detector, image, opts)
    if crop is not None:
        _write_jpeg(dst, crop, opts.jpeg_quality)
    return job.src, status, ""


# Per-process state of pool workers (set once by the initializer).
_WORKER: dict = {}


def _init_worker(factory: Callable[[], object], out_root: Path, opts: AlignOptions) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already; more threads only contend
    cv2.setNumThreads(1)
    _WORKER.update(detector=factory(), out_root=out_root, opts=opts)


def _work(job: AlignJob) -> tuple[str, str, str]:
    return align_one(_WORKER["detector"], job, _WORKER["out_root"], _WORKER["opts"])


def _load_previous_fallbacks(report_path: Path, out_root: Path, jobs: dict[str, AlignJob]) -> dict:
    """Centre-crop entries of an earlier run whose output still exists, so reruns keep them."""
    if not report_path.exists():
        return {}
    try:
        old = json.loads(report_path.read_text()).get("center_crop", {})
    except (json.JSONDecodeError, AttributeError):
        return {}
    return {
        reason: [p for p in paths if p in jobs and jobs[p].output(out_root).exists()]
        for reason, paths in old.items()
    }


def align_jobs(
    jobs: Iterable[AlignJob],
    out_root: str | os.PathLike,
    opts: AlignOptions = AlignOptions(),
    detector=None,
    detector_factory: Callable[[], object] | None = None,
    workers: int = 0,
    progress: bool = True,
    mp_context: str | None = "spawn",
) -> dict:
    """Aligns every job into ``out_root`` and writes/returns the report.

    ``workers`` > 0 runs a process pool whose workers each call ``detector_factory`` once
    (detectors hold models that should not be pickled per task); otherwise ``detector`` (or
    one built by the factory) runs in this process. 'spawn' is the default start method because
    forking a process whose torch/OpenMP threads are running can deadlock the children.
    """
    from tqdm import tqdm

    jobs = list(jobs)
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    report_path = out_root / REPORT_NAME
    by_src = {j.src: j for j in jobs}
    fallbacks: dict[str, list[str]] = _load_previous_fallbacks(report_path, out_root, by_src)
    failures: dict[str, list] = {name: [] for name in FAILURES}
    counts = {"total": len(jobs), "aligned": 0, "skipped_existing": 0, "center_crop": 0}

    if workers > 0:
        if detector_factory is None:
            raise ValueError("a process pool needs a picklable detector_factory")
        pool = mp.get_context(mp_context).Pool(
            workers,
            initializer=_init_worker,
            initargs=(detector_factory, out_root, opts),
        )
        results = pool.imap_unordered(_work, jobs, chunksize=4)
    else:
        pool = None
        detector = detector if detector is not None else detector_factory()
        results = (align_one(detector, j, out_root, opts) for j in jobs)
    try:
        for src, status, detail in tqdm(
            results, total=len(jobs), desc="align", unit="img", disable=not progress
        ):
            if status == "ok":
                counts["aligned"] += 1
            elif status == "exists":
                counts["skipped_existing"] += 1
            elif status.startswith("center_crop:"):
                counts["center_crop"] += 1
                fallbacks.setdefault(status.split(":", 1)[1], []).append(src)
            elif status == "decode_error":
                failures[status].append({"path": src, "error": detail})
            else:
                failures[status].append(src)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    counts.update({name: len(v) for name, v in failures.items()})
    report = {
        "counts": counts,
        "options": opts.__dict__,
        "failures": failures,
        "center_crop": {k: sorted(v) for k, v in fallbacks.items()},
    }
    report_path.write_text(json.dumps(report, indent=1))
    return report


def folder_jobs(root: str | os.PathLike, prefix: str = "") -> list[AlignJob]:
    from facerec.data.folders import scan_identity_folders

    root = Path(root)
    return [AlignJob(str(root / rel), prefix + ident) for rel, ident in scan_identity_folders(root)]


def pair_jobs(pairs, image_root: str | os.PathLike) -> list[AlignJob]:
    """Each image of the pairs once; the output tree keeps LFW's names so the pairs still apply."""
    seen: dict[str, AlignJob] = {}
    for p in pairs:
        for name, path in zip((p.name1, p.name2), p.paths(image_root)):
            seen.setdefault(str(path), AlignJob(str(path), name))
    return list(seen.values())


def pack_rec(aligned_root: str | os.PathLike, out_dir: str | os.PathLike, size: int = 112) -> int:
    """Packs an aligned folder tree into train.rec/.idx/property (JPEG bytes copied as-is)."""
    from facerec.data.folders import build_samples
    from facerec.data.recordio import write_face_rec

    samples = build_samples(aligned_root)  # sorted by identity, so classes are contiguous
    items = ((Path(aligned_root, s.path).read_bytes(), s.label) for s in samples)
    return write_face_rec(out_dir, items, size)


def make_detector(name: str, device: str, backend: str, model_dir: str | None):
    """Picklable detector factory for pool workers (the detector itself is built in the worker)."""
    from facerec.data.detect import create_detector

    return create_detector(name=name, device=device, backend=backend, model_dir=model_dir)


def prune_tree(tree: Path, jobs: list[AlignJob]) -> int:
    """Delete .jpg files under ``tree`` (one identity level deep) that no job writes; identity
    folders left empty are removed. Returns how many files went."""
    if not tree.is_dir():
        return 0
    wanted = {job.output(tree) for job in jobs}
    removed = 0
    for ident in sorted(p for p in tree.iterdir() if p.is_dir()):
        for f in sorted(ident.glob("*.jpg")):
            if f not in wanted:
                f.unlink()
                removed += 1
        if not any(ident.iterdir()):
            ident.rmdir()
    return removed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("input", nargs="?", help="folder tree <input>/<identity>/<image>")
    parser.add_argument("--out", required=True, help="output folder (aligned tree or .rec dir)")
    parser.add_argument(
        "--format",
        choices=("folder", "rec"),
        default="folder",
        help="'rec' aligns into <out>/aligned, then packs <out>/train.rec",
    )
    parser.add_argument("--pairs", help="align only the images of this LFW-style pairs.txt")
    parser.add_argument("--bin", help="with --pairs: also write the aligned pairs as a .bin")
    parser.add_argument(
        "--preset", choices=("pool", "lfw", "pins"), help="the shared-data protocol sets"
    )
    parser.add_argument(
        "--pins", help="Pins folder ({train,val,test}/pins_<Name>/): added to --preset pool"
    )
    parser.add_argument(
        "--prune",
        action="store_true",
        help="delete aligned images under --out that no job produces (stale or dropped files)",
    )
    parser.add_argument(
        "--data",
        help="shared data root for --preset (default $FACEREC_DATA or ../shared/data)",
    )
    parser.add_argument("--size", type=int, default=None,
                        help="crop size (default: the alignment's, 112; ArcFace takes multiples of 112/128)")
    parser.add_argument("--alignment", choices=sorted(ALIGNMENTS), default=TEMPLATE_ID,
                        help="the template the faces are cut to: a model folder's contract.json `alignment` "
                             f"(default {TEMPLATE_ID})")
    parser.add_argument(
        "--policy",
        choices=("largest", "central", "single"),
        default="largest",
        help="which face to keep; 'single' fails images with several faces",
    )
    parser.add_argument("--min-size", type=float, default=20.0, help="smallest face side, px")
    parser.add_argument("--min-score", type=float, default=0.0, help="lowest detector score")
    parser.add_argument(
        "--on-fail",
        choices=("skip", "center-crop"),
        default=None,
        help="no usable face: skip the image, or save a resized central crop "
        "(recorded in the report). Default: skip; center-crop for --preset lfw",
    )
    parser.add_argument(
        "--center-fraction",
        type=float,
        default=0.5,
        help="side of the fallback crop as a fraction of the shorter side",
    )
    parser.add_argument(
        "--no-pad-retry",
        action="store_true",
        help="do not retry detection on a padded image (tight crops need it)",
    )
    parser.add_argument("--detector", default="mtcnn", help="face detector: mtcnn (shipped) or scrfd "
                        "(needs --model-dir)")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                        help="what runs the MTCNN nets: torch or onnxruntime (default: torch)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--model-dir", help="detector weights/ONNX folder")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="processes (one torch thread each); 0 = in this process",
    )
    parser.add_argument("--limit", type=int, help="align only the first N images (a dry run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_jobs(args) -> tuple[list[AlignJob], list]:
    """The jobs and, for .bin output, the pairs to pack after aligning."""
    from facerec.data import protocol
    from facerec.data.verification import parse_pairs

    for flag, path in (("--pins", args.pins), ("--pairs", args.pairs)):
        if path and not Path(path).exists():
            raise SystemExit(f"facerec align: {flag} {path} does not exist")
    if args.preset in ("lfw", "pool") and not protocol.has_lfw(args.data):
        raise SystemExit(f"facerec align: --preset {args.preset} needs the shared data's lfw/people.txt and "
                         f"pairs.txt under {protocol.data_root(args.data)} (give --data or set FACEREC_DATA)")
    if args.preset in ("pool", "pins"):
        if args.preset == "pins" or args.pins:
            if not args.pins:
                raise SystemExit("facerec align: --preset pins needs --pins DIR")
            # 'pins' alone still merges LFW pool people into their lfw__ identity
            sources = ("pins",) if args.preset == "pins" else ("lfw",) + protocol.OTHER_POOL_SOURCES + ("pins",)
        else:
            sources = ("lfw",) + protocol.OTHER_POOL_SOURCES
        items = protocol.pool_images(args.data, sources, pins=args.pins)
        return [AlignJob(str(p), ident) for p, ident in items], []
    if args.preset == "lfw":
        root = protocol.data_root(args.data)
        return folder_jobs(root / protocol.LFW_IMAGES), []
    if not args.input:
        raise SystemExit("facerec align: give an input folder or --preset")
    if not Path(args.input).is_dir():
        raise SystemExit(f"facerec align: the input folder {args.input} does not exist")
    if args.pairs:
        pairs = parse_pairs(args.pairs)
        return pair_jobs(pairs, args.input), pairs
    return folder_jobs(args.input), []


def run(args) -> int:
    from facerec.data.verification import bin_from_pairs

    on_fail = args.on_fail or ("center-crop" if args.preset == "lfw" else "skip")
    alignment = get_alignment(args.alignment)
    size = alignment.size if args.size is None else args.size
    try:
        alignment.points(size)
    except ValueError as err:
        raise SystemExit(f"facerec align: {err}") from None
    opts = AlignOptions(
        size,
        args.policy,
        args.min_size,
        args.min_score,
        on_fail,
        args.center_fraction,
        not args.no_pad_retry,
        alignment=alignment.id,
    )
    jobs, pairs = build_jobs(args)
    if args.limit:
        jobs = jobs[: args.limit]
    out = Path(args.out)
    tree = out / "aligned" if args.format == "rec" else out
    if args.prune and args.limit:
        raise SystemExit("facerec align: --prune with --limit would delete the images beyond the limit")
    factory = functools.partial(
        make_detector, args.detector, args.device, args.backend, args.model_dir
    )
    try:  # here, not first in a pool worker, where a failing initializer is restarted for ever
        detector = factory()
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"facerec align: cannot build the detector: {err}") from None
    if args.prune:
        removed = prune_tree(tree, jobs)
        print(f"pruned {removed} aligned images that no job produces")
    report = align_jobs(
        jobs,
        tree,
        opts,
        detector=detector if args.workers == 0 else None,
        detector_factory=factory,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(json.dumps(report["counts"]))
    if args.format == "rec":
        classes = pack_rec(tree, out, size)
        print(f"wrote {out / 'train.rec'} ({classes} classes)")
    if args.preset == "lfw":
        from facerec.data import protocol

        pairs_by_name = {
            "validation.bin": protocol.validation_pairs(args.data),
            "lfw_h2.bin": protocol.lfw_h2_pairs(args.data),
        }
    else:
        pairs_by_name = {args.bin: pairs} if args.bin and pairs else {}
    for name, chosen in pairs_by_name.items():
        missing = [p for p in chosen for f in p.paths(tree) if not f.exists()]
        if missing:
            print(
                f"not writing {name}: {len(missing)} pair images were not aligned "
                f"(use --on-fail center-crop)"
            )
            continue
        n = bin_from_pairs(out / name if args.preset else name, chosen, tree)
        print(f"wrote {name} ({n} pairs)")
    return 0
