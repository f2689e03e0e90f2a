"""Mahalanobis OOD detector of a trained model, evaluated as the service sees its inputs.

Every OOD input is a photo that goes through the service's own face location (MTCNN + alignment,
``facerec.eval.ood_study.families.ServiceLocator``); photos without a face are counted as rejected
by the face detector and not scored. Driven by :mod:`facerec.eval.ood_study.driver`, as
``facerec fit-ood`` is. Protocol (shared/data/README.md):

- statistics: a sample of the aligned training pool (``--aligned-pool``), all three variants
  (class-conditional, global, prototypes) from one streaming pass;
- combiner and threshold: validation people (LFW fold 5) and validation samples of the OOD
  families; nothing of the test split is used for fitting or tuning;
- results: test people (LFW folds 6-10) and test samples of every family. Each family is also
  reported with a combiner that never saw it (leave-one-family-out): all ε of an attack and both
  attack domains are held out together.

Families: non-faces (CIFAR-10 at 32/112/224 px; scikit-image photos, crops and non-face patches;
photos split between validation and test), corruptions of the photos (blur, noise, occlusion,
brightness), FGSM / PGD dodging at ε/255 and PGD impersonation, on the photo (through the
alignment, then detected again) and on the aligned crop (the model input), and — on test only,
against the shipped variant — the adaptive PGD that also raises the detector's score. Controls
(grey, small, JPEG-30, mild noise) are genuine faces that should pass.

The combiner caps every layer score at a quantile of the validation faces' scores, the quantile
chosen on validation (``--ceiling-candidates``; ``none`` = the plain linear combiner).

Inputs and features are cached under ``--cache`` (delete it to recompute; ``facerec fit-ood`` with
the same settings shares it). Writes ``benchmarks/results/ood_eval_<model>[_<tag>].{json,md}``.

    OMP_NUM_THREADS=2 python benchmarks/ood_eval.py --checkpoint runs/gpu_vit/model.pt \\
        --aligned-pool /data/pool112 --cache /data/cache/ood_eval
    # the previous detector's recipe on the same inputs: pooled ViT tokens only, no ceiling
    ... --layers 0,1,2,3 --ceiling-candidates none --variants prototypes --tag tokens_only
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from facerec.bundle import ModelBundle
from facerec.contract import EmbeddingContract
from facerec.eval.ood_study import driver, options
from facerec.eval.ood_study import families as ev
from facerec.eval.ood_study.scoring import evaluate, markdown_rows
from facerec.eval.ood_study.splits import family, log, read_photos
from facerec.ood import (
    MahalanobisFitter,
    fit_combiner,
    leave_one_family_out,
    select_by_validation,
)

NON_OOD = ("faces",)  # genuine sets; names starting with "ctl_" are genuine controls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--checkpoint", required=True, help="torch weights of the model (training checkpoint or artefact)"
    )
    options.add_arguments(ap)
    ap.add_argument("--variants", default="class_conditional,global,prototypes")
    ap.add_argument(
        "--ship", default="prototypes", help="the variant the service ships (adaptive attack target)"
    )
    ap.add_argument(
        "--no-one-sided", action="store_true", help="treat the pixel-statistics layer two-sidedly"
    )
    ap.add_argument("--layers", default="", help="use only these layer indices (comma list; default all)")
    ap.add_argument(
        "--ceiling-candidates",
        default="none,0.5,0.25,0.1,0.05",
        help="combiner ceiling quantiles to choose from on validation ('none' = no cap)",
    )
    ap.add_argument("--eps-grid", default="0", help="input pre-processing ε candidates ([0,1] pixel units)")
    ap.add_argument(
        "--preproc-limit", type=int, default=100, help="inputs per set in the pre-processing study"
    )
    ap.add_argument(
        "--verification-threshold",
        type=float,
        default=None,
        help="cosine threshold for attack success (default: models/default/manifest.json)",
    )
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    ceilings = tuple(None if c == "none" else float(c) for c in args.ceiling_candidates.split(",") if c)
    eps_grid = [float(e) for e in args.eps_grid.split(",")]
    variants = args.variants.split(",")
    if args.ship not in variants:
        raise SystemExit(f"--ship {args.ship} must be one of --variants")
    thr_v = args.verification_threshold
    if thr_v is None:
        manifest = ModelBundle(REPO / "models" / "default").manifest_path
        thr_v = json.loads(manifest.read_text())["verification"]["threshold"]
    t_start = time.time()

    src = driver.load_attack_model(args.checkpoint, args.seed)
    model = src.model
    contract = EmbeddingContract(
        src.name, src.version, int(model(torch.zeros(1, 3, 112, 112)).embedding.shape[1])
    )
    n_layers = len(model.feature_dims)
    one_sided = [] if args.no_one_sided or getattr(model, "pixel_stats", None) is None else [n_layers - 1]
    use = [int(i) for i in args.layers.split(",")] if args.layers else list(range(n_layers))
    study = driver.open_study(args, src, contract)
    run = driver.torch_runner(model)

    def features(crops):
        return driver.crop_features(run, crops, 50)

    study.build_inputs(features, "feat")
    sets, pool, cache = study.sets, study.pool, study.cache

    # Statistics: one streaming pass over the pool sample gives every variant.
    def pool_feats():
        parts = [features(read_photos([p for p, _ in pool[i : i + 50]])) for i in range(0, len(pool), 50)]
        return {k: np.concatenate([f[k] for f in parts]) for k in parts[0] if k != "n"}

    pf = cache.get("feat_pool", pool_feats)
    labels = np.array([n for _, n in pool])
    fitter = MahalanobisFitter()
    pool_layers = driver.feature_list(pf)
    for i in range(0, len(labels), 256):  # streaming, in chunks
        fitter.update([f[i : i + 256] for f in pool_layers], labels[i : i + 256])
    dets = {
        v: fitter.finalize(
            v,
            shrinkage=args.shrinkage,
            n_prototypes=args.n_prototypes,
            min_identities_per_prototype=args.min_identities,
            contract_id=contract.contract_id,
            seed=args.seed,
            one_sided=one_sided,
        )
        for v in variants
    }
    log(f"statistics: {len(pool)} pool images of {fitter.n_identities} people")
    for det in dets.values():  # the face detector's confidence: one more column, last
        study.add_detection_layer(det)
    if not args.no_detection_layer:
        use = [*use, n_layers]

    ood_names = [n for n in sets["val"] if n not in NON_OOD]
    fams = sorted({family(n) for n in ood_names})
    results: dict = {}
    for v, det in dets.items():
        sv, st = study.split_scores(det, "val", use), study.split_scores(det, "test", use)
        r = evaluate(sv, st, sets["test"], study.test_embeddings(), args.tpr, thr_v, ceilings)
        results[v] = {
            k: r[k]
            for k in (
                "rows",
                "threshold",
                "tpr_test",
                "tpr_val",
                "combiner_weights",
                "ceiling_quantile",
                "ceiling_table",
            )
        }
        if v == args.ship:
            det.combiner, det.threshold, det.target_tpr = r["combiner"], r["threshold"], args.tpr
            s_in_ship = r["s_in"]
        log(f"{v}: done")

    # Adaptive attack against the shipped variant (test faces only; never used for fitting).
    det = dets[args.ship]
    results[args.ship]["rows"].update(
        study.adaptive_rows(det, s_in_ship, features, args.ship, thr_v, use, layer_auroc=True)
    )

    # Optional input pre-processing (torch only): ε chosen on validation, never on the held-out family.
    preproc = None
    if len(eps_grid) > 1:
        preproc = preprocessing_study(dets[args.ship], model, sets, ood_names, fams, eps_grid, args, use,
                                      results[args.ship]["ceiling_quantile"])

    meta = {
        "command": "python benchmarks/ood_eval.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "checkpoint": args.checkpoint,
        "model": src.name,
        "contract_id": contract.contract_id,
        "feature_dims": list(model.feature_dims),
        "layers_used": use,
        "detection_layer": None if det.detection is None else vars(det.detection),
        "one_sided_layers": one_sided,
        "pool_images": len(pool),
        "pool_people": fitter.n_identities,
        "prototypes_per_layer": [len(g_.means) for g_ in dets["prototypes"].layers]
        if "prototypes" in dets
        else None,
        "min_identities_per_prototype": args.min_identities,
        "shrinkage": args.shrinkage,
        "val_faces": len(sets["val"]["faces"]["crops"]),
        "test_faces": len(sets["test"]["faces"]["crops"]),
        "val_photos": len(study.specs["val"].photos),
        "test_photos": len(study.specs["test"].photos),
        "attacked_test": args.attacked,
        "attacked_val": args.attacked_val,
        "cifar_images_per_split": args.cifar,
        "skimage_crops_per_photo": args.skimage_crops,
        "attack_eps_255": options.floats(args.attack_eps),
        "pgd_steps": args.pgd_steps,
        "adaptive": {
            "eps_255": args.adaptive_eps,
            "steps": args.adaptive_steps,
            "weights": options.floats(args.adaptive_weights),
        },
        "domains": options.words(args.domains),
        "tpr": args.tpr,
        "verification_threshold": thr_v,
        "ship": args.ship,
        "val_sets": {
            n: {"offered": int(s["offered"]), "scored": len(s["crops"])} for n, s in sets["val"].items()
        },
        "seconds": round(time.time() - t_start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cache": {"computed": cache.computed, "loaded": cache.loaded},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ood_eval_{src.name}" + (f"_{args.tag}" if args.tag else "")
    payload = {"meta": meta, "results": results, "preprocessing": preproc}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{stem}.md").write_text(markdown(meta, results, variants, preproc))
    print((out / f"{stem}.md").read_text())
    return 0


def preprocessing_study(det, model, sets, ood_names, fams, eps_grid, args, use, ceiling) -> dict:
    """Held-out AUROC per family at each ε, and the ε picked on validation without that family
    (combiners capped at the shipped ``ceiling`` quantile)."""

    def ls(s, eps):
        crops, det_scores = s["crops"][:n], s["det_score"][:n]
        if len(crops) == 0:
            return np.zeros((0, len(use)))
        return np.concatenate(
            [
                det.input_layer_scores(
                    model, ev.to_input(crops[i : i + 25]), eps, det_scores[i : i + 25]
                ).numpy()
                for i in range(0, len(crops), 25)
            ]
        )[:, use]

    n = args.preproc_limit
    sc = {
        split: {
            e: {
                name: ls(s, e)
                for name, s in sets[split].items()
                if name in ("faces", *ood_names)
            }
            for e in eps_grid
        }
        for split in ("val", "test")
    }
    out = {}
    for held in fams:
        seen = [m for m in ood_names if family(m) != held]
        cands = {}
        for e in eps_grid:
            v = sc["val"][e]
            parts = [v[m] for m in seen if len(v[m])]
            groups = np.concatenate([np.full(len(v[m]), fams.index(family(m))) for m in seen if len(v[m])])
            cands[e] = (v["faces"], np.concatenate(parts), groups)
        best, _ = select_by_validation(cands, args.tpr, ceiling_quantile=ceiling)
        per_eps = {}
        for e in eps_grid:
            v, t = sc["val"][e], sc["test"][e]
            others = {
                f: np.concatenate([v[m] for m in ood_names if family(m) == f and len(v[m])])
                for f in fams
                if any(family(m) == f and len(v[m]) for m in ood_names)
            }
            tests = {m: t[m] for m in ood_names if family(m) == held and len(t[m])}
            lofo = leave_one_family_out(
                v["faces"], others, t["faces"], tests, tpr=args.tpr, family_of={m: held for m in tests},
                fit=partial(fit_combiner, ceiling_quantile=ceiling),
            )
            per_eps[str(e)] = {m: r["auroc"] for m, r in lofo.items()}
        out[held] = {"epsilon_picked_on_validation": best, "held_out_auroc_by_epsilon": per_eps}
    return out


def ceiling_text(r: dict) -> str:
    table = ", ".join(f"{k}: {v:.4f}" for k, v in r["ceiling_table"].items())
    if r["ceiling_quantile"] is None:
        return f"Combiner without a ceiling (candidates and mean held-out AUROC within validation: {table})."
    return (
        f"Combiner ceiling: layer scores capped at their {r['ceiling_quantile']} quantile over validation "
        f"faces, chosen on validation (mean held-out AUROC within validation: {table})."
    )


def markdown(meta, results, variants, preproc) -> str:
    tpr = round(meta["tpr"] * 100)
    key = f"tnr_at_tpr{tpr}"
    ship = meta["ship"]
    lines = [
        f"# Mahalanobis OOD detector: {meta['model']}, inputs as the service sees them",
        "",
        f"Command: `{meta['command']}`",
        "",
        (
            f"Statistics: {meta['pool_images']} aligned pool images of {meta['pool_people']} people "
            f"(prototypes per layer {meta['prototypes_per_layer']}, "
            f">= {meta['min_identities_per_prototype']} "
            f"people each); feature layers {meta['feature_dims']}, used {meta['layers_used']}, one-sided "
            f"{meta['one_sided_layers']}. Combiner and threshold on {meta['val_faces']} validation faces "
            f"(LFW fold 5) and validation samples of every OOD family; reported on {meta['test_faces']} test "
            f"faces (LFW folds 6-10). Attacks and corruptions: {meta['attacked_test']} test faces per set "
            f"(validation {meta['attacked_val']}), PGD {meta['pgd_steps']} steps; CIFAR "
            f"{meta['cifar_images_per_split']} images per split at 32/112/224 px; scikit-image: "
            f"{meta['skimage_crops_per_photo']} crops per photo. {meta['seconds']} s on "
            f"{meta['threads']} CPU threads (torch {meta['torch']}); {meta['cache']['computed']} input / "
            "feature sets computed in this "
            f"run, {meta['cache']['loaded']} read from the cache."
        ),
        "",
        (
            "Every input is a photo located and aligned by the service's own code; `rejected by face "
            "detector` = photos in which it found no face (never scored). `photo`: the attacker perturbs the "
            "whole photo through the alignment (white box, clean landmarks) and the service detects and "
            "aligns the result again; `crop`: the aligned crop (the model input) is perturbed directly. "
            "Dodging moves away from the person's gallery face (another photo of them), impersonation "
            "toward another person's face; the last column is the share of scored faces the service would "
            f"call a match (cosine >= {meta['verification_threshold']}, its FAR-1e-3 threshold) before and "
            "after the attack."
        ),
        "",
        (
            f"AUROC / TNR@TPR{tpr}: threshold-free, combiner fitted on *all* validation families; "
            "`held-out`: "
            "the same with a combiner that never saw this family (leave-one-family-out; all ε and both "
            "domains of an attack are held out together) — the honest number for an unseen kind of input. "
            "`adaptive` was never seen by any combiner."
        ),
        "",
        f"## Shipped variant ({ship})",
        "",
        (
            f"Threshold {results[ship]['threshold']:.4f} for TPR {tpr}% on validation faces; TPR on test "
            f"faces **{results[ship]['tpr_test']:.3f}**. {ceiling_text(results[ship])}"
        ),
        "",
        *markdown_rows(results[ship]["rows"], meta["tpr"]),
    ]
    names = [n for n in results[ship]["rows"] if "held_out" in results[ship]["rows"][n]]
    lines += [
        "",
        f"## Variants compared (held-out AUROC / held-out TNR@{tpr})",
        "",
        "| set | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for n in names:
        cells = []
        for v in variants:
            r = results[v]["rows"].get(n, {})
            cells.append(
                f"{r['held_out']['auroc']:.3f} / {r['held_out'][key]:.3f}" if "held_out" in r else "–"
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append(
        "| TPR on test faces | " + " | ".join(f"{results[v]['tpr_test']:.3f}" for v in variants) + " |"
    )
    if preproc:
        lines += [
            "",
            "## Input pre-processing (torch only)",
            "",
            "| held-out family | ε picked on validation | held-out AUROC by ε |",
            "|---|---|---|",
        ]
        for f, r in preproc.items():
            lines.append(
                f"| {f} | {r['epsilon_picked_on_validation']:g} | "
                + "; ".join(
                    f"ε {e}: " + ", ".join(f"{m} {a:.3f}" for m, a in d.items())
                    for e, d in r["held_out_auroc_by_epsilon"].items()
                )
                + " |"
            )
    lines += [
        "",
        "Per-layer test AUROCs, AUPR, detection accuracy and combiner weights are in the JSON file.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
