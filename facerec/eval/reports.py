"""Report folders: the numbers (JSON), the plots (PNG) and a short Markdown summary.

``verify_report`` and ``quality_report`` take embeddings and per-image data that a caller has
already computed (``facerec eval``, ``benchmarks/evaluate_lfw.py``, ``benchmarks/quality_eval.py``
all use them, so a number means the same everywhere) and write:

- verify: ``metrics.json`` (pair-list k-fold accuracy, EER and TAR at FAR; all-pairs TAR at FAR
  and EER; the same split by pose bin; per protocol a threshold table and the operating point,
  :mod:`facerec.eval.operating`), ``roc.json`` (down-sampled ROC arrays), ``scores.json`` (genuine /
  impostor score histograms), ``roc.png``, ``det.png``, ``scores.png``, ``pose.png``, ``summary.md``;
- quality: ``quality.json`` (EDC curves, pAUC with bootstrap intervals, differences to the
  reference measure; the plain view under ``fmr``, the identity-balanced one under
  ``balanced.fmr``), ``edc_fmr<FMR>.png`` (plain), ``edc_balanced_fmr<FMR>.png`` (balanced),
  ``summary.md``.

An FAR / FMR that the number of impostors cannot measure (fewer than 1 / FAR) is reported as
unsupported, never as a number. Plots need matplotlib; without it they are skipped and the
summary says so.

This module writes the verify report; the quality report is in ``facerec.eval.quality_report``
(importable from here too, the callers' one front door), the file writing both share in
``facerec.eval.report_io``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from facerec.eval import operating as op
from facerec.eval.allpairs import (
    genuine_pairs,
    identity_ids,
    impostor_scores,
    pair_group,
)
from facerec.eval.pose_bins import YAW_BIN_EDGES, yaw_bin, yaw_bin_labels
from facerec.eval.quality_report import quality_report, standard_quality_measures  # noqa: F401 - one front door
from facerec.eval.report_io import pyplot as _plt
from facerec.eval.report_io import write_json
from facerec.eval.verification import (
    accuracy_by_group,
    equal_error_rate,
    kfold_accuracy,
    roc_curve,
    tar_at_far,
    tar_by_group,
)

FARS = (1e-2, 1e-3, 1e-4)


@dataclass
class PairList:
    """Pairs as indices into the embedded images, with labels and folds."""

    a: np.ndarray
    b: np.ndarray
    same: np.ndarray
    folds: np.ndarray | int  # fold id per pair, or a number of folds (stratified by label)
    name: str = "pair list"


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.2f}%"


def _tar_text(t: dict) -> str:
    if not t["supported"]:
        return f"unsupported ({t['num_impostors']:,} impostors)"
    return _pct(t["tar"])


def roc_points(genuine, impostor, max_points: int = 1500) -> dict[str, list[float]]:
    """The ROC down-sampled to about ``max_points`` points, log-spaced in FAR (plus the ends)."""
    g = np.asarray(genuine, dtype=np.float64)
    i = np.asarray(impostor, dtype=np.float64)
    far, tar, thr = roc_curve(np.r_[g, i], np.r_[np.ones(g.size, bool), np.zeros(i.size, bool)])
    min_far = 1.0 / max(i.size, 1)
    grid = np.geomspace(min_far, 1.0, max_points)
    idx = np.unique(np.r_[0, np.searchsorted(far, grid, side="right") - 1, far.size - 1])
    return {"far": far[idx].tolist(), "tar": tar[idx].tolist(),
            "threshold": [None if not np.isfinite(t) else float(t) for t in thr[idx]]}


def plot_roc(curves: Mapping[str, dict], path: Path, title: str) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for name, c in curves.items():
        far, tar = np.asarray(c["far"]), np.asarray(c["tar"])
        keep = far > 0
        ax.semilogx(far[keep], tar[keep], label=name)
    ax.set_xlabel("FAR")
    ax.set_ylabel("TAR")
    ax.set_xlim(left=max(1e-7, min(min(c["far"][1:] or [1e-6]) for c in curves.values())), right=1.0)
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_pose(rows: list[dict], path: Path, title: str) -> Path | None:
    plt = _plt()
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    names = [r["bin"] for r in rows]
    x = np.arange(len(rows))
    candidates = [("accuracy", "pair-list accuracy")] + [
        (f"tar_global_{f:g}", f"all-pairs TAR at the FAR-{f:g} threshold of all impostors")
        for f in (1e-2, 1e-3)]
    series = [(k, lbl) for k, lbl in candidates if any(r.get(k) is not None for r in rows)]
    width = 0.8 / max(len(series), 1)
    for j, (key, label) in enumerate(series):
        vals = [np.nan if r.get(key) is None else r[key] for r in rows]
        ax.bar(x + (j - (len(series) - 1) / 2) * width, vals, width, label=label)
    ticks = [f"|yaw| {n}\n({r['images']} img)" for n, r in zip(names, rows, strict=True)]
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_ylim(0, 1.3)  # room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def verify_report(
    emb: np.ndarray,
    out: str | Path,
    *,
    names: Sequence[str] | None = None,
    pairs: PairList | None = None,
    yaw: np.ndarray | None = None,
    all_pairs: bool = True,
    fars: Sequence[float] = FARS,
    yaw_edges: Sequence[float] = YAW_BIN_EDGES,
    title: str = "verification",
    command: str = "",
    meta: dict | None = None,
    operating_threshold: float | None = None,
    operating_far: float = 1e-3,
) -> dict:
    """Verification numbers for L2-normalised ``emb`` (rows = images) -> ``out`` folder.

    The operating threshold marked in the plots and summarised per protocol is
    ``operating_threshold`` (e.g. the model's calibrated one), else the threshold at
    ``operating_far`` on that protocol's impostors."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    emb = np.asarray(emb, dtype=np.float32)
    report: dict = {"title": title, "command": command, "images": len(emb), **(meta or {})}
    labels = yaw_bin_labels(yaw_edges)
    img_bin = None if yaw is None else yaw_bin(yaw, yaw_edges)
    if img_bin is not None:
        report["yaw_bins"] = {"edges_deg": list(yaw_edges), "labels": {str(k): v for k, v in labels.items()},
                              "images_per_bin": {labels[int(k)]: int(c) for k, c in
                                                 zip(*np.unique(img_bin, return_counts=True))},
                              "rule": "pair bin = bin of max(|yaw_a|, |yaw_b|); unknown if either is"}
    curves, histograms, points = {}, {}, {}
    pose_rows: dict[int, dict] = {}

    def operating_section(sec: dict, name: str, genuine, impostor) -> None:
        table = op.threshold_table(genuine, impostor, (*op.TABLE_FARS, *fars, operating_far))
        sec["threshold_table"] = table
        sec["operating_point"] = points[name] = op.operating_point(genuine, impostor, operating_threshold,
                                                                   operating_far, table)
        histograms[name] = op.score_histogram(genuine, impostor)
        curves[name] = roc_points(genuine, impostor)

    if pairs is not None:
        scores = np.sum(emb[pairs.a] * emb[pairs.b], axis=1).astype(np.float64)
        same = np.asarray(pairs.same, dtype=bool)
        kf = kfold_accuracy(scores, same, pairs.folds)
        sec = {"name": pairs.name, "pairs": int(scores.size), "genuine": int(same.sum()),
               "impostors": int((~same).sum()), "folds": len(kf.accuracies),
               "accuracy_mean": kf.mean, "accuracy_std": kf.std, "fold_accuracies": kf.accuracies.tolist(),
               "fold_thresholds": kf.thresholds.tolist(), "eer": asdict(equal_error_rate(scores, same)),
               "tar_at_far": [asdict(t) for t in tar_at_far(scores[same], scores[~same], fars)]}
        if img_bin is not None:
            pg = pair_group(img_bin[pairs.a], img_bin[pairs.b])
            by = accuracy_by_group(scores, same, pairs.folds, pg)
            sec["by_pose"] = {labels[g]: v for g, v in by.items()}
            for g, v in by.items():
                pose_rows.setdefault(g, {})["accuracy"] = v["accuracy"]
                pose_rows[g]["pairs"] = v["pairs"]
        report["pair_list"] = sec
        operating_section(sec, f"{pairs.name} ({scores.size:,} pairs)", scores[same], scores[~same])
    if names is not None and all_pairs:
        ids = identity_ids(names)
        a, b = genuine_pairs(ids)
        genuine = np.sum(emb[a] * emb[b], axis=1).astype(np.float64)
        imp = impostor_scores(emb, ids, image_groups=img_bin)
        if genuine.size == 0 or imp.scores.size == 0:
            raise ValueError("all-pairs needs at least one genuine and one impostor pair")
        sec = {"identities": int(ids.max() + 1), "genuine": int(genuine.size),
               "impostors": int(imp.scores.size), "min_supported_far": 1.0 / imp.scores.size,
               "tar_at_far": [asdict(t) for t in tar_at_far(genuine, imp.scores, fars)],
               "eer": asdict(_eer_split(genuine, imp.scores))}
        if img_bin is not None:
            gg = pair_group(img_bin[a], img_bin[b])
            by = tar_by_group(genuine, gg, imp.scores, imp.groups, fars)
            sec["by_pose"] = {labels[g]: {"genuine": v["genuine"], "impostors": v["impostors"],
                                          "within": [asdict(t) for t in v["within"]],
                                          "at_global": v["at_global"]} for g, v in by.items()}
            for g, v in by.items():
                row = pose_rows.setdefault(g, {})
                row.update(genuine_all=v["genuine"], impostors_all=v["impostors"])
                for e in v["at_global"]:
                    row[f"tar_global_{e['far']:g}"] = None if math.isnan(e["tar"]) else e["tar"]
        report["all_pairs"] = sec
        operating_section(sec, f"all pairs ({imp.scores.size:,} impostors)", genuine, imp.scores)
        del imp
    if not curves:
        raise ValueError("nothing to evaluate: give pairs, or identities with all_pairs")
    write_json(out / "roc.json", curves)
    write_json(out / "scores.json", histograms)
    files = {"metrics": "metrics.json", "roc_arrays": "roc.json", "score_histograms": "scores.json"}
    if plot_roc(curves, out / "roc.png", title):
        files["roc_plot"] = "roc.png"
    if op.plot_det(curves, points, out / "det.png", title):
        files["det_plot"] = "det.png"
    if op.plot_scores(histograms, points, out / "scores.png", title):
        files["score_plot"] = "scores.png"
    rows = []
    if img_bin is not None:
        counts = dict(zip(*np.unique(img_bin, return_counts=True)))
        for g in sorted(pose_rows, key=lambda k: (k < 0, k)):
            rows.append({"bin": labels[g], "images": int(counts.get(g, 0)), **pose_rows[g]})
        report["pose_table"] = rows
        if plot_pose([r for r in rows if r["bin"] != labels[-1]], out / "pose.png", title):
            files["pose_plot"] = "pose.png"
    report["files"] = files
    write_json(out / "metrics.json", report)
    (out / "summary.md").write_text(verify_markdown(report))
    return report


def _eer_split(genuine, impostor):
    g = np.asarray(genuine, dtype=np.float64)
    i = np.asarray(impostor, dtype=np.float64)
    return equal_error_rate(np.r_[g, i], np.r_[np.ones(g.size, bool), np.zeros(i.size, bool)])


def verify_markdown(r: dict) -> str:
    lines = [f"# {r['title']}", ""]
    if r.get("command"):
        lines += [f"Command: `{r['command']}`", ""]
    if r.get("model"):
        lines += [f"Model: {r['model']}; embeddings: {r.get('embeddings', '')}", ""]
    if "pair_list" in r:
        p = r["pair_list"]
        lines += [(f"## {p['name']}: {p['pairs']:,} pairs ({p['genuine']:,} genuine, "
                  f"{p['impostors']:,} impostors)"),
                  "",
                  (f"- accuracy ({p['folds']} folds, threshold from the other folds): "
                   f"**{_pct(p['accuracy_mean'])} ± {100 * p['accuracy_std']:.2f}**"),
                  f"- EER: {_pct(p['eer']['eer'])}",
                  "- TAR at FAR: " + ", ".join(f"{t['far']:g}: {_tar_text(t)}" for t in p["tar_at_far"]), ""]
        if "threshold_table" in p:
            lines += op.operating_markdown(p)
    if "all_pairs" in r:
        a = r["all_pairs"]
        lines += [(f"## All pairs: {a['genuine']:,} genuine, {a['impostors']:,} impostor pairs "
                   f"({a['identities']:,} identities)"), "",
                  f"- EER: {_pct(a['eer']['eer'])}",
                  "- TAR at FAR: " + ", ".join(f"{t['far']:g}: {_tar_text(t)}" for t in a["tar_at_far"]), ""]
        if "threshold_table" in a:
            lines += op.operating_markdown(a)
    if r.get("pose_table"):
        yb = r["yaw_bins"]
        lines += ["## By head pose", "",
                  (f"Yaw from the five detector landmarks (facerec.data.pose); {yb['rule']}. Images per bin: "
                   + ", ".join(f"{k}: {v:,}" for k, v in yb["images_per_bin"].items()) + "."), ""]
        has_pairs, has_all = "pair_list" in r, "all_pairs" in r
        head = ["pose bin (abs. yaw)", "images"]
        if has_pairs:
            head += ["pairs", "accuracy"]
        if has_all:
            fl = [f"{t['far']:g}" for t in r["all_pairs"]["tar_at_far"]]
            head += ["genuine (all)", "impostors (all)"] + [f"TAR @ global FAR {f}" for f in fl]
            head += [f"TAR @ FAR {f} within bin" for f in fl]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in r["pose_table"]:
            cells = [row["bin"], f"{row['images']:,}"]
            if has_pairs:
                cells += [f"{row.get('pairs', 0):,}", _pct(row.get("accuracy"))]
            if has_all:
                bp = r["all_pairs"]["by_pose"].get(row["bin"], {})
                cells += [f"{row.get('genuine_all', 0):,}", f"{row.get('impostors_all', 0):,}"]
                cells += [_pct(row.get(f"tar_global_{f}")) for f in fl]
                cells += [_tar_text(t) for t in bp.get("within", [])] or ["–"] * len(fl)
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", ("'TAR @ global FAR': the threshold that gives that FAR over all impostors, applied to "
                       "the bin's genuine pairs (what a deployed threshold does). 'Within bin': the bin's "
                       "genuine pairs against the bin's own impostors; unsupported when the bin has fewer "
                       "than 1/FAR impostors."), ""]
    files = r.get("files", {})
    for key in ("roc_plot", "det_plot", "score_plot", "pose_plot"):
        if key in files:
            lines.append(f"![{key}]({files[key]})")
    if "roc_plot" not in files:
        lines.append("(plots skipped: matplotlib is not installed)")
    return "\n".join(lines) + "\n"
