"""``facerec eval verify|quality|ood|openset``: evaluate a model and write a report folder.

Every sub-command writes JSON numbers, PNG plots and a short ``summary.md`` into ``--out``.
The numbers come from ``facerec.eval`` (``reports.verify_report`` / ``reports.quality_report``)
and, for ``ood``, from ``facerec.ood`` with the detector shipped in the model folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from facerec.cli.eval_data import _command, _common, _embed, _floats, _meta, load_dataset

HELP = "evaluate a model (verification, face-image quality, OOD detection) into a report folder"

EPILOG = """\
data sets:
  --images DIR                 an aligned tree DIR/<identity>/<image>: all-pairs protocol (every
                               same-identity pair genuine, every cross-identity pair an impostor)
  --images DIR --pairs FILE    plus an LFW-style pairs.txt (folds from the file) over DIR
  --images DIR --protocol P    the project's LFW splits over an aligned LFW tree: 'validation'
                               (fold 5) or 'lfw-h2' (folds 6-10, final reports only)
  --bin FILE                   an insightface verification .bin (pairs of aligned images; 10 folds)

examples (the trees are cut to the model's own alignment: for models/default, model 2.1,
`facerec align --preset lfw --alignment dlib-chip-5pt-150-canvas-192-v1 --out /data/lfw192`):
  facerec eval verify models/default --images /data/lfw192 --protocol lfw-h2 \\
      --meta lfw_meta.npz --out reports/verify
  facerec eval verify models/default --bin /data/lfw192/validation.bin --detect-pose --out reports/bin
  facerec eval quality models/default --images /data/lfw192 --protocol lfw-h2 --meta lfw_meta.npz \\
      --out reports/quality
  facerec eval ood models/default --images /data/lfw192 --protocol lfw-h2 \\
      --ood ../shared/data/cifar10_ood --out reports/ood
  facerec eval openset models/default --images /data/lfw192 --protocol lfw-h2 --out reports/openset

