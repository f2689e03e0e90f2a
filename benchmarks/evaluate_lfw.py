"""Evaluate a model on the project's protocol: validation (LFW fold 5) and LFW-H2 (folds 6-10).

    python benchmarks/evaluate_lfw.py MODEL --aligned-lfw DIR [--data ../shared/data] [--tag NAME]
        [--meta LFW_META.npz] [--h2-meta NPZ] [--validation-only] [--no-flip] [--cache-dir DIR]

MODEL is a `facerec export` folder or .onnx (onnxruntime, CPU), or a training checkpoint / torch
artefact (torch, CPU). DIR is the aligned LFW tree made by ``facerec align --preset lfw``.
Reports, with flip-augmented embeddings unless --no-flip:
- validation: 10-fold accuracy on the 600 fold-5 pairs (stratified folds of 30 genuine and 30
  impostor pairs, since fold 5 lists its 300 genuine pairs first); TAR at FAR on all cross-identity pairs of
  the fold-5 people's images; the verification threshold at FAR 1e-3 on those pairs (what a
  deployment would ship, chosen on validation only) and the raw-quality percentiles; with --meta
  holding the validation images, the same all-pairs numbers by head-pose bin (TAR of each bin's
  genuine pairs at the one threshold of FAR 1e-3), in eval_lfw_<tag>_validation/;
  ``--validation-only`` stops here (how candidates are compared before LFW-H2 is read);
- LFW-H2 (final report only): for each of the 5 folds 6-10, the threshold chosen on the other 4,
  accuracy mean +- std; EER; TAR at FAR 1e-2..1e-4 on all cross-identity pairs of the LFW-H2
  people; and, with --meta (a detection cache of the original photos, ``python -m
  facerec.eval.face_meta``), all of it split by head-pose bin (|yaw| < 15, 15-30, >= 30 degrees).
Writes benchmarks/results/eval_lfw_<tag>.json and .md, and the LFW-H2 report folder
eval_lfw_<tag>_lfw_h2/ (metrics.json, roc.json, roc.png, pose.png, summary.md) made by
facerec.eval.reports.verify_report, the same code as `facerec eval verify --protocol lfw-h2`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from facerec.data import protocol
from facerec.eval.allpairs import genuine_pairs, identity_ids, impostor_scores
from facerec.eval.calibration import quality_percentiles, threshold_at_far
from facerec.eval.embedder import embed_cached, load_embedder
from facerec.eval.face_meta import FaceMeta
from facerec.eval.pose_bins import image_yaw
from facerec.eval.reports import PairList, verify_report
from facerec.eval.verification import best_threshold, kfold_accuracy, tar_at_far

FARS = (1e-2, 1e-3, 1e-4)


def shipped_threshold(model: str) -> float | None:
    """The verification threshold written into an exported graph by `facerec calibrate`, if any
    (None for a checkpoint or an uncalibrated graph)."""
    from facerec.bundle import ModelBundle

    return ModelBundle(model).calibration().threshold


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--aligned-lfw", required=True)
    parser.add_argument("--data", default=None,
                        help="shared data root (default FACEREC_DATA or ../shared/data)")
    parser.add_argument("--tag", default="model")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--meta", default=None, help="detection cache of the original LFW photos (pose bins); "
                        "used for validation when it holds every validation image")
    parser.add_argument("--h2-meta", default=None, help="detection cache for the LFW-H2 images (default: --meta)")
    parser.add_argument("--validation-only", action="store_true",
                        help="stop after validation (choosing between candidates: LFW-H2 is read once, after)")
    parser.add_argument("--no-flip", action="store_true", help="embed each image once (as the service does)")
    parser.add_argument("--cache-dir", default=None,
                        help="reuse / save embeddings here (val.npz, lfw_h2.npz)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.time()
    flip = not args.no_flip
    embedder = load_embedder(args.model, threads=args.threads)
    aligned = Path(args.aligned_lfw)
    out_dir = Path(args.out)
    command = "python benchmarks/evaluate_lfw.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report: dict = {"model": args.model, "model_name": embedder.name, "command": command, "flip": flip}

    def images(people):
        items = protocol.lfw_images_of(people, args.data)
        keys = [f"{name}/{path.name}" for path, name in items]
        paths = [aligned / k for k in keys]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise SystemExit(f"{len(missing)} images not aligned, e.g. {missing[0]}")
        return paths, [name for _, name in items], keys

    def cache(name):
        return Path(args.cache_dir) / f"{name}.npz" if args.cache_dir else None

    def pair_list(pairs, keys, name):
        index = {k: i for i, k in enumerate(keys)}
        a = np.array([index[f"{p.name1}/{p.name1}_{p.index1:04d}.jpg"] for p in pairs])
        b = np.array([index[f"{p.name2}/{p.name2}_{p.index2:04d}.jpg"] for p in pairs])
        return PairList(a, b, np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]), name)

    # --- validation: every choice is made here ---
    v_paths, v_names, v_keys = images(protocol.validation_people(args.data))
    v_set = embed_cached(embedder, v_paths, cache("val"), flip=flip)
    v_emb = v_set.normalised(flip)
    v_pairs = pair_list(protocol.validation_pairs(args.data), v_keys, "validation pairs")
    scores = np.sum(v_emb[v_pairs.a] * v_emb[v_pairs.b], axis=1)
    kf = kfold_accuracy(scores, v_pairs.same, 10)
    ids = identity_ids(v_names)
    ga, gb = genuine_pairs(ids)
    genuine = np.sum(v_emb[ga] * v_emb[gb], axis=1)
    impostor = impostor_scores(v_emb, ids).scores.astype(np.float64)
    v_yaw = None
    if args.meta:
        v_meta = FaceMeta.load(args.meta)
        if all(k in v_meta.keys for k in v_keys):
            v_yaw = image_yaw(v_meta.select(v_keys).landmarks)
    report["validation"] = {
        "pairs": len(scores), "folds": "stratified", "accuracy_mean": kf.mean, "accuracy_std": kf.std,
        "images": len(v_paths), "genuine": len(genuine), "impostors": len(impostor),
        "tar_at_far": [asdict(t) for t in tar_at_far(genuine, impostor, FARS)],
        "threshold_far_1e-3": threshold_at_far(impostor, 1e-3),
        "threshold_best_accuracy_pairs": best_threshold(scores, v_pairs.same)[0],
        "quality_percentiles": (quality_percentiles(v_set.quality) if v_set.quality is not None else None),
    }
    if v_yaw is not None:
        # By head pose on validation: every genuine pair of the fold-5 images against the one
        # threshold at FAR 1e-3 over all their impostor pairs (the 600 listed pairs are too few per bin).
        v_pose = verify_report(
            v_emb, out_dir / f"eval_lfw_{args.tag}_validation", names=v_names, yaw=v_yaw, fars=FARS,
            title=f"{embedder.name} on validation (LFW fold 5)", command=command,
            meta={"model": embedder.name, "pose_source": args.meta})
        report["validation"]["pose_table"] = v_pose.get("pose_table")
        report["validation"]["yaw_bins"] = v_pose.get("yaw_bins")
    if args.validation_only:
        report["seconds"] = round(time.time() - t0, 1)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"eval_lfw_{args.tag}.json").write_text(json.dumps(report, indent=1, default=float))
        v = report["validation"]
        print(json.dumps({"tag": args.tag, "accuracy": v["accuracy_mean"], "accuracy_std": v["accuracy_std"],
                          "tar_at_far": {t["far"]: t["tar"] for t in v["tar_at_far"]},
                          "pose": [{k: r.get(k) for k in ("bin", "images", "genuine_all", "tar_global_0.001")}
                                   for r in (v.get("pose_table") or [])]}, indent=1, default=float))
        return 0
    # --- LFW-H2: final report only ---
    t_paths, t_names, t_keys = images(protocol.test_people(args.data))
    t_set = embed_cached(embedder, t_paths, cache("lfw_h2"), flip=flip)
    yaw = None
    if args.h2_meta or args.meta:
        meta = FaceMeta.load(args.h2_meta or args.meta).select(t_keys)
        yaw = image_yaw(meta.landmarks)
    out = out_dir
    folder = out / f"eval_lfw_{args.tag}_lfw_h2"
    h2 = verify_report(
        t_set.normalised(flip), folder, names=t_names,
        pairs=pair_list(protocol.lfw_h2_pairs(args.data), t_keys, "LFW-H2 pairs (folds 6-10)"),
        yaw=yaw, fars=FARS, title=f"{embedder.name} on LFW-H2", command=command,
        meta={"model": embedder.name,
              "embeddings": "flip-augmented (normalised sum with the mirror image)" if flip else "unflipped",
              "pose_source": args.meta})
    pl, ap = h2["pair_list"], h2["all_pairs"]
    report["lfw_h2"] = {
        "pairs": pl["pairs"], "accuracy_mean": pl["accuracy_mean"], "accuracy_std": pl["accuracy_std"],
        "fold_accuracies": pl["fold_accuracies"], "images": len(t_paths), "genuine": ap["genuine"],
        "impostors": ap["impostors"], "tar_at_far": ap["tar_at_far"], "eer_all_pairs": ap["eer"]["eer"],
        "eer_pairs": pl["eer"]["eer"], "report_folder": str(folder),
        "pose_table": h2.get("pose_table"), "yaw_bins": h2.get("yaw_bins"),
    }
    shipped = shipped_threshold(args.model)
    if shipped is not None:
        # What the service answers: one embedding per image (no flip), the threshold in the graph.
        emb = t_set.normalised(False)
        h2_pairs = pair_list(protocol.lfw_h2_pairs(args.data), t_keys, "LFW-H2")
        cos = np.sum(emb[h2_pairs.a] * emb[h2_pairs.b], axis=1)
        right = (cos >= shipped) == np.asarray(h2_pairs.same, dtype=bool)
        report["lfw_h2"]["shipped_threshold"] = {
            "threshold": shipped, "embeddings": "one per image, no flip (as the service)",
            "decision_accuracy": float(right.mean()),
            "genuine_accepted": float(right[h2_pairs.same].mean()),
            "impostors_rejected": float(right[~np.asarray(h2_pairs.same, dtype=bool)].mean())}
    report["seconds"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval_lfw_{args.tag}.json").write_text(json.dumps(report, indent=1, default=float))
    v, t = report["validation"], report["lfw_h2"]

    def tars(r):
        return ", ".join(
            f"{x['far']:g}: {100 * x['tar']:.2f}%" if x.get("supported", True) else f"{x['far']:g}: n/a"
            for x in r["tar_at_far"]
        )

    emb_text = ("L2-normalised sum of the image's and its mirror's embeddings" if flip
                else "L2-normalised embedding of the image (no flip)")
    md = [f"# {embedder.name} on the LFW protocol", "",
          f"Command: `{command}`",
          f"Embeddings: {emb_text}; cosine similarity.", "",
          ("| split | pairs | accuracy (mean ± std over folds) | images | impostor pairs | TAR at FAR "
           "| EER (all pairs) |"),
          "|---|---|---|---|---|---|---|",
          (f"| validation (LFW fold 5, 10 folds) | {v['pairs']} | {100 * v['accuracy_mean']:.2f}% ± "
           f"{100 * v['accuracy_std']:.2f} | {v['images']} | {v['impostors']:,} | {tars(v)} | – |"),
          (f"| LFW-H2 (folds 6-10, 5 folds) | {t['pairs']} | {100 * t['accuracy_mean']:.2f}% ± "
           f"{100 * t['accuracy_std']:.2f} | {t['images']} | {t['impostors']:,} | {tars(t)} | "
           f"{100 * t['eer_all_pairs']:.2f}% |"),
          "", f"Verification threshold at FAR 1e-3 on validation: {v['threshold_far_1e-3']:.4f}.",
          *([f"The graph's shipped threshold {t['shipped_threshold']['threshold']:.4f} (one embedding per "
             f"image, as the service): the match decision is right on "
             f"{100 * t['shipped_threshold']['decision_accuracy']:.2f}% of the LFW-H2 pairs (genuine "
             f"accepted {100 * t['shipped_threshold']['genuine_accepted']:.2f}%, impostors rejected "
             f"{100 * t['shipped_threshold']['impostors_rejected']:.2f}%)."]
            if "shipped_threshold" in t else []),
          f"LFW-H2 details (ROC, EER on the pair list, results by head pose): `{folder.name}/summary.md`."]
    (out / f"eval_lfw_{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
