"""``facerec calibrate-openset``: the open-set (1:N) thresholds of an exported model.

Runs the service's own pipeline (MTCNN, alignment, the fp32 ONNX graph; one embedding per image, no
flip) over every image of the validation people (LFW fold 5 of the shared data; never LFW-H2),
then, for a grid of gallery sizes, enrolls random people with one image each and searches every
image of the others: the thresholds at which the share of these non-mated searches that would be
answered "match" is at most each FPIR. Larger galleries (1,000 samples and up) get thresholds from
all cross-identity pairs of those images under independence, where enough pairs support them.
Writes ``<model_dir>/openset.json``, which the service's
gallery search reads (see facerec.gallery.openset and docs/gallery.md).

    facerec calibrate-openset models/default
    facerec calibrate-openset models/default --fpir 0.1 0.01 --repeats 50 --cache /tmp/val.npz
"""

from __future__ import annotations

import argparse

HELP = "calibrate an exported model's open-set (1:N search) thresholds at FPIRs on the validation split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("model_dir", help="a `facerec export` folder (openset.json is written into it)")
    parser.add_argument(
        "--data", default=None, help="shared data root (default $FACEREC_DATA or ../shared/data)"
    )
    parser.add_argument(
        "--fpir",
        type=float,
        nargs="+",
        default=[0.1, 0.01, 0.001],
        help="false-positive identification rates to calibrate (default: %(default)s)",
    )
    parser.add_argument(
        "--default-fpir",
        type=float,
        default=0.01,
        help="the FPIR a new gallery targets unless it says otherwise (default: %(default)g)",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="gallery sizes (default: 1 2 5 10 20 50 100 200 400)",
    )
    parser.add_argument(
        "--repeats", type=int, default=20, help="random galleries per size (default: %(default)d)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random galleries")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default: %(default)d)")
    parser.add_argument(
        "--cache", default=None, help="an .npz to keep the measured validation faces in (reused when present)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print, do not write")


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys
    from pathlib import Path

    import numpy as np

    from facerec.data import protocol
    from facerec.gallery.measure import Measured, OfflineModel, measure
    from facerec.gallery.openset import DEFAULT_SIZES, calibrate

    if not protocol.has_lfw(args.data):
        raise SystemExit(
            f"no LFW protocol files under {protocol.data_root(args.data)}/lfw (set --data or FACEREC_DATA)"
        )
    model = OfflineModel(args.model_dir, ood=False, threads=args.threads)
    people = protocol.validation_people(args.data)
    items = protocol.lfw_images_of(people, args.data)
    keys = [f"{name}/{path.name}" for path, name in items]
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        measured = Measured.load(cache)
        if measured.keys != keys:
            raise SystemExit(f"{cache} holds other images; delete it or choose another --cache")
    else:
        measured = measure(model, [p for p, _ in items], keys)
        if cache is not None:
            measured.save(cache)
    found = measured.found
    names = np.array([name for _, name in items])[found]
    where = (
        f"LFW fold 5 (validation split): {int(found.sum()):,} of {len(items):,} images of {len(people)} "
        f"people with a face found by the service pipeline; {args.repeats} random galleries per size"
    )
    calibration = calibrate(
        measured.embedding[found],
        names,
        model.contract.contract_id,
        where,
        sizes=args.sizes or DEFAULT_SIZES,
        fpirs=args.fpir,
        repeats=args.repeats,
        seed=args.seed,
    )
    key = calibration.fpir_key(args.default_fpir)  # ValueError when it is not among --fpir
    calibration.default_fpir = next(f for f in calibration.fpirs if f"{f:g}" == key)
    calibration.command = "facerec " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    searched = {
        s: n
        for s, n, m in zip(calibration.gallery_sizes, calibration.searches, calibration.size_method)
        if m == "searches"
    }
    print(
        f"{where}\nnon-mated searches per size: {searched}; larger sizes from "
        f"{calibration.impostor_pairs:,} impostor pairs"
    )
    for key, row in calibration.pair_model_check.items():
        diff = max(
            abs(a - b) for a, b in zip(row, calibration.thresholds[key]) if a is not None and b is not None
        )
        print(f"FPIR {key}: pair model vs searches, largest difference {diff:.4f}")
    for key, row in calibration.thresholds.items():
        cells = ", ".join(
            f"{s}: {'n/a' if t is None else f'{t:.4f}'}" for s, t in zip(calibration.gallery_sizes, row)
        )
        print(f"FPIR {key}: thresholds by gallery size {{{cells}}}")
    if not args.dry_run:
        out = calibration.save(model.bundle.openset_path)
        print(f"wrote {out}")
    return 0