--meta is a detection cache made by `python -m facerec.eval.face_meta ORIGINALS --out FILE` on the
original (unaligned) photos, keyed identity/file: it gives the yaw (pose bins), the detector
score and the face size. --detect-pose runs the detector on the evaluated crops instead.
"""




def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    from facerec.cli import eval_openset

    sub = parser.add_subparsers(dest="eval_command", metavar="{verify,quality,ood,openset}", required=True)
    v = sub.add_parser("verify", help="k-fold accuracy, ROC, EER, TAR@FAR (pair list and all pairs), by pose",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(v)
    v.add_argument("--no-all-pairs", action="store_true", help="skip the all-pairs protocol")
    v.add_argument("--detect-pose", action="store_true", help="detect landmarks on the evaluated crops")
    v.add_argument("--fars", type=_floats, default=[1e-2, 1e-3, 1e-4], help="e.g. 1e-2,1e-3,1e-4")
    v.add_argument("--yaw-edges", type=_floats, default=[15.0, 30.0], help="|yaw| bin edges, degrees")
    v.add_argument("--folds", type=int, default=10, help="folds for a .bin (contiguous), or within a one-fold pair list such as --protocol validation (stratified by label)")
    v.add_argument("--threshold", type=float, default=None,
                   help="the operating threshold to mark and report (e.g. the model's calibrated one; "
                   "accept score >= it); default: the threshold at --operating-far on the evaluated impostors")
    v.add_argument("--operating-far", type=float, default=1e-3,
                   help="FAR that sets the operating threshold when --threshold is not given (default: %(default)g)")
    q = sub.add_parser("quality", help="EDC / pAUC of quality measures with identity-bootstrap intervals",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(q, with_bin=False)
    q.add_argument("--pool", default=None,
                   help="aligned training-pool tree: train the CR-FIQA-style head on it")
    q.add_argument("--pool-cache", default=None, help="npz for the pool embeddings")
    q.add_argument("--head", default=None, help="a trained CR-FIQA-style head (.npz) to load, or to save "
                   "when --pool is given")
    q.add_argument("--fmrs", type=_floats, default=[1e-2, 1e-3], help="FMRs of the EDC curves, e.g. 1e-2,1e-3")
    q.add_argument("--resamples", type=int, default=200, help="identity-bootstrap resamples of the intervals")
    q.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the head training")
    q.add_argument("--balance", choices=("none", "identity", "both"), default="both",
                   help="none: every pair counts once; identity: every person's genuine pairs and every "
                   "pair of people's impostors weigh the same (identity-balanced EDC); both (default): "
                   "report both views")
    o = sub.add_parser("ood", help="AUROC / TNR of the model's shipped OOD detector (ood.npz)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_argument("model", help="a `facerec export` folder with ood.npz")
    o.add_argument("--images", required=True,
                   help="aligned faces (in-distribution): <dir>/<identity>/<image>")
    o.add_argument("--protocol", choices=("validation", "lfw-h2"), help="only these LFW people's images")
    o.add_argument("--data", default=None, help="shared data root for --protocol (default $FACEREC_DATA)")
    o.add_argument("--ood", action="append", default=[], help="folder of non-face images (repeatable)")
    o.add_argument("--limit", type=int, default=400, help="faces and OOD images per family")
    o.add_argument("--no-corruptions", action="store_true", help="skip blur/noise/occlusion/brightness")
    o.add_argument("--seed", type=int, default=0, help="seed of the image sample and the corruptions")
    o.add_argument("--out", required=True, help="report folder (created)")
    eval_openset.add_parser(sub, EPILOG)




# ------------------------------------------------------------------------------- commands
def run_verify(args) -> int:
    from facerec.eval.pose_bins import image_yaw
    from facerec.eval.reports import verify_report

    ds = load_dataset(args)
    embedder, es = _embed(args, ds)
    meta = _meta(args, ds, args.detect_pose)
    yaw = None if meta is None else image_yaw(meta.landmarks)
    if ds.pairs is None and (ds.names is None or args.no_all_pairs):
        raise SystemExit("facerec eval verify: nothing to evaluate (no pairs, and all-pairs is off)")
    report = verify_report(
        es.normalised(args.flip), args.out, names=ds.names, pairs=ds.pairs, yaw=yaw,
        all_pairs=not args.no_all_pairs, fars=args.fars, yaw_edges=args.yaw_edges,
        operating_threshold=args.threshold, operating_far=args.operating_far,
        title=f"Verification: {ds.description}", command=_command(),
        meta={"model": embedder.name, "data": ds.description,
              "embeddings": ("L2-normalised sum of the image's and its mirror's normalised embeddings"
                             if args.flip else "L2-normalised embedding of the image"),
              "pose_source": (None if meta is None else
                              f"--meta {args.meta}" if args.meta else "detector on the evaluated crops"),
              "faces_found": None if meta is None else int(meta.found.sum())})
    print((Path(args.out) / "summary.md").read_text())
    print(f"wrote {args.out}: {', '.join(report['files'].values())}, summary.md")
    return 0


def train_pool_head(args, embedder):
    from facerec.eval.crfiqa_head import fit_head_on_pool

    if not Path(args.pool).is_dir():
        raise SystemExit(f"facerec eval: --pool {args.pool} is not a folder")
    head = fit_head_on_pool(embedder, args.pool, cache=args.pool_cache, seed=args.seed, batch=args.batch,
                            progress=not args.no_progress)
    if args.head:
        head.save(args.head)
    return head


def run_quality(args) -> int:
    from facerec.eval.crfiqa_head import QualityHead
    from facerec.eval.reports import quality_report, standard_quality_measures

    ds = load_dataset(args)
    embedder, es = _embed(args, ds)
    meta = _meta(args, ds, detect=False)
    head = None
    if args.pool:
        head = train_pool_head(args, embedder)
    elif args.head:
        head = QualityHead.load(args.head)
    measures = standard_quality_measures(es, meta, head, args.seed)
    report = quality_report(
        es.normalised(args.flip), ds.names, measures, args.out, fmrs=args.fmrs, resamples=args.resamples,
        seed=args.seed, title=f"Face-image quality: {ds.description}", command=_command(),
        progress=not args.no_progress, balance=args.balance,
        meta={"model": embedder.name, "data": ds.description, "flip": args.flip,
              "crfiqa_head": None if head is None else head.info,
              "detector_meta": args.meta})
    print((Path(args.out) / "summary.md").read_text())
    files = report["files"]
    n_png = len(files["edc_plots"]) + len(files.get("edc_plots_balanced", {}))
    print(f"wrote {args.out}: quality.json, {n_png} EDC plot(s), summary.md")
    return 0


def _onnx_features(graph: Path, names: list[str] | None = None):
    """The outputs the OOD detector reads (``names``, as ``facerec fit-ood`` recorded them; by default
    the ``feature_*`` outputs in index order, or the embedding of a graph without any), for a model input."""
    import onnxruntime as ort

    from facerec.bundle import ood_layer_outputs

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = names or ood_layer_outputs(o.name for o in session.get_outputs())
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
        parts = [session.run(names, {input_name: np.ascontiguousarray(x[i : i + batch], np.float32)})
                 for i in range(0, len(x), batch)]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(names))]

    return run


def _corruptions(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Blur, noise, occlusion and bad exposure of normalised crops, rounded to 8-bit pixels."""
    import torch

    from facerec.ood import attacks

    g = torch.Generator().manual_seed(seed)
    t = torch.from_numpy(x)
    half = len(t) // 2
    sets = {"blur": attacks.gaussian_blur(t, 4.0), "noise": attacks.gaussian_noise(t, 0.2, generator=g),
            "occlusion": attacks.occlude(t, 0.4, generator=g),
            "brightness": torch.cat([attacks.brightness(t[:half], 3.0), attacks.brightness(t[half:], 0.15)])}
    return {k: ((np.clip(np.round(v.numpy() * 127.5 + 127.5), 0, 255) - 127.5) / 127.5).astype(np.float32)
            for k, v in sets.items()}


