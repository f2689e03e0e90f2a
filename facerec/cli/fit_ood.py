"""``facerec fit-ood``: fit the Mahalanobis OOD detector of an exported model and ship it as
``<model dir>/ood.npz``, which the service loads (``service/engine.py``) and scores every face with.

Exactly what the service computes: aligned 112x112 faces, the fp32 ONNX graph's ``feature_*``
outputs (onnxruntime, CPU). Data use follows the split protocol (docs/ood.md):

- statistics: the identity-free ``prototypes`` variant on a sample of the aligned training pool;
- combiner and threshold: validation people only (LFW fold 5) against CIFAR (first half),
  corruptions of validation faces and, with ``--checkpoint``, FGSM/PGD of validation faces (the
  torch model computes the perturbation; the ONNX graph scores the perturbed, 8-bit image);
- report: LFW-H2 test people (folds 6-10) against CIFAR (second half) and corruptions/attacks of
  test faces, with the shipped combiner and threshold, plus leave-one-family-out AUROCs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

HELP = "fit the OOD detector (Mahalanobis, prototypes) of an exported model and write ood.npz + a report"

FeatureFn = Callable[[np.ndarray], list]  # normalised (N, 3, 112, 112) -> [feature_0, ...]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a `facerec export` folder")
    parser.add_argument("--aligned-pool", required=True, help="aligned pool tree (`facerec align --preset pool`)")
    parser.add_argument("--aligned-lfw", required=True, help="aligned LFW tree (`facerec align --preset lfw`)")
    parser.add_argument("--checkpoint", default=None,
                        help="torch weights of the same model: adds FGSM/PGD families (gradients)")
    parser.add_argument("--data", default=None, help="shared data root (default $FACEREC_DATA or ../shared/data)")
    parser.add_argument("--tpr", type=float, default=0.95, help="TPR on validation faces (default: %(default)g)")
    parser.add_argument("--pool-images", type=int, default=3000, help="pool images for the statistics")
    parser.add_argument("--limit", type=int, default=400, help="faces (and CIFAR images) per split")
    parser.add_argument("--attack-eps", type=float, default=4.0, help="FGSM/PGD ε in grey levels (/255)")
    parser.add_argument("--seed", type=int, default=0)


def onnx_features(graph: Path) -> tuple[FeatureFn, list[str]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = sorted((o.name for o in session.get_outputs() if o.name.startswith("feature_")),
                   key=lambda n: int(n.split("_")[1]))  # the service's FeatureListScorer order
    if not names:
        raise SystemExit(f"{graph} has no feature_* outputs: export it with features")
    input_name = session.get_inputs()[0].name
    return (lambda x: session.run(names, {input_name: x})), names


def quantise(x: np.ndarray) -> np.ndarray:
    """Round model inputs to 8-bit pixels, as every image reaching the service is."""
    return (np.clip(np.round(x * 127.5 + 127.5), 0, 255) - 127.5) / 127.5


def batched_features(features: FeatureFn, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    parts = [features(np.ascontiguousarray(x[i : i + batch], dtype=np.float32)) for i in range(0, len(x), batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def load_cifar(paths: Sequence[Path]) -> np.ndarray:
    import cv2

    from facerec.data.datasets import read_rgb

    img = np.stack([cv2.resize(read_rgb(p), (112, 112), interpolation=cv2.INTER_LINEAR) for p in paths])
    return ((img.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()


def ood_families(faces: np.ndarray, seed: int, attack_model=None, attack_eps: float = 4.0,
                 pgd_steps: int = 5, batch: int = 50) -> dict[str, np.ndarray]:
    """Corruptions (and attacks when a torch model is given) of normalised faces, 8-bit rounded."""
    import torch

    from facerec.ood import attacks

    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(faces)
    half = len(x) // 2
    sets = {
        "blur": attacks.gaussian_blur(x, 4.0),
        "noise": attacks.gaussian_noise(x, 0.2, generator=g),
        "occlusion": attacks.occlude(x, 0.4, generator=g),
        "brightness": torch.cat([attacks.brightness(x[:half], 3.0), attacks.brightness(x[half:], 0.15)]),
    }
    if attack_model is not None:
        e = attack_eps / 255
        chunks = [x[i : i + batch] for i in range(0, len(x), batch)]
        sets[f"fgsm@{attack_eps:g}"] = torch.cat([attacks.fgsm(attack_model, b, e) for b in chunks])
        sets[f"pgd@{attack_eps:g}"] = torch.cat([attacks.pgd(attack_model, b, e, steps=pgd_steps, generator=g)
                                                 for b in chunks])
    return {k: quantise(v.detach().numpy()) for k, v in sets.items()}


def family(name: str) -> str:
    return name.split("@")[0]


def fit_ood(features: FeatureFn, contract_id: str, pool: Sequence[tuple[Path, str]],
            val_faces: Sequence[Path], test_faces: Sequence[Path], val_cifar: Sequence[Path],
            test_cifar: Sequence[Path], tpr: float = 0.95, attack_model=None, attack_eps: float = 4.0,
            n_prototypes: int = 16, min_identities: int = 20, shrinkage: float = 0.01, seed: int = 0,
            batch: int = 64, log: Callable = print):
    """The whole fit on explicit path lists: returns (detector with combiner and threshold, report)."""
    from facerec.eval.calibration import load_batch
    from facerec.ood import (
        MahalanobisFitter,
        calibrate_threshold,
        fit_combiner,
        leave_one_family_out,
    )
    from facerec.ood.metrics import ood_report, rates_at_threshold

    t0 = time.time()
    fitter = MahalanobisFitter()
    for i in range(0, len(pool), batch):
        chunk = pool[i : i + batch]
        fitter.update(features(load_batch([p for p, _ in chunk])), [n for _, n in chunk])
    det = fitter.finalize("prototypes", shrinkage=shrinkage, n_prototypes=n_prototypes,
                          min_identities_per_prototype=min_identities, contract_id=contract_id, seed=seed)
    log(f"statistics: {len(pool)} pool images of {fitter.n_identities} people, "
        f"prototypes per layer {[len(g.means) for g in det.layers]} ({time.time() - t0:.0f} s)")

    def layer_scores(x: np.ndarray) -> np.ndarray:
        return det.layer_scores(batched_features(features, x, batch)).numpy()

    splits = {}
    for split, faces_p, cifar_p, s in (("val", val_faces, val_cifar, seed), ("test", test_faces, test_cifar, seed + 1)):
        t1 = time.time()
        faces = load_batch(list(faces_p))
        sets = {"cifar": load_cifar(cifar_p), **ood_families(faces, s, attack_model, attack_eps)}
        splits[split] = {"faces": layer_scores(faces), **{k: layer_scores(v) for k, v in sets.items()}}
        log(f"{split}: {len(faces)} faces, families {list(sets)} ({time.time() - t1:.0f} s)")

    val, test = splits["val"], splits["test"]
    names = [n for n in val if n != "faces"]
    fams = sorted({family(n) for n in names})
    out_val = np.concatenate([val[n] for n in names])
    groups = np.concatenate([np.full(len(val[n]), fams.index(family(n))) for n in names])
    det.combiner = fit_combiner(val["faces"], out_val, out_groups=groups)
    det.threshold = calibrate_threshold(det.combine(val["faces"]), tpr)
    det.target_tpr = tpr
    s_val, s_test = det.combine(val["faces"]), det.combine(test["faces"])
    tpr_val = float(np.mean(s_val >= det.threshold))
    tpr_test = float(np.mean(s_test >= det.threshold))
    val_fams = {f: np.concatenate([val[n] for n in names if family(n) == f]) for f in fams}
    lofo = leave_one_family_out(val["faces"], val_fams, test["faces"], {n: test[n] for n in names},
                                tpr=tpr, family_of={n: family(n) for n in names})
    key = f"tnr_at_tpr{round(tpr * 100)}"
    rows = {}
    for n in names:
        r = ood_report(s_test, det.combine(test[n]), tpr)
        r["tnr_at_shipped_threshold"] = rates_at_threshold(s_test, det.combine(test[n]), det.threshold)[1]
        r["held_out_auroc"], r["held_out_" + key] = lofo[n]["auroc"], lofo[n][key]
        rows[n] = r
    det.meta.update({"fitted_on": "aligned pool sample (statistics); LFW fold 5 validation faces (combiner, "
                     "threshold)", "families": names, "tpr_val": tpr_val})
    report = {
        "pool_images": len(pool), "pool_people": fitter.n_identities, "val_faces": len(val_faces),
        "test_faces": len(test_faces), "val_cifar": len(val_cifar), "test_cifar": len(test_cifar),
        "prototypes_per_layer": [len(g.means) for g in det.layers], "min_identities_per_prototype": min_identities,
        "shrinkage": shrinkage, "tpr_target": tpr, "threshold": det.threshold, "tpr_val": tpr_val,
        "tpr_test": tpr_test, "combiner_weights": det.combiner.weights.tolist(), "families": rows,
        "seconds": round(time.time() - t0, 1),
    }
    return det, report


def markdown(report: dict) -> str:
    pct = round(report["tpr_target"] * 100)
    lines = ["# OOD detector (Mahalanobis, prototypes) of this model", "",
             f"Command: `{report['command']}`", "",
             (f"Statistics on {report['pool_images']} aligned pool images of {report['pool_people']} people "
              f"(prototypes per layer {report['prototypes_per_layer']}, >= {report['min_identities_per_prototype']} "
              f"people each). Combiner and threshold on {report['val_faces']} validation faces (LFW fold 5) "
              f"vs. {report['val_cifar']} CIFAR images (first half) and corruptions"
              f"{'/attacks' if report.get('checkpoint') else ''} of validation faces. Reported on "
              f"{report['test_faces']} LFW-H2 test faces (folds 6-10) vs. CIFAR second half and corruptions"
              f"{'/attacks' if report.get('checkpoint') else ''} of test faces. Features: ONNX graph "
              f"`{report['graph']}` (onnxruntime CPU), aligned faces, OOD inputs rounded to 8 bits."), "",
             (f"Threshold {report['threshold']:.4f} (score = in-distribution log-odds, below = OOD) for TPR "
              f"{pct}% on validation faces: TPR {report['tpr_val']:.3f} on validation, "
              f"**{report['tpr_test']:.3f} on test faces**."), "",
             f"| family | AUROC | TNR@TPR{pct} | TNR at shipped threshold | held-out AUROC | held-out TNR@TPR{pct} |",
             "|---|---|---|---|---|---|"]
    for n, r in report["families"].items():
        lines.append(f"| {n} | {r['auroc']:.3f} | {r[f'tnr_at_tpr{pct}']:.3f} | {r['tnr_at_shipped_threshold']:.3f}"
                     f" | {r['held_out_auroc']:.3f} | {r[f'held_out_tnr_at_tpr{pct}']:.3f} |")
    lines += ["", ("AUROC / TNR@TPR: the shipped combiner on test data (threshold-free). Held-out: a combiner "
                   "fitted without that family's validation samples (leave-one-family-out), i.e. how an "
                   "unseen kind of input fares."), "", f"{report['seconds']} s on CPU."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from facerec.contract import EmbeddingContract
    from facerec.data import protocol
    from facerec.ood import save

    folder = Path(args.model_dir)
    graphs = [p for p in sorted(folder.glob("*.onnx")) if not p.name.endswith(".fp16.onnx")]
    if len(graphs) != 1:
        raise SystemExit(f"{folder}: expected one fp32 .onnx graph, found {[g.name for g in graphs]}")
    contract = EmbeddingContract.from_json((folder / "contract.json").read_text())
    features, _ = onnx_features(graphs[0])
    rng = np.random.default_rng(args.seed)

    # Pool: up to 3 images each of randomly ordered identities, so the sample spans many people.
    pool_root = Path(args.aligned_pool)
    people = sorted(p for p in pool_root.iterdir() if p.is_dir())
    pool: list[tuple[Path, str]] = []
    for i in rng.permutation(len(people)):
        pool += [(f, people[i].name) for f in sorted(people[i].glob("*.jpg"))[:3]]
        if len(pool) >= args.pool_images:
            break
    pool = pool[: args.pool_images]

    def faces_of(people_names: list[str]) -> list[Path]:
        paths = [Path(args.aligned_lfw) / n / p.name for p, n in protocol.lfw_images_of(people_names, args.data)]
        paths = [p for p in paths if p.exists()]
        return [paths[i] for i in sorted(rng.permutation(len(paths))[: args.limit])]

    val_faces, test_faces = faces_of(protocol.validation_people(args.data)), faces_of(protocol.test_people(args.data))
    cifar = sorted((protocol.data_root(args.data) / "cifar10_ood").glob("*/*.jpg"))
    cifar = [cifar[i] for i in rng.permutation(len(cifar))]
    half = len(cifar) // 2
    attack_model = None
    if args.checkpoint:
        import torch

        from facerec.export.torch_artifact import load_model_file

        torch.manual_seed(args.seed)
        attack_model = load_model_file(args.checkpoint).model.eval()
    det, report = fit_ood(features, contract.contract_id, pool, val_faces, test_faces, cifar[:half][: args.limit],
                          cifar[half:][: args.limit], tpr=args.tpr, attack_model=attack_model,
                          attack_eps=args.attack_eps, seed=args.seed)
    save(det, folder / "ood.npz")
    report.update(command="facerec fit-ood " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
                  graph=graphs[0].name, contract_id=contract.contract_id, checkpoint=args.checkpoint)
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
