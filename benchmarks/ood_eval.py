"""Mahalanobis OOD detector on LFW: both variants, every input family, leave-one-family-out.

Protocol (shared/data/README.md): statistics are fitted on LFW training-pool people (View-2 folds
1-4); the combiner, the pre-processing ε and the threshold on validation people (fold 5); results
on test people (folds 6-10). Faces are a central crop of the deep-funneled image (a rough
alignment). OOD families, built separately from validation and test faces / CIFAR halves:

  cifar (non-faces, 32 px upsampled to 112), blur, noise, occlusion, brightness (half blown out,
  half nearly black), fgsm@e and pgd@e (dodging: away from the clean embedding), impersonation
  (PGD toward another test face's embedding, ε 8/255).

Each family is reported with a combiner that never saw it (fitted on the other families'
validation samples); its ε is chosen on that same validation data. Writes
``benchmarks/results/ood_eval_<model>[_<tag>].{json,md}``.

    python benchmarks/ood_eval.py --limit 100               # random-init mobilefacenet
    python benchmarks/ood_eval.py --checkpoint ckpt.pt --model mobilefacenet --eps-grid 0,0.001,0.002
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from facerec.contract import EmbeddingContract  # noqa: E402
from facerec.data import protocol  # noqa: E402
from facerec.data.align import center_crop  # noqa: E402
from facerec.data.datasets import read_rgb, to_tensor  # noqa: E402
from facerec.models import create_model  # noqa: E402
from facerec.ood import MahalanobisFitter, leave_one_family_out, select_by_validation  # noqa: E402
from facerec.ood import attacks  # noqa: E402
from facerec.ood.metrics import auroc  # noqa: E402


def load_faces(paths: list[Path]) -> torch.Tensor:
    return torch.stack([to_tensor(center_crop(read_rgb(p), 112, 0.5)) for p in paths])


def load_cifar(paths: list[Path]) -> torch.Tensor:
    return torch.stack([to_tensor(cv2.resize(read_rgb(p), (112, 112), interpolation=cv2.INTER_LINEAR))
                        for p in paths])


def pick_pool(root: Path, n_images: int, per_person: int, rng) -> list[tuple[Path, str]]:
    """Up to ``per_person`` images of randomly ordered pool people with >= 2 images."""
    by_person: dict[str, list[Path]] = {}
    for path, name in protocol.lfw_images_of(protocol.pool_people(root), root):
        by_person.setdefault(name, []).append(path)
    people = [p for p in sorted(by_person) if len(by_person[p]) >= 2]
    out: list[tuple[Path, str]] = []
    for i in rng.permutation(len(people)):
        out += [(p, people[i]) for p in by_person[people[i]][:per_person]]
        if len(out) >= n_images:
            break
    return out[:n_images]


def batched(x: torch.Tensor, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size]


def build_families(model, faces: torch.Tensor, cifar: torch.Tensor, args, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    half = len(faces) // 2
    sets = {
        "cifar": cifar,
        "blur": attacks.gaussian_blur(faces, 4.0),
        "noise": attacks.gaussian_noise(faces, 0.2, generator=g),
        "occlusion": attacks.occlude(faces, 0.4, generator=g),
        "brightness": torch.cat([attacks.brightness(faces[:half], 3.0), attacks.brightness(faces[half:], 0.15)]),
    }
    for e in args.attack_eps:
        t0 = time.time()
        sets[f"fgsm@{e:g}"] = torch.cat([attacks.fgsm(model, b, e / 255) for b in batched(faces, args.batch_size)])
        sets[f"pgd@{e:g}"] = torch.cat([attacks.pgd(model, b, e / 255, steps=args.pgd_steps, generator=g)
                                        for b in batched(faces, args.batch_size)])
        print(f"  attacks at eps {e:g}/255: {time.time() - t0:.0f} s", flush=True)
    with torch.no_grad():
        emb = torch.cat([model(b).embedding for b in batched(faces, args.batch_size)])
    target = emb.roll(1, dims=0)  # the next face: almost always another person
    sets["impersonation"] = torch.cat([
        attacks.pgd(model, b, 8 / 255, steps=args.pgd_steps, target=t, generator=g)
        for b, t in zip(batched(faces, args.batch_size), batched(target, args.batch_size))])
    return sets


def family(name: str) -> str:
    return name.split("@")[0]


def layer_scores(detectors: dict, model, x: torch.Tensor, eps: float, bs: int) -> dict[str, np.ndarray]:
    """(N, L) layer scores per variant; at ε = 0 one forward serves every variant."""
    out: dict[str, list] = {v: [] for v in detectors}
    for b in batched(x, bs):
        if eps == 0:
            with torch.no_grad():
                feats = model(b, return_features=True).features
            for v, det in detectors.items():
                out[v].append(det.layer_scores(feats).numpy())
        else:
            for v, det in detectors.items():
                out[v].append(det.input_layer_scores(model, b, eps).numpy())
    return {v: np.concatenate(s) for v, s in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilefacenet")
    ap.add_argument("--checkpoint", default=None, help="state dict (or {'model': ...}); random init if absent")
    ap.add_argument("--data", default=None, help="shared data root (default $FACEREC_DATA or ../shared/data)")
    ap.add_argument("--limit", type=int, default=100, help="validation and test images each (and CIFAR)")
    ap.add_argument("--pool", type=int, default=0, help="pool images for the statistics (default 4x limit)")
    ap.add_argument("--per-person", type=int, default=4)
    ap.add_argument("--variants", default="class_conditional,global,prototypes")
    ap.add_argument("--n-prototypes", type=int, default=8)
    ap.add_argument("--min-identities", type=int, default=10)
    ap.add_argument("--shrinkage", type=float, default=0.01)
    ap.add_argument("--eps-grid", default="0", help="pre-processing ε candidates, [0,1] pixel units")
    ap.add_argument("--attack-eps", default="2,4,8", help="FGSM/PGD ε in grey levels (/255)")
    ap.add_argument("--pgd-steps", type=int, default=5)
    ap.add_argument("--tpr", type=float, default=0.95)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    args.attack_eps = [float(e) for e in args.attack_eps.split(",") if e]
    eps_grid = [float(e) for e in args.eps_grid.split(",")]
    variants = args.variants.split(",")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    root = protocol.data_root(args.data)
    t_start = time.time()

    model = create_model(args.model).eval()
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
        model.load_state_dict(state)
        version = hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest()[:12]
    else:
        version = f"random-init-seed{args.seed}"
    with torch.no_grad():
        dim = model(torch.zeros(1, 3, 112, 112)).embedding.shape[1]
    contract = EmbeddingContract(args.model, version, dim)

    pool = pick_pool(root, args.pool or 4 * args.limit, args.per_person, rng)
    val_paths = [p for p, _ in protocol.lfw_images_of(protocol.validation_people(root), root)]
    test_paths = [p for p, _ in protocol.lfw_images_of(protocol.test_people(root), root)]
    val_paths = [val_paths[i] for i in rng.permutation(len(val_paths))[: args.limit]]
    test_paths = [test_paths[i] for i in rng.permutation(len(test_paths))[: args.limit]]
    cifar_paths = sorted((root / "cifar10_ood").glob("*/*.jpg"))
    cifar_paths = [cifar_paths[i] for i in rng.permutation(len(cifar_paths))]
    half = len(cifar_paths) // 2
    print(f"pool {len(pool)} images / {len({n for _, n in pool})} people, val {len(val_paths)}, "
          f"test {len(test_paths)}", flush=True)

    # One streaming pass over the pool gives every variant's statistics.
    fitter = MahalanobisFitter()
    for i in range(0, len(pool), args.batch_size):
        chunk = pool[i : i + args.batch_size]
        with torch.no_grad():
            feats = model(load_faces([p for p, _ in chunk]), return_features=True).features
        fitter.update(feats, [n for _, n in chunk])
    detectors = {v: fitter.finalize(v, shrinkage=args.shrinkage, n_prototypes=args.n_prototypes,
                                    min_identities_per_prototype=args.min_identities,
                                    contract_id=contract.contract_id) for v in variants}
    print(f"fitted in {time.time() - t_start:.0f} s", flush=True)

    splits = {}
    for split, paths, cifar in (("val", val_paths, cifar_paths[:half]), ("test", test_paths, cifar_paths[half:])):
        faces = load_faces(paths)
        t0 = time.time()
        sets = build_families(model, faces, load_cifar(cifar[: args.limit]), args, args.seed + (split == "test"))
        print(f"{split}: built {len(sets)} OOD sets in {time.time() - t0:.0f} s", flush=True)
        sets = {"faces": faces, **sets}
        splits[split] = {eps: {name: layer_scores(detectors, model, x, eps, args.batch_size)
                               for name, x in sets.items()} for eps in eps_grid}

    names = [n for n in splits["test"][eps_grid[0]] if n != "faces"]
    fams = sorted({family(n) for n in names})
    results: dict = {}
    for v in variants:
        per_eps = {}
        for eps in eps_grid:
            val, test = splits["val"][eps], splits["test"][eps]
            val_fams = {f: np.concatenate([val[n][v] for n in names if family(n) == f]) for f in fams}
            per_eps[eps] = leave_one_family_out(
                val["faces"][v], val_fams, test["faces"][v], {n: test[n][v] for n in names},
                tpr=args.tpr, family_of={n: family(n) for n in names})
            for n in names:
                per_eps[eps][n]["layer_auroc"] = [auroc(test["faces"][v][:, j], test[n][v][:, j])
                                                  for j in range(test["faces"][v].shape[1])]
        rows = {}
        for n in names:
            # ε is picked on validation only, without the held-out family.
            seen = [m for m in names if family(m) != family(n)]
            groups = np.concatenate([np.full(len(splits["val"][eps_grid[0]][m][v]), fams.index(family(m)))
                                     for m in seen])
            cands = {eps: (splits["val"][eps]["faces"][v],
                           np.concatenate([splits["val"][eps][m][v] for m in seen]), groups)
                     for eps in eps_grid}
            best, _ = select_by_validation(cands, args.tpr) if len(eps_grid) > 1 else (eps_grid[0], None)
            rows[n] = {**per_eps[best][n], "epsilon": best,
                       "auroc_by_epsilon": {str(e): per_eps[e][n]["auroc"] for e in eps_grid}}
        results[v] = rows

    meta = {
        "command": "python benchmarks/ood_eval.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "model": args.model, "checkpoint": args.checkpoint, "random_init": args.checkpoint is None,
        "contract_id": contract.contract_id, "feature_dims": list(getattr(model, "feature_dims", [])),
        "pool_images": len(pool), "pool_people": fitter.n_identities, "val_faces": len(val_paths),
        "test_faces": len(test_paths), "eps_grid": eps_grid, "attack_eps_255": args.attack_eps,
        "pgd_steps": args.pgd_steps, "tpr": args.tpr, "shrinkage": args.shrinkage,
        "prototypes_per_layer": [len(g.means) for g in detectors["prototypes"].layers] if "prototypes" in detectors else None,
        "min_identities_per_prototype": args.min_identities, "seconds": round(time.time() - t_start, 1),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ood_eval_{args.model}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / f"{stem}.md").write_text(markdown(meta, results, names, variants))
    print((out / f"{stem}.md").read_text())
    return 0


def markdown(meta: dict, results: dict, names: list[str], variants: list[str]) -> str:
    tpr = round(meta["tpr"] * 100)
    lines = [f"# Mahalanobis OOD detector: {meta['model']}" + (" (RANDOM INIT)" if meta["random_init"] else ""), ""]
    if meta["random_init"]:
        lines += [("**The model is randomly initialised, not trained.** These numbers only show the pipeline "
                   "runs. Random convolutional features can already tell some families from faces (pixel "
                   "statistics change a lot); none of this predicts what a trained model will do."), ""]
    lines += [f"Command: `{meta['command']}`", "",
              (f"Statistics: {meta['pool_images']} pool images of {meta['pool_people']} people (LFW folds 1-4); "
               f"combiner, ε and threshold on {meta['val_faces']} validation faces (fold 5) and the other "
               f"families' validation samples; reported on {meta['test_faces']} test faces (folds 6-10). Each "
               f"row's family was held out of the combiner fit. Prototypes per layer: "
               f"{meta['prototypes_per_layer']} (>= {meta['min_identities_per_prototype']} people each). "
               f"{meta['seconds']} s, {meta['threads']} threads, torch {meta['torch']}."), "",
              (f"AUROC / TNR@TPR{tpr} on test (threshold-free); `tpr/tnr@val` = the rates of the threshold "
               f"calibrated for TPR {tpr}% on validation faces."), ""]
    with_eps = len(meta["eps_grid"]) > 1  # show the ε picked on validation for each row
    cols = f"AUROC | TNR@{tpr} | tpr/tnr@val" + (" | ε" if with_eps else "")
    head = "| family | " + " | ".join(f"{v} {cols}" for v in variants) + " |"
    lines += [head, "|---|" + ("---|" * (3 + with_eps)) * len(variants)]
    for n in names:
        cells = []
        for v in variants:
            r = results[v][n]
            cells.append(f"{r['auroc']:.3f} | {r[f'tnr_at_tpr{tpr}']:.3f} | "
                         f"{r['tpr_at_val_threshold']:.2f}/{r['tnr_at_val_threshold']:.2f}"
                         + (f" | {r['epsilon']:g}" if with_eps else ""))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    extra = ", the combiner weights and the AUROC at every ε" if with_eps else " and the combiner weights"
    lines += ["", f"Per-layer test AUROCs{extra} are in the JSON file."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