def run_ood(args) -> int:
    """Thin: the detector, its combiner and threshold come from ``ood.npz`` (``facerec fit-ood``);
    this scores the given aligned faces and OOD inputs with it and reports the separation."""
    import cv2

    from facerec.bundle import CONTRACT_FILE, OOD_FILE, BundleError, ModelBundle
    from facerec.data import protocol
    from facerec.data.datasets import read_rgb
    from facerec.data.folders import IMAGE_EXTENSIONS, scan_identity_folders
    from facerec.eval.calibration import load_batch
    from facerec.eval.embedder import normalise_images
    from facerec.eval.reports import write_json
    from facerec.ood import load as load_ood
    from facerec.ood.metrics import ood_report, rates_at_threshold

    model = ModelBundle(args.model)
    if not model.ood_path.exists() or not model.contract_path.exists():
        raise SystemExit(f"facerec eval ood: {model.folder} needs {OOD_FILE} and {CONTRACT_FILE} "
                         "(run `facerec fit-ood`)")
    det = load_ood(model.ood_path, model.contract().contract_id)
    if det.combiner is None or det.threshold is None:
        raise SystemExit(f"facerec eval ood: {model.ood_path} has no combiner / threshold")
    try:
        features = _onnx_features(model.graph("fp32"), det.meta.get("layer_outputs"))
    except BundleError as err:
        raise SystemExit(f"facerec eval ood: {err}") from None
    rng = np.random.default_rng(args.seed)
    root = Path(args.images)
    if args.protocol:
        people = (protocol.validation_people(args.data) if args.protocol == "validation"
                  else protocol.test_people(args.data))
        faces = [root / n / f"{p.stem}.jpg" for p, n in protocol.lfw_images_of(people, args.data)]
    else:
        faces = [root / r for r, _ in scan_identity_folders(root)]
    faces = [faces[i] for i in sorted(rng.permutation(len(faces))[: args.limit])]
    if not faces:
        raise SystemExit(f"facerec eval ood: no faces under {root}")

    def score(x: np.ndarray) -> np.ndarray:
        return det.combine(det.layer_scores(features(x)).detach().numpy())

    x_faces = load_batch(faces)
    s_in = score(x_faces)
    sets = {} if args.no_corruptions else _corruptions(x_faces, args.seed)
    for d in args.ood:
        files = sorted(f for f in Path(d).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise SystemExit(f"facerec eval ood: no images under {d}")
        chosen = [files[i] for i in sorted(rng.permutation(len(files))[: args.limit])]
        size = model.contract().input_size
        crops = np.stack([cv2.resize(read_rgb(f), (size, size), interpolation=cv2.INTER_LINEAR)
                          for f in chosen])
        sets[Path(d).name] = normalise_images(crops)
    if not sets:
        raise SystemExit("facerec eval ood: no OOD inputs (give --ood DIR or allow corruptions)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tpr_target = det.target_tpr or 0.95
    rows, scores_out = {}, {}
    for name, x in sets.items():
        s_out = score(x)
        scores_out[name] = s_out
        r = ood_report(s_in, s_out, tpr_target)
        r["tnr_at_shipped_threshold"] = rates_at_threshold(s_in, s_out, det.threshold)[1]
        r["n"] = len(s_out)
        rows[name] = r
    tpr_in = float(np.mean(s_in >= det.threshold))
    report = {"command": _command(), "model": str(model.folder), "faces": len(faces), "threshold": det.threshold,
              "tpr_at_shipped_threshold": tpr_in, "families": rows,
              "faces_source": args.protocol or str(root),
              "inputs": (f"aligned {model.contract().input_size}x{model.contract().input_size} face crops; --ood images "
                         "resized to that size as if the face "
                         "detector had let them through; corruptions of the face crops rounded to 8 bits"
                         + ("; no face detector runs here, so the detector's confidence column is at "
                            "its neutral value for every input (the feature layers alone)"
                            if getattr(det, "detection", None) is not None else ""))}
    write_json(out / "ood.json", report)
    _plot_ood(s_in, scores_out, det.threshold, out / "scores.png")
    key = next(k for k in next(iter(rows.values())) if k.startswith("tnr_at_tpr"))
    lines = ["# OOD detection (shipped ood.npz)", "", f"Command: `{report['command']}`", "",
             (f"{len(faces)} faces from {report['faces_source']}; shipped threshold "
              f"{det.threshold:.4f} keeps {100 * tpr_in:.1f}% of them. Inputs: {report['inputs']}."), "",
             f"| family | n | AUROC | {key} | TNR at shipped threshold |", "|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['n']} | {r['auroc']:.3f} | {r[key]:.3f} | "
                     f"{r['tnr_at_shipped_threshold']:.3f} |")
    lines += ["", "![scores](scores.png)" if (out / "scores.png").exists() else ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _plot_ood(s_in, scores_out, threshold, path: Path) -> None:
    from facerec.eval.reports import _plt

    plt = _plt()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    allv = np.concatenate([s_in, *scores_out.values()])
    bins = np.linspace(np.percentile(allv, 0.5), np.percentile(allv, 99.5), 50)
    ax.hist(s_in, bins=bins, alpha=0.6, density=True, label="faces")
    for n, s in scores_out.items():
        ax.hist(s, bins=bins, histtype="step", density=True, label=n)
    ax.axvline(threshold, color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel("in-distribution score (below the threshold = OOD)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from facerec.cli import eval_openset

    commands = {"verify": run_verify, "quality": run_quality, "ood": run_ood, "openset": eval_openset.run}
    return commands[args.eval_command](args)
