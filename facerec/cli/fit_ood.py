"""``facerec fit-ood``: fit the Mahalanobis OOD detector of an exported model and ship it as
``<model dir>/ood.npz``, which the service loads (``service/engine.py``) and scores every face with.

Exactly what the service computes: every input is a photo located and aligned by the service's
own code (``facerec.eval.ood_study.families.ServiceLocator``), scored from the fp32 ONNX graph's
``feature_*`` outputs (onnxruntime, CPU) or, for a graph without them (``facerec import`` of an
ONNX model), from its raw embedding: the one layer such a graph exposes. Data use follows the
protocol (docs/ood.md, ``facerec.eval.ood_study``), driven by :mod:`facerec.eval.ood_study.driver` as
``benchmarks/ood_eval.py`` drives it:

- statistics: the identity-free ``prototypes`` variant on a sample of the aligned training pool;
  layers the graph marks as ``pixel_stats`` (metadata ``feature_kinds``) are one-sided;
- combiner and threshold: validation people only (LFW fold 5) against validation samples of every
  family: non-faces (CIFAR first half, half of scikit-image's photos), corruptions, and FGSM / PGD /
  impersonation made with the torch weights on the photo and on the crop (``--checkpoint``, else the
  folder's torch artefact; a folder without torch weights, an imported ONNX graph, gets no attack
  families: its graph gives no gradients);
- report: LFW-H2 test people (folds 6-10) and the test samples of every family with the shipped
  combiner and threshold, leave-one-family-out numbers, controls that must pass, and the adaptive
  PGD against this very detector.

Inputs are cached (``--cache``; ``benchmarks/ood_eval.py`` with the same settings shares them).
The model folder is read and written through :mod:`facerec.bundle`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from facerec.bundle import BundleError, ModelBundle, feature_kinds
from facerec.eval.ood_study import options

HELP = "fit the OOD detector (Mahalanobis, prototypes) of an exported model and write ood.npz + a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a `facerec export` or `facerec import` folder")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="torch weights of the same model (training checkpoint or artefact): attacks need "
        "gradients, which the ONNX graph does not give (default: the folder's torch artefact <stem>.pt; "
        "without one, e.g. an imported ONNX graph, no attack families)",
    )
    options.add_arguments(parser)


def attack_model(args: argparse.Namespace, model_dir: ModelBundle, onnx_run, names: list[str]):
    """The torch weights that make the attacks (``--checkpoint``, else the folder's torch artefact),
    checked to be the graph's model; None when the folder has none (``args.checkpoint`` is set to
    what is used)."""
    import numpy as np

    from facerec.eval.ood_study import driver
    from facerec.export.parity import normalise, random_faces

    found = sorted(model_dir.folder.glob("*.pt"))
    weights = args.checkpoint or (str(found[0]) if len(found) == 1 else None)
    args.checkpoint = weights
    if weights is None:
        driver.log(f"{model_dir.folder} has no torch weights: no attack families (the graph gives no gradients)")
        return None
    source = driver.load_attack_model(weights, args.seed)
    if names != ["embedding"] and len(getattr(source.model, "feature_dims", [])) != len(names):
        raise SystemExit(
            f"--checkpoint gives {len(source.model.feature_dims)} feature layers, the graph {len(names)}: "
            "export the graph from these weights with this version of facerec"
        )
    x = normalise(random_faces(2, size=model_dir.contract().input_size, seed=11))  # the model's own crop size
    want = driver.torch_runner(source.model)(x)[1]
    got = onnx_run(x)[1].astype(np.float64)
    cos = np.sum(want * got, 1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    if cos.min() < 0.999:
        raise SystemExit(f"{weights} is not the graph's model (embedding cosine {cos.min():.4f} on test faces)")
    return source


def one_sided_layers(meta: dict, n_layers: int) -> list[int]:
    """Indices of the layers the graph's metadata marks as pixel statistics (one-sided)."""
    kinds = feature_kinds(meta)
    if kinds and len(kinds) != n_layers:
        raise SystemExit(f"feature_kinds lists {len(kinds)} layers, the graph has {n_layers}")
    return [i for i, k in enumerate(kinds) if k == "pixel_stats"]


def fit_statistics(
    run,
    contract_id: str,
    pool: Sequence[tuple[Path, str]],
    one_sided: Sequence[int] = (),
    n_prototypes: int = 16,
    min_identities: int = 20,
    shrinkage: float = 0.01,
    seed: int = 0,
    batch: int = 64,
):
    """One streaming pass over the pool images -> the ``prototypes`` detector (no combiner yet);
    ``run``: a :data:`facerec.eval.ood_study.driver.RunFn`."""
    from facerec.eval.ood_study.driver import crop_features, feature_list
    from facerec.eval.ood_study.splits import read_photos
    from facerec.ood import MahalanobisFitter

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


