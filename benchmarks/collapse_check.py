"""Why a margin-softmax run collapsed: the objective's terms on the trained models themselves.

For each checkpoint (a folder with model.pt, rank0.pt and config.yaml, as the trainer writes it),
embeds the same fixed training batches (no augmentation) and reports

- collapse by data source: among different-identity pairs of the sample, the fraction with
  cosine > 0.9 (0 for a healthy face embedding), per source prefix of the identity (pins, lfw, ...);
- the loss terms, with the checkpoint's own class centres, under ArcFace and CosFace (s 64; m 0.5 /
  0.35), each without and with UNPG: mean target cosine, target logit z_y, class log-sum-exp,
  UNPG's pair log-sum-exp U, and the per-row loss. Comparing a collapsed and a spread model under
  the same objective says whether the collapse is a better optimum of that objective (the
  optimiser did its job, the objective is degenerate here) or a failure to optimise.

    python benchmarks/collapse_check.py RUN/checkpoints/step_00001560 ... \
        [--pool /data/pool112] [--batches 6 --batch-size 128] [--out benchmarks/results/collapse_check_cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml

from facerec.eval.spread import COLLAPSE_COSINE

OBJECTIVES = {"arcface": {"s": 64.0, "m": 0.5}, "cosface": {"s": 64.0, "m": 0.35}}


def collapse_basin_loss(margin: str, s: float, m: float, k: int) -> float:
    """Per-row loss when K classes (centres and samples) sit on one direction and the other
    classes are far away: log(1 + (K-1) exp(s (1 - target))) with target cos(m) (ArcFace) or
    1 - m (CosFace)."""
    target = math.cos(m) if margin == "arcface" else 1.0 - m
    return math.log1p((k - 1) * math.exp(s * (1.0 - target)))


def loss_terms(embeddings, labels, centres_weight, margin: str, s: float, m: float, whisker: float = 1.5) -> dict:
    """The objective's terms on one batch, and how UNPG changes the gradient on the embeddings:
    the pair softmax's effective number of pairs (1 / sum p^2) and the mass of its 10 largest
    pairs, the gradient norm without and with UNPG, and the cosine between the two gradients."""
    from facerec.heads import create_margin
    from facerec.losses.unpg import unpg_pairs

    rows = torch.arange(len(labels))
    w = torch.nn.functional.normalize(centres_weight.float(), dim=1)
    emb = embeddings.detach().float().requires_grad_(True)
    cos = torch.nn.functional.normalize(emb, dim=1) @ w.T
    logits = create_margin(margin, s=s, m=m)(cos, labels)
    z_y = logits[rows, labels]
    lse = torch.logsumexp(logits, dim=1)
    sim, keep = unpg_pairs(emb, labels, whisker)
    u = torch.logsumexp(s * sim[keep], dim=0)
    plain, with_unpg = (lse - z_y).mean(), (torch.logaddexp(lse, u) - z_y).mean()
    g_plain, = torch.autograd.grad(plain, emb, retain_graph=True)
    g_unpg, = torch.autograd.grad(with_unpg, emb)
    p = torch.softmax(s * sim[keep].detach(), dim=0)
    return {"target_cosine": float(cos[rows, labels].mean()), "z_y": float(z_y.mean()),
            "class_lse": float(lse.mean()), "unpg_U": float(u),
            "loss": float(plain), "loss_with_unpg": float(with_unpg),
            "pair_softmax_effective_pairs": float(1.0 / p.square().sum()), "kept_pairs": int(keep.sum()),
            "pair_softmax_top10_mass": float(p.topk(min(10, len(p))).values.sum()),
            "grad_norm": float(g_plain.norm()), "grad_norm_with_unpg": float(g_unpg.norm()),
            "grad_cosine_unpg_vs_plain": float(torch.nn.functional.cosine_similarity(
                g_plain.flatten(), g_unpg.flatten(), dim=0))}


def by_source(embeddings, identities: list[str], threshold: float = COLLAPSE_COSINE) -> dict:
    """Collapsed fraction of different-identity pairs, grouped by the pair's source prefix
    (``pins`` when both are Pins identities, ``mixed`` across sources)."""
    n = torch.nn.functional.normalize(embeddings.float(), dim=1)
    high = torch.triu(n @ n.T > threshold, diagonal=1)
    names = sorted(set(identities))
    ident = torch.tensor([names.index(i) for i in identities])
    sources = sorted({i.split("__")[0] for i in identities})
    src = torch.tensor([sources.index(i.split("__")[0]) for i in identities])
    pairs = torch.ones_like(high).triu_(diagonal=1) & (ident[:, None] != ident[None, :])
    same_source = src[:, None] == src[None, :]
    groups = {s: pairs & same_source & (src[:, None] == k) for k, s in enumerate(sources)}
    groups["mixed"] = pairs & ~same_source
    return {k: {"pairs": int(m.sum()), "collapsed_fraction": float((high & m).sum() / m.sum())}
            for k, m in groups.items() if m.any()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="checkpoint folders (model.pt, rank0.pt, config.yaml)")
    ap.add_argument("--pool", default=None, help="training image tree (default: data.path of the first config)")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = ap.parse_args(argv)

    from facerec.data.datasets import EvalTransform, FolderDataset
    from facerec.export.torch_artifact import load_model_file
    from training.config import Config
    from training.data import build_dataset

    dirs = [Path(c) for c in args.checkpoints]
    for d in dirs:
        missing = [f for f in ("model.pt", "rank0.pt", "config.yaml") if not (d / f).exists()]
        if missing:
            raise SystemExit(f"{d}: not a trainer checkpoint (missing {', '.join(missing)})")
    cfg = Config.model_validate(yaml.safe_load((dirs[0] / "config.yaml").read_text()))
    if args.pool:
        cfg.data.kind, cfg.data.path = "folder", args.pool
    if cfg.data.kind != "folder":
        raise SystemExit(f"collapse_check reads an aligned image tree (data.kind=folder), not {cfg.data.kind!r}; "
                         "pass --pool DIR")
    train = build_dataset(cfg.data, seed=0)
    data = FolderDataset(train.root, EvalTransform(), samples=train.samples)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(data), generator=g)[: args.batches * args.batch_size]
    batches = order.view(args.batches, args.batch_size).tolist()
    images = {i: data[i][0] for b in batches for i in b}
    results = {}
    for d in dirs:
        cfg_d = Config.model_validate(yaml.safe_load((d / "config.yaml").read_text()))
        model = load_model_file(d / "model.pt").model.eval()
        centres = torch.load(d / "rank0.pt", map_location="cpu", weights_only=True)["loss"]["centres.weight"]
        if centres.shape[0] != data.num_classes:
            raise SystemExit(f"{d}: {centres.shape[0]} class centres, the pool has {data.num_classes} classes "
                             "(a multi-process run keeps one shard per rank file; wrong --pool?)")
        embs, labels = [], []
        for b in batches:
            with torch.no_grad():
                embs.append(model(torch.stack([images[i] for i in b])).embedding)
            labels.append(torch.tensor([data.samples[i].label for i in b]))
        terms = {}
        for name, hp in OBJECTIVES.items():
            per_batch = [loss_terms(e, y, centres, name, hp["s"], hp["m"], cfg_d.loss.unpg_whisker)
                         for e, y in zip(embs, labels)]
            terms[name] = {k: sum(p[k] for p in per_batch) / len(per_batch) for k in per_batch[0]}
        idents = [data.samples[i].identity for b in batches for i in b]
        results[str(d)] = {"margin": cfg_d.loss.margin, "unpg": cfg_d.loss.unpg,
                           "collapse_by_source": by_source(torch.cat(embs), idents), "terms": terms}
        print(d, json.dumps(results[str(d)]["terms"]), flush=True)
    basin = {name: {str(k): collapse_basin_loss(name, hp["s"], hp["m"], k) for k in (2, 10, 70, 2730)}
             for name, hp in OBJECTIVES.items()}
    report = {"command": " ".join(["benchmarks/collapse_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "images": len(images), "collapse_basin_loss": basin, "results": results}
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
        Path(args.out + ".md").write_text(markdown(report))
        print("wrote", args.out + ".json", args.out + ".md")
    return 0


def markdown(report: dict) -> str:
    lines = ["# Collapse check: the objective's terms on trained models", "",
             f"`{report['command']}`", "",
             (f"{report['images']} training images in fixed batches, no augmentation. Collapsed = "
              f"fraction of different-identity pairs with cosine > {COLLAPSE_COSINE}."), "",
             ("| checkpoint | trained with | collapsed pairs by source | "
              "ArcFace loss | ArcFace + UNPG | CosFace loss | CosFace + UNPG | target cos | U |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for path, r in report["results"].items():
        src = ", ".join(f"{k} {v['collapsed_fraction']:.0%}" for k, v in r["collapse_by_source"].items())
        a, c = r["terms"]["arcface"], r["terms"]["cosface"]
        name = Path(path).parent.parent.name + "/" + Path(path).name
        lines.append(f"| {name} | {r['margin']}{' + UNPG' if r['unpg'] else ''} | {src} | {a['loss']:.2f} | "
                     f"{a['loss_with_unpg']:.2f} | {c['loss']:.2f} | {c['loss_with_unpg']:.2f} | "
                     f"{a['target_cosine']:.3f} | {a['unpg_U']:.1f} |")
    lines += ["", "How UNPG changes the gradient on the embeddings (per objective, mean over batches):", "",
              ("| checkpoint | objective | kept pairs | effective pairs (1/Σp²) | top-10 pair mass | "
               "grad norm | with UNPG | cosine between the two |"), "|---|---|---|---|---|---|---|---|"]
    for path, r in report["results"].items():
        name = Path(path).parent.parent.name + "/" + Path(path).name
        for obj, t in r["terms"].items():
            lines.append(f"| {name} | {obj} | {t['kept_pairs']:.0f} | {t['pair_softmax_effective_pairs']:.1f} | "
                         f"{t['pair_softmax_top10_mass']:.2f} | {t['grad_norm']:.3f} | "
                         f"{t['grad_norm_with_unpg']:.3f} | {t['grad_cosine_unpg_vs_plain']:.2f} |")
    lines += ["", ("Loss of a row when K classes have collapsed onto one direction "
                   "(log(1 + (K-1) exp(s(1 - target))), s 64):"), "",
              "| K | " + " | ".join(report["collapse_basin_loss"]) + " |", "|---|---|---|"]
    for k in next(iter(report["collapse_basin_loss"].values())):
        lines.append(f"| {k} | " + " | ".join(f"{v[k]:.2f}" for v in report["collapse_basin_loss"].values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
