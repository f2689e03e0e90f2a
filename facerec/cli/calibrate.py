"""``facerec calibrate``: write the verification threshold and quality mapping into an export.

Both are chosen on the validation split (LFW fold 5: every cross-identity pair of its people's
images), never on the LFW-H2 test pairs, and stored in the fp32 graph's metadata through
:mod:`facerec.bundle`, where the service and the offline tools read them.
"""

from __future__ import annotations

import argparse

HELP = "calibrate an exported model's threshold (at a FAR) and quality mapping on the validation split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a `facerec export` folder")
    parser.add_argument("--aligned-lfw", required=True,
                        help="aligned LFW tree (`facerec align --preset lfw --out DIR`)")
    parser.add_argument("--data", default=None, help="shared data root (default $FACEREC_DATA or ../shared/data)")
    parser.add_argument("--far", type=float, default=1e-3, help="operating point (default: %(default)g)")
    parser.add_argument("--flip", action="store_true",
                        help="add the mirrored image's embedding; leave off for the service, which "
                        "embeds each image once")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort

    from facerec.bundle import BundleError, Calibration, ModelBundle
    from facerec.cli.eval_data import require_crop_size
    from facerec.data import protocol
    from facerec.eval.calibration import (
        all_pairs_scores,
        embed_images,
        quality_percentiles,
        threshold_at_far,
    )

    model = ModelBundle(args.model_dir)
    try:
        graph = model.graph("fp32")
    except BundleError as err:
        raise SystemExit(str(err)) from None
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = [n for n in ("embedding", "quality") if n in names]

    def embed(x):
        out = dict(zip(wanted, session.run(wanted, {session.get_inputs()[0].name: x})))
        return out["embedding"], out.get("quality")

    people = protocol.validation_people(args.data)
    items = protocol.lfw_images_of(people, args.data)
    paths = [Path(args.aligned_lfw) / name / path.name for path, name in items]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"{len(missing)} validation images are not aligned, e.g. {missing[0]}")
    require_crop_size(model.contract(), paths[0] if paths else None, f"--aligned-lfw {args.aligned_lfw}")
    emb, quality = embed_images(embed, paths, flip=args.flip)
    genuine, impostor = all_pairs_scores(emb, [name for _, name in items])
    threshold = threshold_at_far(impostor, args.far)
    tar = float((genuine > threshold).mean())
    where = (f"LFW fold 5 (validation split): {len(impostor):,} cross-identity pairs of "
             f"{len(paths):,} images of {len(people)} people"
             f"{', flip-augmented embeddings' if args.flip else ''}")
    cal = Calibration(threshold=round(float(threshold), 6), far=args.far, calibrated_on=where)
    if quality is not None:
        cal.quality_percentiles = np.asarray([round(v, 6) for v in quality_percentiles(quality)])
        cal.quality_calibrated_on = f"LFW fold 5 (validation split): {len(paths):,} aligned faces"
    print(f"threshold {threshold:.4f} at FAR {args.far:g} (TAR {100 * tar:.2f}% on "
          f"{len(genuine):,} genuine pairs); {where}")
    if quality is None and not model.quality_path.exists():
        print(f"the model has no quality output: `facerec fit-quality {args.model_dir} ...` chooses its quality "
              "measure")
    if not args.dry_run:
        print(f"wrote the calibration into {model.write_calibration(cal)}")
    return 0