def markdown(report: dict) -> str:
    from facerec.eval.ood_study.scoring import markdown_rows

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
            f"samples. Features: ONNX graph `{report['graph']}` (onnxruntime CPU), outputs "
            f"{', '.join(report.get('layer_outputs', []))}. Attacks: {report.get('attacks', 'torch weights')}. "
            "Every input is a photo "
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
    from facerec.cli.eval_data import require_crop_size
    from facerec.eval.ood_study import driver
    from facerec.eval.ood_study.scoring import evaluate
    from facerec.ood import save

    t0 = time.time()
    model_dir = ModelBundle(args.model_dir)
    try:
        graph = model_dir.graph("fp32")
    except BundleError as err:
        raise SystemExit(str(err)) from None
    contract = model_dir.contract()
    onnx_run, names, meta = driver.onnx_runner(graph)
    one_sided = one_sided_layers(meta, len(names))
    thr_v = model_dir.calibration().threshold
    thr_v = float("nan") if thr_v is None else thr_v
    graph_id = hashlib.sha256(graph.read_bytes()).hexdigest()[:12]

    source = attack_model(args, model_dir, onnx_run, names)
    if source is None:
        args.domains = ""  # no gradients, no attacks
    dims = json.loads(meta.get("facerec.feature_dims", "[]")) or [contract.embedding_size]  # the cache's key
    study = driver.open_study(args, source, contract, [int(d) for d in dims])
    pool = study.pool
    require_crop_size(contract, pool[0][0] if len(pool) else None, f"--aligned-pool {args.aligned_pool}")

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
    driver.log(f"statistics: {len(pool)} pool images of {fitter.n_identities} people, "
               f"prototypes per layer {[len(g.means) for g in det.layers]}")

    def features(crops):
        return driver.crop_features(onnx_run, crops)

    study.build_inputs(features, f"onnx_{graph_id}")
    study.add_detection_layer(det)
    sv, st = study.split_scores(det, "val"), study.split_scores(det, "test")
    result = evaluate(sv, st, study.sets["test"], study.test_embeddings(), args.tpr, thr_v)
    det.combiner, det.threshold, det.target_tpr = result["combiner"], result["threshold"], args.tpr
    rows = result["rows"]
    if source is not None:
        driver.log("adaptive attack against this detector (test faces)")
        rows.update(study.adaptive_rows(det, result["s_in"], features, f"fitood_{graph_id}", thr_v))

    det.meta.update(
        {
            "fitted_on": "aligned pool sample (statistics); LFW fold 5 validation faces and validation "
            "samples of every family (combiner, threshold)",
            "families": sorted(sv),
            "tpr_val": result["tpr_val"],
            "feature_kinds": feature_kinds(meta) or (["embedding"] if names == ["embedding"] else []),
            "layer_outputs": names,
        }
    )
    save(det, model_dir.ood_path)
    sets, cache = study.sets, study.cache
    report = {
        "command": "facerec fit-ood " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "graph": graph.name,
        "graph_sha256_12": graph_id,
        "contract_id": contract.contract_id,
        "checkpoint": args.checkpoint,
        "layer_outputs": names,
        "attacks": (f"made with the torch weights {args.checkpoint}" if source is not None else
                    "none: the folder has no torch weights (an imported ONNX graph gives no gradients), "
                    "so no FGSM / PGD / impersonation / adaptive sets were made or fitted on"),
        "pool_images": len(pool),
        "pool_people": fitter.n_identities,
        "feature_dims": [int(f.shape[1]) for f in driver.feature_list(study.feats["val"]["faces"])],
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
        "inputs": {k: v for k, v in vars(study.cfg).items()},
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
    json_path, md_path = model_dir.ood_report_paths
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {model_dir.ood_path} and {json_path.name}/{md_path.suffix}")
    return 0


if __name__ == "__main__":  # python -m facerec.cli.fit_ood MODEL_DIR ...
    _ap = argparse.ArgumentParser(prog="facerec fit-ood", description=HELP)
    add_arguments(_ap)
    sys.argv.insert(1, "fit-ood")  # keep the "command" line of the report the same as the CLI's
    raise SystemExit(run(_ap.parse_args(sys.argv[2:])))
