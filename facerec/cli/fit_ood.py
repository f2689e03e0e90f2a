"""``facerec fit-ood``: fit the Mahalanobis OOD detector of an exported model and ship it as
``<model dir>/ood.npz``, which the service loads (``service/engine.py``) and scores every face with.

Exactly what the service computes: every input is a photo located and aligned by the service's
own code (``facerec.ood.evalsets.ServiceLocator``), scored from the fp32 ONNX graph's
``feature_*`` outputs (onnxruntime, CPU). Data use follows the protocol (docs/ood.md,
``facerec.ood.evaldata``):

- statistics: the identity-free ``prototypes`` variant on a sample of the aligned training pool;
  layers the graph marks as ``pixel_stats`` (metadata ``feature_kinds``) are one-sided;
- combiner and threshold: validation people only (LFW fold 5) against validation samples of every
  family: non-faces (CIFAR first half, half of scikit-image's photos), corruptions, and FGSM / PGD /
  impersonation made with the torch weights (``--checkpoint``) on the photo and on the crop;
- report: LFW-H2 test people (folds 6-10) and the test samples of every family with the shipped
  combiner and threshold, leave-one-family-out numbers, controls that must pass, and the adaptive
  PGD against this very detector.

Inputs are cached (``--cache``; ``benchmarks/ood_eval.py`` with the same settings shares them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

HELP = "fit the OOD detector (Mahalanobis, prototypes) of an exported model and write ood.npz + a report"

RunFn = Callable[[np.ndarray], tuple[list[np.ndarray], np.ndarray]]  # input -> (features, embedding)


def default_cache() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "facerec" / "ood")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a `facerec export` folder")
    parser.add_argument(
        "--aligned-pool", required=True, help="aligned pool tree (`facerec align --preset pool`)"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="torch weights of the same model (training checkpoint or artefact): attacks need "
        "gradients, which the ONNX graph does not give",
    )
    parser.add_argument(
        "--data", default=None, help="shared data root (default $FACEREC_DATA or ../shared/data)"
    )
    parser.add_argument("--cache", default=default_cache(), help="input cache folder (default: %(default)s)")
    parser.add_argument(
        "--tpr", type=float, default=0.95, help="TPR on validation faces (default: %(default)g)"
    )
    parser.add_argument("--pool-images", type=int, default=3000, help="pool images for the statistics")
    parser.add_argument("--n-prototypes", type=int, default=16,
                        help="class means are pooled into this many prototypes (no per-identity means ship)")
    parser.add_argument("--min-identities", type=int, default=20, help="people per prototype, at least")
    parser.add_argument("--shrinkage", type=float, default=0.01,
                        help="covariance shrinkage towards a scaled identity (> 0; default: %(default)g)")
    parser.add_argument("--faces", type=int, default=500, help="LFW photos per split")
    parser.add_argument("--attacked", type=int, default=200, help="faces per attack / corruption set (test)")
    parser.add_argument(
        "--attacked-val", type=int, default=100, help="faces per attack / corruption set (val)"
    )
    parser.add_argument(
        "--cifar", type=int, default=1000, help="CIFAR images per split (each at 32/112/224 px)"
    )
    parser.add_argument("--skimage-crops", type=int, default=150, help="random crops per scikit-image photo")
    parser.add_argument("--attack-eps", default="2,4,8", help="FGSM/PGD ε in grey levels (/255)")
    parser.add_argument(
        "--domains", default="photo,crop", help="attack the photo (through alignment), the crop"
    )
    parser.add_argument("--pgd-steps", type=int, default=5, help="PGD attack steps (default: %(default)d)")
    parser.add_argument("--adaptive-eps", type=float, default=4.0, help="adaptive PGD ε (/255), report only")
    parser.add_argument("--adaptive-steps", type=int, default=10, help="adaptive PGD steps, report only")
    parser.add_argument(
        "--adaptive-weights",
        default="1,10",
        help="weights of the detector term in the adaptive objective (each one is run)",
    )
    parser.add_argument(
        "--no-detection-layer",
        action="store_true",
        help="leave the face detector's confidence out of the combiner (by default it is one more "
        "column: non-faces that pass the detector do so with a low confidence)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the splits, prototypes and attacks")


def onnx_runner(graph: Path) -> tuple[RunFn, list[str], dict]:
    """(run, feature output names, metadata) of an exported graph on onnxruntime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = sorted(
        (o.name for o in session.get_outputs() if o.name.startswith("feature_")),
        key=lambda n: int(n.split("_")[1]),
    )  # the service's FeatureListScorer order
    if not names:
        raise SystemExit(f"{graph} has no feature_* outputs: export it with features")
    input_name = session.get_inputs()[0].name
    meta = dict(session.get_modelmeta().custom_metadata_map)

    def run(x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        *feats, emb = session.run(
            [*names, "embedding"], {input_name: np.ascontiguousarray(x, dtype=np.float32)}
        )
        return feats, emb

    return run, names, meta


def one_sided_layers(meta: dict, n_layers: int) -> list[int]:
    """Indices of the layers the graph's metadata marks as pixel statistics (one-sided)."""
    kinds = json.loads(meta.get("facerec.feature_kinds", "[]"))
    if kinds and len(kinds) != n_layers:
        raise SystemExit(f"feature_kinds lists {len(kinds)} layers, the graph has {n_layers}")
    return [i for i, k in enumerate(kinds) if k == "pixel_stats"]


def crop_features(run: RunFn, crops: np.ndarray, batch: int = 64) -> dict:
    """Features (``f0``..) and raw embeddings of uint8 crops; ``n`` = how many."""
    from facerec.ood.evalsets import to_input

    parts = [run(to_input(crops[i : i + batch]).numpy()) for i in range(0, len(crops), batch)]
    if not parts:
        return {"n": np.array(0)}
    out = {f"f{j}": np.concatenate([p[0][j] for p in parts]) for j in range(len(parts[0][0]))}
    out["emb"] = np.concatenate([p[1] for p in parts])
    out["n"] = np.array(len(crops))
    return out


def feature_list(f: dict) -> list[np.ndarray]:
    return [f[f"f{j}"] for j in range(sum(k[0] == "f" and k[1:].isdigit() for k in f))]


def fit_statistics(
    run: RunFn,
    contract_id: str,
    pool: Sequence[tuple[Path, str]],
    one_sided: Sequence[int] = (),
    n_prototypes: int = 16,
    min_identities: int = 20,
    shrinkage: float = 0.01,
    seed: int = 0,
    batch: int = 64,
):
    """One streaming pass over the pool images -> the ``prototypes`` detector (no combiner yet)."""
    from facerec.ood import MahalanobisFitter
    from facerec.ood.evaldata import read_photos

    fitter = MahalanobisFitter()
    for i in range(0, len(pool), batch):
        chunk = pool[i : i + batch]
        f = crop_features(run, read_photos([p for p, _ in chunk]), batch)
        fitter.update(feature_list(f), [n for _, n in chunk])
    det = fitter.finalize(
        "prototypes",
        shrinkage=shrinkage,
        n_prototypes=n_prototypes,
        min_identities_per_prototype=min_identities,
        contract_id=contract_id,
        seed=seed,
        one_sided=one_sided,
    )
    return det, fitter


def layer_scores(det, f: dict, det_scores=None) -> np.ndarray:
    """(N, columns) detector scores of one set's features and, for the detection layer, the face
    detector's confidence of each crop (``det_scores``)."""
    if int(f["n"]) == 0:
        return np.zeros((0, det.n_columns))
    return det.layer_scores(feature_list(f), det_scores).numpy()


def markdown(report: dict) -> str:
    from facerec.ood.evaldata import markdown_rows

    pct = round(report["tpr_target"] * 100)
    lines = [
        "# OOD detector (Mahalanobis, prototypes) of this model",
        "",
        f"Command: `{report['command']}`",
        "",
        (
            f"Statistics on {report['pool_images']} aligned pool images of {report['pool_people']} people "
            f"(prototypes per layer {report['prototypes_per_layer']}, "
            f">= {report['min_identities_per_prototype']} people each; layers {report['feature_dims']}, "
            f"one-sided {report['one_sided_layers']}). Combiner "
            f"and threshold on {report['val_faces']} validation faces (LFW fold 5) and validation samples of "
            f"every family; reported on {report['test_faces']} LFW-H2 test faces (folds 6-10) and the test "
            f"samples. Features: ONNX graph `{report['graph']}` (onnxruntime CPU). Every input is a photo "
            "located and aligned by the service's own code; `rejected by face detector` counts photos in "
            "which no face was found (never scored)."
        ),
        "",
        (
            f"Threshold {report['threshold']:.4f} (score = in-distribution log-odds, below = OOD) for TPR "
            f"{pct}% on validation faces: TPR {report['tpr_val']:.3f} on validation, "
            f"**{report['tpr_test']:.3f} on test faces**. Combiner: every layer score capped at its "
            f"{report['ceiling_quantile']} quantile over validation faces (`none` = no cap; chosen on "
            "validation "
            "by the mean held-out AUROC within validation: "
            + ", ".join(f"{k.lower()} {v:.4f}" for k, v in report["ceiling_table"].items())
            + ")."
        ),
        "",
        *markdown_rows(report["rows"], report["tpr_target"]),
        "",
        (
            "AUROC / TNR@TPR: the shipped combiner on test data (threshold-free). Held-out: a combiner "
            "fitted without that family's validation samples (leave-one-family-out, all ε and both attack "
            "domains together), i.e. how an unseen kind of input fares. `photo` attacks perturb the whole "
            "photo through the alignment and are detected and aligned again; `crop` attacks perturb the "
            "model input. Last column: share of scored faces matching their gallery face (dodging) or "
            f"target (impersonation) at the service's threshold {report['verification_threshold']}, "
            "clean → attacked. `adaptive`: PGD that also raises this detector's score, never seen in "
            "fitting."
        ),
        "",
        (
            f"{report['seconds']} s on CPU; {report['cache']['computed']} input / feature sets computed in "
            f"this run, {report['cache']['loaded']} read from the cache."
        ),
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import torch

    from facerec.contract import EmbeddingContract
    from facerec.export.torch_artifact import load_model_file
    from facerec.ood import evalsets as ev
    from facerec.ood import save
    from facerec.ood.evaldata import (
        EvalConfig,
        InputCache,
        adaptive_row,
        adaptive_sets,
        build_split,
        det_scores_of,
        detection_layer,
        evaluate,
        lfw_splits,
        log,
        pool_sample,
    )

    t0 = time.time()
    folder = Path(args.model_dir)
    graphs = [p for p in sorted(folder.glob("*.onnx")) if not p.name.endswith(".fp16.onnx")]
    if len(graphs) != 1:
        raise SystemExit(f"{folder}: expected one fp32 .onnx graph, found {[g.name for g in graphs]}")
    contract = EmbeddingContract.from_json((folder / "contract.json").read_text())
    onnx_run, names, meta = onnx_runner(graphs[0])
    one_sided = one_sided_layers(meta, len(names))
    thr_v = float(meta.get("facerec.verification_threshold", "nan"))
    graph_id = hashlib.sha256(graphs[0].read_bytes()).hexdigest()[:12]

    torch.manual_seed(args.seed)
    model = load_model_file(args.checkpoint).model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if len(getattr(model, "feature_dims", [])) != len(names):
        raise SystemExit(
            f"--checkpoint gives {len(model.feature_dims)} feature layers, the graph {len(names)}: "
            "export the graph from these weights with this version of facerec"
        )
    cfg = EvalConfig(
        checkpoint=args.checkpoint,
        faces=args.faces,
        attacked=args.attacked,
        attacked_val=args.attacked_val,
        cifar=args.cifar,
        skimage_crops=args.skimage_crops,
        attack_eps=tuple(float(e) for e in args.attack_eps.split(",") if e),
        domains=tuple(d for d in args.domains.split(",") if d),
        pgd_steps=args.pgd_steps,
        seed=args.seed,
    )
    cache = InputCache(args.cache, cfg.cache_key(model.feature_dims))
    log(f"input cache {cache.dir}")
    rng = np.random.default_rng(args.seed)
    specs = lfw_splits(cfg, args.data, rng)
    pool = pool_sample(args.aligned_pool, args.pool_images, rng)
    locator = ev.ServiceLocator(contract)

    det, fitter = fit_statistics(
        onnx_run,
        contract.contract_id,
        pool,
        one_sided,
        args.n_prototypes,
        args.min_identities,
        args.shrinkage,
        args.seed,
    )
    log(
        f"statistics: {len(pool)} pool images of {fitter.n_identities} people, "
        f"prototypes per layer {[len(g.means) for g in det.layers]}"
    )
    sets, feats = {}, {}
    for split, spec in specs.items():
        log(f"{split}: inputs")
        sets[split] = build_split(split, spec, cfg, model, locator, cache)
        feats[split] = {
            n: cache.get(f"onnx_{graph_id}_{split}_{n}", lambda s=s: crop_features(onnx_run, s["crops"]))
            for n, s in sets[split].items()
        }
    if not args.no_detection_layer:
        det.detection = detection_layer(locator, sets["val"]["faces"])
    sv = {n: layer_scores(det, f, sets["val"][n]["det_score"]) for n, f in feats["val"].items()}
    st = {n: layer_scores(det, f, sets["test"][n]["det_score"]) for n, f in feats["test"].items()}
    emb_test = {n: f.get("emb", np.zeros((0, 1))) for n, f in feats["test"].items()}
    result = evaluate(sv, st, sets["test"], emb_test, args.tpr, thr_v)
    det.combiner, det.threshold, det.target_tpr = result["combiner"], result["threshold"], args.tpr
    rows = result["rows"]

    log("adaptive attack against this detector (test faces)")
    faces = sets["test"]["faces"]
    for name, s in adaptive_sets(
        model,
        det,
        locator,
        faces,
        emb_test["faces"],
        cache,
        cfg.domains,
        args.adaptive_eps,
        args.adaptive_steps,
        [float(w) for w in args.adaptive_weights.split(",") if w],
        args.seed + 7,
        f"fitood_{graph_id}",
    ).items():
        f = crop_features(onnx_run, s["crops"])
        s_out = det.combine(layer_scores(det, f, det_scores_of(det, s))) if len(s["crops"]) else np.zeros(0)
        rows[name] = adaptive_row(
            result["s_in"], s_out, det.threshold, s, f.get("emb"), faces, emb_test["faces"], args.tpr, thr_v
        )

    det.meta.update(
        {
            "fitted_on": "aligned pool sample (statistics); LFW fold 5 validation faces and validation "
            "samples of every family (combiner, threshold)",
            "families": sorted(sv),
            "tpr_val": result["tpr_val"],
            "feature_kinds": json.loads(meta.get("facerec.feature_kinds", "[]")),
        }
    )
    save(det, folder / "ood.npz")
    report = {
        "command": "facerec fit-ood " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "graph": graphs[0].name,
        "graph_sha256_12": graph_id,
        "contract_id": contract.contract_id,
        "checkpoint": args.checkpoint,
        "pool_images": len(pool),
        "pool_people": fitter.n_identities,
        "feature_dims": [int(f.shape[1]) for f in feature_list(feats["val"]["faces"])],
        "one_sided_layers": one_sided,
        "detection_layer": None if det.detection is None else vars(det.detection),
        "prototypes_per_layer": [len(g.means) for g in det.layers],
        "min_identities_per_prototype": args.min_identities,
        "shrinkage": args.shrinkage,
        "tpr_target": args.tpr,
        "threshold": det.threshold,
        "tpr_val": result["tpr_val"],
        "tpr_test": result["tpr_test"],
        "val_faces": len(sets["val"]["faces"]["crops"]),
        "test_faces": len(sets["test"]["faces"]["crops"]),
        "inputs": {k: v for k, v in vars(cfg).items()},
        "adaptive": {
            "eps_255": args.adaptive_eps,
            "steps": args.adaptive_steps,
            "weights": args.adaptive_weights,
        },
        "verification_threshold": thr_v,
        "combiner_weights": det.combiner.weights.tolist(),
        "rows": rows,
        "ceiling_quantile": result["ceiling_quantile"],
        "ceiling_table": result["ceiling_table"],
        "val_sets": {
            n: {"offered": int(s["offered"]), "scored": len(s["crops"])} for n, s in sets["val"].items()
        },
        "seconds": round(time.time() - t0, 1),
        "cache": {"computed": cache.computed, "loaded": cache.loaded},
    }
    (folder / "ood_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / "ood_report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {folder / 'ood.npz'} and ood_report.json/.md")
    return 0


if __name__ == "__main__":  # python -m facerec.cli.fit_ood MODEL_DIR ...
    _ap = argparse.ArgumentParser(prog="facerec fit-ood", description=HELP)
    add_arguments(_ap)
    sys.argv.insert(1, "fit-ood")  # keep the "command" line of the report the same as the CLI's
    raise SystemExit(run(_ap.parse_args(sys.argv[2:])))
