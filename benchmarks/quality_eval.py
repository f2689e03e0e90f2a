"""EDC / pAUC comparison of face-image quality measures on LFW-H2, on one model's embeddings.

    python benchmarks/quality_eval.py [--model models/default] [--aligned-lfw /data/lfw112]
        [--data ../shared/data] [--meta LFW_META.npz] [--pool /data/pool112]
        [--resamples 200] [--tag NAME] [--cache E.npz] [--pool-cache P.npz]
        [--balance none|identity|both]

Images: every image of the LFW-H2 people (View-2 folds 6-10). Pairs: all genuine pairs (same
person) and all cross-identity impostor pairs of those images. Scores: cosine of the L2-normalised
embeddings (unflipped unless --flip). Quality measures, all on the same images and embeddings:

- the model's quality output (the ViT-FIQA token), the reference;
- a CR-FIQA-style head on the frozen embedding (``facerec.eval.crfiqa_head``): an MLP trained on the
  training POOL's embeddings (never LFW-H2) to predict the certainty ratio against the pool's
  class centres (identities with >= 2 images, leave-one-out own centre);
- the norm of the un-normalised embedding;
- the face detector's score and the detected face size on the original photo (from --meta, a
  ``python -m facerec.eval.face_meta`` cache of MTCNN on the original LFW images);
- sharpness (Laplacian variance) and exposure (-|mean grey - 127.5|) of the aligned crop, and
  the mean percentile rank of sharpness, exposure and face size ("image heuristic");
- a seeded random order.

EDC: FNMR after discarding the lowest-quality fraction of genuine pairs (pair quality = min of the
two images'), the threshold fixed once at 0% discard for the FMR over all impostors. pAUC: the
un-normalised trapezoid area over discard 0-30% and 0-95%. 95% intervals: identity-level
bootstrap (``facerec.eval.cluster_bootstrap``), the same resamples for every measure, and the
paired interval of each measure's pAUC minus the reference's. Everything goes through
``facerec.eval.quality_report.quality_report``, the code of ``facerec eval quality``. Writes
benchmarks/results/quality_eval_<tag>/ (quality.json, summary.md, edc_fmr*.png).

--balance (default both): besides the plain view (every pair counts once, so George W. Bush is 77%
of the genuine pairs), the identity-balanced view: every person's genuine pairs together weigh
the same and every pair of people's impostors together weigh the same (threshold included), on
the same identity resamples (``quality.json``: ``balanced``; plots ``edc_balanced_fmr*.png``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from facerec.data import protocol
from facerec.eval.crfiqa_head import QualityHead, fit_head_on_pool
from facerec.eval.embedder import embed_cached, load_embedder
from facerec.eval.face_meta import FaceMeta
from facerec.eval.quality_report import quality_report, standard_quality_measures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/default", help="export folder, .onnx or checkpoint")
    ap.add_argument("--aligned-lfw", default="/data/lfw112")
    ap.add_argument("--data", default=None, help="shared data root (default FACEREC_DATA or ../shared/data)")
    ap.add_argument("--meta", default=None, help="detection cache of the original LFW photos")
    ap.add_argument("--pool", default=None, help="aligned training pool: trains the CR-FIQA-style head")
    ap.add_argument("--head", default=None, help="a trained head .npz to load (or to save with --pool)")
    ap.add_argument("--pool-cache", default=None)
    ap.add_argument("--cache", default=None, help="npz to reuse / save the LFW-H2 embeddings")
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--balance", choices=("none", "identity", "both"), default="both",
                    help="plain view, identity-balanced view, or both (default)")
    ap.add_argument("--tag", default="vit_tiny_fiqa")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    t0 = time.time()
    command = "python benchmarks/quality_eval.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    embedder = load_embedder(args.model, threads=args.threads)
    items = protocol.lfw_images_of(protocol.test_people(args.data), args.data)
    keys = [f"{name}/{path.name}" for path, name in items]
    paths = [Path(args.aligned_lfw) / k for k in keys]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"{len(missing)} images not aligned, e.g. {missing[0]}")
    es = embed_cached(embedder, paths, args.cache, flip=args.flip)
    t_embed = time.time() - t0
    meta = FaceMeta.load(args.meta).select(keys) if args.meta else None
    head = None
    if args.pool:
        head = fit_head_on_pool(embedder, args.pool, cache=args.pool_cache, seed=args.seed)
        if args.head:
            head.save(args.head)
    elif args.head:
        head = QualityHead.load(args.head)
    t_head = time.time() - t0 - t_embed
    measures = standard_quality_measures(es, meta, head, args.seed)
    out = Path(args.out) / f"quality_eval_{args.tag}"
    not_covered = []
    if head is None:
        not_covered.append("CR-FIQA-style head (give --pool or --head)")
    if meta is None:
        not_covered.append("detector score and face size (give --meta)")
    report = quality_report(
        es.normalised(args.flip), [name for _, name in items], measures, out, resamples=args.resamples,
        seed=args.seed, balance=args.balance,
        title=f"Quality measures on LFW-H2 all pairs: {embedder.name}", command=command,
        meta={"model": embedder.name, "set": "LFW-H2 people (View-2 folds 6-10), all images",
              "flip": args.flip, "crfiqa_head": None if head is None else head.info,
              "detector_meta": args.meta, "not_covered": not_covered,
              "seconds_embedding": round(t_embed, 1), "seconds_head": round(t_head, 1)})
    report["seconds_total"] = round(time.time() - t0, 1)
    lines = (out / "summary.md").read_text().rstrip("\n").split("\n")
    if head is not None:
        h = head.info
        lines += ["", (f"CR-FIQA-style head: MLP ({h['hidden']} hidden units) on the frozen raw embedding, "
                       f"trained on {h['train_images']:,} pool images ({h['pool_images']:,} in the pool, "
                       f"{h['target_identities']:,} identities with >= 2 images), epoch {h['best_epoch']} "
                       f"kept by the loss on an identity-disjoint {h['val_images']:,}-image split "
                       f"(Spearman {h['val_spearman']:.3f} to the target there).")]
    if not_covered:
        lines += ["", "Not covered: " + "; ".join(not_covered) + "."]
    lines += ["", (f"Runtime {report['seconds_total']:.0f} s on 2 shared CPU cores (embedding "
                   f"{t_embed:.0f} s{' from --cache' if args.cache else ''}, head {t_head:.0f} s).")]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
