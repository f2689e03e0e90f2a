"""EDC / pAUC comparison of face-image quality measures on LFW-H2, on one model's embeddings.

    python benchmarks/quality_eval.py [--model models/default/vit_tiny_fiqa.onnx]
        [--aligned-lfw /work/aligned/lfw] [--data /work/shared/data] [--resamples 200] [--tag NAME]

Images: every image of the LFW-H2 people (View-2 folds 6-10). Pairs: all genuine pairs (same
person) and all cross-identity impostor pairs of those images. Scores: cosine of the L2-normalised
embeddings (no flip augmentation unless --flip, to keep the run short). Quality measures, all on
the same embeddings / images: the ViT-FIQA quality token (ONNX ``quality`` output), the norm of the
un-normalised embedding, Laplacian-variance sharpness and grey-level contrast (std) of the aligned
112x112 crop, and a seeded random order. Pair quality = min of the two images'. EDC: FNMR after
discarding the lowest-quality fraction of genuine pairs, the threshold fixed once at 0% discard for
the target FMR over all impostors (ISO-style; CR-FIQA re-estimates it at each step, we do not).
pAUC: un-normalised trapezoid area over discard 0-30% and 0-95%, percentile bootstrap 95% CIs
(genuine pairs and impostors resampled, threshold re-estimated per resample, same resamples for
every measure). Writes benchmarks/results/quality_eval_<tag>.{json,md} and one EDC PNG per FMR.
Not covered: a CR-FIQA-style head and the face detector's score (no such head / no detector
scores for pre-aligned crops).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from facerec.data import protocol
from facerec.eval.calibration import embed_images
from facerec.eval.quality import (
    DEFAULT_DISCARD,
    bootstrap_ci,
    edc_curve,
    fixed_threshold,
    pair_quality,
    plot_edc,
)

FMRS = (1e-2, 1e-3)
UPPERS = (0.3, 0.95)


def image_heuristics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Laplacian-variance sharpness, grey-level std) of a normalised (N, 3, H, W) batch."""
    grey = x.mean(axis=1) * 127.5 + 127.5
    lap = (-4 * grey[:, 1:-1, 1:-1] + grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1]
           + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:])
    return lap.reshape(len(x), -1).var(axis=1), grey.reshape(len(x), -1).std(axis=1)


def onnx_embedder(model: Path, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x):
        emb, q = session.run(["embedding", "quality"], {input_name: x})
        sharp, contrast = image_heuristics(x)
        # the "quality" slot carries all per-image measures of the unflipped image
        extra = np.stack([q.ravel(), np.linalg.norm(emb, axis=1), sharp, contrast], axis=1)
        return emb, extra

    return run


def genuine_pairs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = [], []
    for k in np.unique(ids):
        idx = np.flatnonzero(ids == k)
        if idx.size > 1:
            i, j = np.triu_indices(idx.size, k=1)
            a.append(idx[i])
            b.append(idx[j])
    return np.concatenate(a), np.concatenate(b)


