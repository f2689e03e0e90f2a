"""Evaluate a model on the project's protocol: validation (LFW fold 5) and LFW-H2 (folds 6-10).

    python benchmarks/evaluate_lfw.py MODEL --aligned-lfw DIR [--data ../shared/data] [--tag NAME]

MODEL is a training checkpoint (model.pt / step dir) or a torch artefact. DIR is the aligned LFW
tree made by ``facerec align --preset lfw``. Reports, with flip-augmented embeddings:
- validation: 10-fold accuracy on the 600 fold-5 pairs; TAR at FAR on all cross-identity pairs of
  the fold-5 people's images; the verification threshold at FAR 1e-3 on those pairs (what a
  deployment would ship, chosen on validation only) and the raw-quality percentiles;
- LFW-H2 (final report only): for each of the 5 folds 6-10, the threshold chosen on the other 4,
  accuracy mean +- std; TAR at FAR 1e-2..1e-4 on all cross-identity pairs of the LFW-H2 people.
Writes benchmarks/results/eval_lfw_<tag>.json and .md, and an ROC plot (PNG).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from facerec.data import protocol
from facerec.eval.calibration import all_pairs_scores, embed_images, quality_percentiles, threshold_at_far
from facerec.eval.verification import best_threshold, kfold_accuracy, roc_curve, tar_at_far
from facerec.export.torch_artifact import load_model_file

FARS = (1e-2, 1e-3, 1e-4)


def torch_embedder(model):
    @torch.no_grad()
    def run(x: np.ndarray):
        out = model(torch.from_numpy(x))
        q = out.quality if out.quality is not None else out.embedding.norm(dim=1)
        return out.embedding.numpy(), q.numpy()

    return run


def pair_scores(pairs, index: dict, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.array([index[(p.name1, p.index1)] for p in pairs])
    b = np.array([index[(p.name2, p.index2)] for p in pairs])
    return (emb[a] * emb[b]).sum(1), np.array([p.same for p in pairs]), np.array([p.fold for p in pairs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--aligned-lfw", required=True)
    parser.add_argument("--data", default=None, help="shared data root (default FACEREC_DATA or ../shared/data)")
    parser.add_argument("--tag", default="model")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    source = load_model_file(args.model)
    model = source.model.eval()
    aligned = Path(args.aligned_lfw)
    report: dict = {"model": args.model, "model_name": source.name, "version": source.version}

    def images(people):
        items = protocol.lfw_images_of(people, args.data)
        keys = [(name, int(path.stem.rsplit("_", 1)[1])) for path, name in items]
        return [aligned / name / path.name for path, name in items], [k[0] for k in keys], keys

    # --- validation: every choice is made here ---
    v_paths, v_names, v_keys = images(protocol.validation_people(args.data))
    run = torch_embedder(model)
    v_emb, v_quality = embed_images(run, v_paths)
    v_index = {k: i for i, k in enumerate(v_keys)}
    scores, same, _ = pair_scores(protocol.validation_pairs(args.data), v_index, v_emb)
    kf = kfold_accuracy(scores, same, 10)
    genuine, impostor = all_pairs_scores(v_emb, v_names)
    report["validation"] = {
        "pairs": int(len(scores)), "accuracy_mean": kf.mean, "accuracy_std": kf.std,
        "images": len(v_paths), "genuine": int(len(genuine)), "impostors": int(len(impostor)),
        "tar_at_far": [asdict(t) for t in tar_at_far(genuine, impostor, FARS)],
        "threshold_far_1e-3": threshold_at_far(impostor, 1e-3),
        "threshold_best_accuracy_pairs": best_threshold(scores, same)[0],
        "quality_percentiles": quality_percentiles(v_quality),
    }
    # --- LFW-H2: final report only ---
    t_paths, t_names, t_keys = images(protocol.test_people(args.data))
    t_emb, _ = embed_images(run, t_paths)
    t_index = {k: i for i, k in enumerate(t_keys)}
    scores, same, folds = pair_scores(protocol.lfw_h2_pairs(args.data), t_index, t_emb)
    accs = []
    for fold in np.unique(folds):
        train = folds != fold
        threshold, _ = best_threshold(scores[train], same[train])
        test = ~train
        accs.append(float(((scores[test] > threshold) == same[test]).mean()))
    genuine, impostor = all_pairs_scores(t_emb, t_names)
    fpr, tpr, _ = roc_curve(np.concatenate([genuine, impostor]),
                            np.concatenate([np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]))
    report["lfw_h2"] = {
        "pairs": int(len(scores)), "accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
        "fold_accuracies": accs, "images": len(t_paths), "genuine": int(len(genuine)),
        "impostors": int(len(impostor)),
        "tar_at_far": [asdict(t) for t in tar_at_far(genuine, impostor, FARS)],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval_lfw_{args.tag}.json").write_text(json.dumps(report, indent=1, default=float))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keep = np.unique(np.geomspace(1, len(fpr) - 1, 2000).astype(int))
        plt.figure(figsize=(5, 4))
        plt.semilogx(fpr[keep], tpr[keep])
        plt.xlabel("FAR (all cross-identity pairs of LFW-H2 people)")
        plt.ylabel("TAR")
        plt.title(f"{source.name} on LFW-H2")
        plt.xlim(1e-5, 1)
        plt.grid(True, which="both", alpha=0.3)
        plt.tight_layout()
        plt.savefig(out / f"eval_lfw_{args.tag}_roc.png", dpi=110)
    except ImportError:
        pass
    v, t = report["validation"], report["lfw_h2"]

    def tars(r):
        return ", ".join(
            f"{x['far']:g}: {100 * x['tar']:.2f}%" if x.get("supported", True) else f"{x['far']:g}: n/a"
            for x in r["tar_at_far"]
        )

    md = [f"# {source.name} ({args.model}) on the LFW protocol", "",
          f"Command: `python benchmarks/evaluate_lfw.py {args.model} --aligned-lfw {args.aligned_lfw} --tag {args.tag}`",
          "Embeddings: L2-normalised sum of the image's and its mirror's embeddings; cosine similarity.", "",
          "| split | pairs | accuracy (mean ± std over folds) | images | impostor pairs | TAR at FAR |",
          "|---|---|---|---|---|---|",
          f"| validation (LFW fold 5, 10 folds) | {v['pairs']} | {100 * v['accuracy_mean']:.2f}% ± {100 * v['accuracy_std']:.2f} | {v['images']} | {v['impostors']:,} | {tars(v)} |",
          f"| LFW-H2 (folds 6-10, 5 folds) | {t['pairs']} | {100 * t['accuracy_mean']:.2f}% ± {100 * t['accuracy_std']:.2f} | {t['images']} | {t['impostors']:,} | {tars(t)} |",
          "", f"Verification threshold at FAR 1e-3 on validation: {v['threshold_far_1e-3']:.4f}."]
    (out / f"eval_lfw_{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
