"""``facerec teach``: compute a teacher's embeddings of a dataset once, into a teacher cache.

The cache is keyed by the sha256 of each image's bytes (the bytes the trainer reads) and holds one
teacher (its id: name, version, weights and options hash). Runs are resumable: a killed run keeps
what it finished and the next run computes only the rest. ``--val`` prints the teacher's own
accuracy on the validation pairs (LFW fold 5) as a sanity check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """\
examples:
  facerec teach dlib --data /data/pool112 --out /data/teacher/dlib --workers 2 --val
  facerec teach dlib --preset pool --aligned /data/pool112 --out /data/teacher/dlib
  facerec teach onnx --model w600k_r50.onnx --data /data/pool112 --out /data/teacher/w600k
  facerec teach facerec --model models/default --data train.rec --out /data/teacher/default

--data is an identity-folder tree (its manifest.csv when there is one) or an insightface .rec.
--preset pool --aligned DIR keys the cache by the aligned pool's files (what training reads) but
feeds a photo teacher (dlib) the ORIGINAL photo each crop was cut from, as dlib's own pipeline
wants; aligned files without a known original are fed as they are. Teacher options: -o KEY=VALUE
(a JSON value, else a string), e.g. -o bgr=true -o jitters=10.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("teacher", help="a registered teacher: dlib, onnx, facerec")
    parser.add_argument("--model", help="the teacher's model: an .onnx file (onnx); a model folder, "
                        ".onnx, torch artefact or checkpoint (facerec); the .dat folder (dlib, optional)")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a teacher option, repeatable")
    parser.add_argument("--data", help="identity-folder tree or .rec to embed")
    parser.add_argument("--preset", choices=("pool",), help="the protocol's training pool (needs --aligned)")
    parser.add_argument("--aligned", help="--preset pool: the aligned pool (`facerec align --preset pool`)")
    parser.add_argument("--sources", nargs="+", help="--preset pool: embed only these pool sources' images "
                        "(e.g. lfw celeba celeba10k; default: all the aligned pool holds)")
    parser.add_argument("--pins", help="--preset pool: the Pins folder, if the aligned pool has it")
    parser.add_argument("--data-root", help="shared data root (default $FACEREC_DATA or ../shared/data)")
    parser.add_argument("--out", help="the cache folder (one teacher per folder)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    parser.add_argument("--batch-size", type=int, default=16, help="images per teacher call (default: %(default)d)")
    parser.add_argument("--limit", type=int, help="only the first N images (a dry run)")
    parser.add_argument("--stop-after", type=int,
                        help="stop after about N new images (whole batches); rerun to go on")
    parser.add_argument("--val", action="store_true",
                        help="print the teacher's accuracy on LFW fold 5's 600 pairs (the validation split)")
    parser.add_argument("--val-aligned", help="aligned LFW tree for --val (aligned teachers; default: "
                        "align the original photos on the fly)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"facerec teach: option {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def folder_items(root: Path) -> list:
    from facerec.data.folders import folder_samples

    return [(("file", str(root / s.path)),) * 2 for s in folder_samples(root)]


def rec_items(path: Path) -> list:
    from facerec.data.recordio import FaceRecReader

    rec = path / "train.rec" if path.is_dir() else path
    n = len(FaceRecReader(rec))
    return [(("rec", str(rec), i),) * 2 for i in range(n)]


def pool_items(args, photo_teacher: bool) -> tuple[list, int]:
    """(items over the aligned pool's files, how many are fed their original photo)."""
    from facerec.cli.align import AlignJob
    from facerec.data import protocol
    from facerec.data.folders import scan_identity_folders

    if not args.aligned:
        raise SystemExit("facerec teach: --preset pool needs --aligned DIR (the aligned pool the trainer reads)")
    aligned = Path(args.aligned)
    originals: dict[str, str] = {}
    if photo_teacher:
        sources = tuple(args.sources or ("lfw",) + protocol.OTHER_POOL_SOURCES + (("pins",) if args.pins else ()))
        for path, ident in protocol.pool_images(args.data_root, sources, pins=args.pins):
            originals[str(AlignJob(str(path), ident).output(aligned))] = str(path)
    items, from_photo = [], 0
    for rel, _ in scan_identity_folders(aligned):
        source = Path(rel).parts[0].partition(protocol.SEP)[0]
        if args.sources and source not in args.sources:
            continue  # --sources: embed only these sources' images (aligned folders <source>__<id>)
        key = str(aligned / rel)
        photo = originals.get(key)
        from_photo += photo is not None
        items.append((("file", key), ("file", photo or key)))
    return items, from_photo


def validation(spec, teacher, args) -> str:
    """The teacher's k-fold accuracy on LFW fold 5's pairs (stratified 10 folds, as training)."""
    import numpy as np

    from facerec.data import protocol
    from facerec.eval.verification import kfold_accuracy
    from facerec.teachers.compute import embed_all

    root = protocol.data_root(args.data_root)
    pairs = protocol.validation_pairs(root)
    image_root = Path(args.val_aligned) if args.val_aligned else root / protocol.LFW_IMAGES
    files = sorted({p for pair in pairs for p in pair.paths(image_root)})
    missing = [f for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"--val: {len(missing)} validation images are missing, e.g. {missing[0]}")
    index = {f: i for i, f in enumerate(files)}
    emb = np.zeros((len(files), teacher.embedding_size), np.float32)
    sources = [("file", str(f)) for f in files]
    for start, rows in embed_all(spec, sources, args.workers, args.batch_size,
                                 teacher=teacher if args.workers <= 1 else None):
        emb[start : start + len(rows)] = rows
    a = np.array([index[p.paths(image_root)[0]] for p in pairs])
    b = np.array([index[p.paths(image_root)[1]] for p in pairs])
    scores = np.sum(emb[a] * emb[b], axis=1)
    failed = ~np.isfinite(scores)
    scores[failed] = -1.0  # a pair without a face is called "different"
    same = np.array([p.same for p in pairs])
    result = kfold_accuracy(scores, same, 10)
    acc = np.asarray(result.accuracies)
    return (f"validation (LFW fold 5, {len(pairs)} pairs, 10-fold): accuracy {100 * acc.mean():.2f}% "
            f"± {100 * acc.std():.2f}; {int(failed.sum())} pairs without a face; genuine cosine "
            f"{np.nanmean(scores[same & ~failed]):.3f}, impostor {np.nanmean(scores[~same & ~failed]):.3f}")


def run(args: argparse.Namespace) -> int:
    from facerec.teachers import MissingExtraError, TeacherCacheError
    from facerec.teachers.compute import TeacherSpec, one_thread, teach

    one_thread()  # before the teacher loads its libraries: every process runs one thread
    kwargs = parse_options(args.option)
    if args.model:
        kwargs["path"] = args.model
    spec = TeacherSpec(args.teacher, kwargs)
    try:
        teacher = spec.build()
    except (MissingExtraError, FileNotFoundError, TypeError, ValueError) as err:
        raise SystemExit(f"facerec teach: {err}") from None
    if args.preset == "pool":
        items, from_photo = pool_items(args, teacher.input_kind == "photo")
        print(f"aligned pool: {len(items):,} images, {from_photo:,} fed their original photo")
    elif args.data:
        path = Path(args.data)
        if not path.exists():
            raise SystemExit(f"facerec teach: {path} does not exist")
        is_rec = path.suffix == ".rec" or (path.is_dir() and (path / "train.rec").exists())
        items = rec_items(path) if is_rec else folder_items(path)
    elif not args.val:
        raise SystemExit("facerec teach: give --data, --preset pool or --val")
    else:
        items = []
    if args.limit:
        items = items[: args.limit]
    if items and not args.out:
        raise SystemExit("facerec teach: --out DIR is needed (the cache folder)")
    if items:
        try:
            summary = teach(spec, items, args.out, args.workers, args.batch_size, args.stop_after,
                            progress=not args.no_progress, teacher=teacher)
        except TeacherCacheError as err:
            raise SystemExit(f"facerec teach: {err}") from None
        print(summary.line())
        print(f"cache: {args.out}")
    if args.val:
        print(f"teacher {teacher.teacher_id}: {validation(spec, teacher, args)}")
    return 0