def impostor_scores(emb: np.ndarray, ids: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Cosine scores of every unordered cross-identity pair (float32), in row chunks."""
    out = []
    emb = emb.astype(np.float32)
    for s in range(0, len(emb), chunk):
        sims = emb[s:s + chunk] @ emb.T
        rows = np.arange(s, min(s + chunk, len(emb)))[:, None]
        mask = (np.arange(len(emb))[None, :] > rows) & (ids[s:s + chunk, None] != ids[None, :])
        out.append(sims[mask])
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/default/vit_tiny_fiqa.onnx")
    ap.add_argument("--aligned-lfw", default="/work/aligned/lfw")
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--limit", type=int, default=0, help="first N people only (smoke test)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cache", default="", help="npz to reuse/save the embeddings and measures")
    ap.add_argument("--tag", default="vit_tiny_fiqa")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    t0 = time.time()

    people = protocol.test_people(args.data)
    if args.limit:
        people = people[: args.limit]
    items = protocol.lfw_images_of(people, args.data)
    paths = [Path(args.aligned_lfw) / name / path.name for path, name in items]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"{len(missing)} images not aligned, e.g. {missing[0]}")
    names = [name for _, name in items]
    ids = np.unique(np.asarray(names), return_inverse=True)[1]

    if args.cache and Path(args.cache).exists():
        z = np.load(args.cache)
        emb, extra = z["emb"], z["extra"]
    else:
        emb, extra = embed_images(onnx_embedder(Path(args.model), args.threads), paths, flip=args.flip)
        if args.cache:
            np.savez(args.cache, emb=emb, extra=extra)
    t_embed = time.time() - t0
    rng = np.random.default_rng(args.seed)
    measures = {
        "ViT-FIQA token": extra[:, 0],
        "embedding norm": extra[:, 1],
        "sharpness (Laplacian var.)": extra[:, 2],
        "contrast (grey std)": extra[:, 3],
        "random": rng.random(len(paths)),
    }

    ga, gb = genuine_pairs(ids)
    genuine = np.einsum("ij,ij->i", emb[ga], emb[gb]).astype(np.float64)
    impostor = impostor_scores(emb, ids)
    print(f"{len(paths):,} images of {len(people):,} people; {genuine.size:,} genuine, "
          f"{impostor.size:,} impostor pairs; embedding {t_embed:.0f}s", file=sys.stderr)

    discard = DEFAULT_DISCARD
    results = {}
    curves_by_fmr = {}
    for fmr in FMRS:
        threshold, supported, allowed = fixed_threshold(impostor, fmr)
        entry = {"threshold": threshold, "supported": supported, "impostors_allowed_above": allowed,
                 "measures": {}}
        curves = {}
        for name, q in measures.items():
            gq = pair_quality(q[ga], q[gb])
            curve = edc_curve(genuine, impostor, gq, fmr=fmr, discard=discard, threshold=threshold
                              if supported else None)
            curves[name] = curve
            boot = bootstrap_ci(genuine, impostor, gq, fmr=fmr, discard=discard, uppers=UPPERS,
                                num_resamples=args.resamples, seed=args.seed)
            entry["measures"][name] = {"edc": curve.as_dict(), "bootstrap": boot.as_dict()}
            print(f"FMR {fmr:g} {name}: pAUC30 {boot.point['pauc_0.3']:.5f} "
                  f"[{boot.low['pauc_0.3']:.5f}, {boot.high['pauc_0.3']:.5f}]  ({time.time() - t0:.0f}s)",
                  file=sys.stderr)
        results[f"{fmr:g}"] = entry
        curves_by_fmr[fmr] = curves

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quality_eval_{args.tag}"
    pngs = []
    for fmr, curves in curves_by_fmr.items():
        png = out / f"{stem}_edc_fmr{fmr:g}.png"
        plot_edc(curves, png, title=f"EDC, LFW-H2 all pairs, FMR {fmr:g} (threshold fixed at 0% discard)")
        pngs.append(str(png))
    command = "python benchmarks/quality_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "command": command.strip(),
        "model": args.model,
        "set": "LFW-H2 people (View-2 folds 6-10), all images, all genuine and cross-identity pairs",
        "num_images": len(paths), "num_people": len(people),
        "num_genuine": int(genuine.size), "num_impostor": int(impostor.size),
        "flip": args.flip,
        "conventions": {
            "pair_quality": "min(q_a, q_b)",
            "threshold": "fixed at 0% discard for the target FMR over all impostors (ISO-style); "
                         "CR-FIQA re-estimates it at every discard step, not done here",
            "accept": "score > threshold",
            "discard_grid": "0.00..0.95 step 0.01; floor(u*n) lowest-quality genuine pairs dropped",
            "pauc": "trapezoid area under FNMR(u), not normalised (divide by 0.3 / 0.95 for mean FNMR)",
            "bootstrap": f"{args.resamples} percentile resamples, seed {args.seed}, 95%; genuine pairs "
                         "and impostors resampled (threshold re-estimated); same resamples per measure",
        },
        "not_covered": ["CR-FIQA-style head (none trained)",
                        "face detector score (the crops are pre-aligned; no detector scores kept)"],
        "results": results,
        "plots": pngs,
        "runtime_s": round(time.time() - t0, 1),
        "embedding_s": round(t_embed, 1),
    }
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))

    lines = [f"# Quality evaluation (EDC / pAUC): {Path(args.model).name}", "",
             f"Command: `{report['command']}`", "",
             (f"{report['set']}: {len(paths):,} images of {len(people):,} people, "
              f"{genuine.size:,} genuine and {impostor.size:,} impostor pairs; cosine scores of "
              f"{'flip-augmented' if args.flip else 'unflipped'} L2-normalised embeddings."), "",
             ("Conventions: pair quality = min of the two images'; FNMR at a threshold **fixed at 0% "
              "discard** for the target FMR over all impostors (CR-FIQA's code re-estimates it at every "
              "discard step; we do not); pAUC = un-normalised trapezoid area under FNMR vs discard "
              f"fraction (lower is better); {args.resamples}-resample percentile bootstrap 95% CI "
              "(genuine pairs and impostors resampled, same resamples for every measure)."), ""]
    for fmr in FMRS:
        e = results[f"{fmr:g}"]
        lines += [f"## FMR {fmr:g} (threshold {e['threshold']:.4f})", "",
                  "| quality measure | FNMR @0% | FNMR @30% | pAUC 0-30% [95% CI] | pAUC 0-95% [95% CI] |",
                  "|---|---|---|---|---|"]
        for name, m in e["measures"].items():
            b = m["bootstrap"]
            f = m["edc"]["fnmr"]
            i30 = int(np.argmin(np.abs(discard - 0.3)))
            lines.append(
                f"| {name} | {f[0]:.4f} | {f[i30]:.4f} | {b['point']['pauc_0.3']:.5f} "
                f"[{b['ci_low']['pauc_0.3']:.5f}, {b['ci_high']['pauc_0.3']:.5f}] | "
                f"{b['point']['pauc_0.95']:.5f} [{b['ci_low']['pauc_0.95']:.5f}, "
                f"{b['ci_high']['pauc_0.95']:.5f}] |")
        lines += ["", f"![EDC FMR {fmr:g}]({Path(pngs[FMRS.index(fmr)]).name})", ""]
    lines += [("Caveat: the bootstrap treats pairs as independent; pairs share images and identities "
               "(a few people with many images contribute most genuine pairs), so the intervals are "
               "narrower than a resampling of identities would give. `--cache` only stores the "
               "embeddings for re-runs; results are the same without it."), "",
              "Not covered: " + "; ".join(report["not_covered"]) + ".",
              f"Runtime {report['runtime_s']:.0f} s (embedding {t_embed:.0f} s), 2 CPU cores.", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
