"""Operating points of a verification report: what a practitioner picks a threshold from.

- ``threshold_table``: target FAR -> the threshold that keeps the false accepts at or below it
  (accept ``score > threshold``, the rule of :func:`facerec.eval.verification.tar_at_far`), the TAR
  (and FRR) there and the FAR achieved; a FAR below 1 / number of impostors is unsupported;
- ``operating_point``: the rates at the threshold a deployment uses: a given one (accept
  ``score >= threshold``, as the service decides), else the table's threshold at one FAR;
- ``score_histogram`` / ``plot_scores``: genuine and impostor score histograms with that threshold;
- ``plot_det``: the DET curve (FNMR against FMR on normal-deviate axes, where the curves of
  Gaussian-like score distributions are near straight lines), the operating point marked.

Plots need matplotlib (an optional dependency); without it they are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist

import numpy as np

from facerec.eval.report_io import pyplot
from facerec.eval.verification import tar_at_far

TABLE_FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
HISTOGRAM_EDGES = np.linspace(-1.0, 1.0, 201)  # cosine similarity, 0.01 wide bins
DET_TICKS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5, 0.8)


def threshold_table(genuine, impostor, fars: Sequence[float] = TABLE_FARS) -> list[dict]:
    """One row per target FAR, highest first (see the module docstring); unsupported rows carry
    no threshold or rates."""
    rows = []
    for t in tar_at_far(genuine, impostor, sorted(set(fars), reverse=True)):
        ok = t.supported
        rows.append({"far": t.far, "supported": ok, "threshold": t.threshold if ok else None,
                     "tar": t.tar if ok else None, "frr": 1.0 - t.tar if ok else None,
                     "achieved_far": t.achieved_far if ok else None})
    return rows


def operating_point(genuine, impostor, threshold: float | None = None, far: float = 1e-3,
                    table: Sequence[dict] = ()) -> dict:
    """The rates at ``threshold`` (accept ``>=``), or at the threshold table's row for ``far``
    (taken from ``table`` when it has that row, so a large impostor set is not sorted again)."""
    if threshold is not None:
        g = np.asarray(genuine, dtype=np.float64).ravel()
        i = np.asarray(impostor, dtype=np.float64).ravel()
        return {"source": "given", "rule": ">=", "threshold": float(threshold),
                "tar": float(np.mean(g >= threshold)), "far": float(np.mean(i >= threshold))}
    row = next((r for r in table if r["far"] == far), None) or threshold_table(genuine, impostor, [far])[0]
    return {"source": f"FAR {far:g} on these impostors", "rule": ">", "threshold": row["threshold"],
            "tar": row["tar"], "far": row["achieved_far"]}


def score_histogram(genuine, impostor, edges: np.ndarray = HISTOGRAM_EDGES) -> dict:
    """Counts of genuine and impostor scores in ``edges`` (scores outside are clipped into the
    first / last bin, so every pair is counted)."""
    lo, hi = float(edges[0]), float(edges[-1])

    def counts(x):
        return np.histogram(np.clip(np.asarray(x, dtype=np.float64), lo, hi), bins=edges)[0].tolist()

    return {"edges": [float(e) for e in edges], "genuine": counts(genuine), "impostor": counts(impostor)}


def save_figure(fig, ax, path: Path, title: str, legend: bool = True) -> Path:
    """Grid, legend and title on ``ax``; write ``fig`` to ``path`` and close it."""
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path


def probit(p) -> np.ndarray:
    """The normal deviate of probabilities (a DET axis), clipped inside (0, 1)."""
    normal = NormalDist()
    return np.array([normal.inv_cdf(min(max(float(x), 1e-9), 1.0 - 1e-9)) for x in np.ravel(p)])


def plot_det(curves: Mapping[str, dict], operating: Mapping[str, dict], path: Path, title: str) -> Path | None:
    """``curves``: name -> ROC points (``far``, ``tar``; :func:`facerec.eval.reports.roc_points`)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.6), dpi=120)
    lowest = 1.0
    for (name, c), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        fmr, fnmr = np.asarray(c["far"], float), 1.0 - np.asarray(c["tar"], float)
        keep = fmr > 0  # a zero FMR lies at minus infinity on this axis
        lowest = min(lowest, float(fmr[keep].min()) if keep.any() else 1.0)
        ax.plot(probit(fmr[keep]), probit(fnmr[keep]), label=name, color=color)
        op = operating.get(name)
        if op and op.get("far") and op.get("tar") is not None:
            ax.plot(probit([op["far"]]), probit([1.0 - op["tar"]]), "o", color=color, ms=5,
                    label=f"threshold {op['threshold']:.3f}")
    ticks = [t for t in DET_TICKS if t >= lowest / 2]
    ax.set_xticks(probit(ticks), [f"{100 * t:g}%" for t in ticks], fontsize=7)
    ax.set_yticks(probit(DET_TICKS), [f"{100 * t:g}%" for t in DET_TICKS], fontsize=7)
    ax.set_xlim(probit([ticks[0]])[0], probit([0.9])[0])
    ax.set_ylim(probit([1e-4])[0], probit([0.9])[0])
    ax.set_xlabel("false match rate (FAR)")
    ax.set_ylabel("false non-match rate (FRR)")
    return save_figure(fig, ax, path, title)


def plot_scores(histograms: Mapping[str, dict], operating: Mapping[str, dict], path: Path,
                title: str) -> Path | None:
    """One panel per protocol: genuine and impostor score densities, the operating threshold."""
    plt = pyplot()
    if plt is None or not histograms:
        return None
    fig, axes = plt.subplots(len(histograms), 1, figsize=(6, 0.6 + 2.8 * len(histograms)), dpi=120, squeeze=False)
    for ax, (name, h) in zip(axes[:, 0], histograms.items()):
        edges = np.asarray(h["edges"])
        for kind, color in (("impostor", "tab:red"), ("genuine", "tab:green")):
            counts = np.asarray(h[kind], float)
            density = counts / max(counts.sum(), 1.0) / np.diff(edges)
            ax.stairs(density, edges, fill=True, alpha=0.45, color=color, label=f"{kind} ({int(counts.sum()):,})")
        op = operating.get(name) or {}
        if op.get("threshold") is not None and math.isfinite(op["threshold"]):
            ax.axvline(op["threshold"], color="k", ls="--", lw=1,
                       label=f"threshold {op['threshold']:.3f} ({op['source']})")
        ax.set_xlim(edges[0], edges[-1])
        ax.set_ylabel("density")
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("cosine similarity")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def percent(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def operating_markdown(section: dict) -> list[str]:
    """The threshold table and the operating point of one report section, as Markdown lines."""
    lines = ["| FAR (target) | threshold | TAR | FRR | FAR achieved |", "|---|---|---|---|---|"]
    for row in section["threshold_table"]:
        if not row["supported"]:
            lines.append(f"| {row['far']:g} | unsupported ({section['impostors']:,} impostors) | | | |")
            continue
        lines.append(f"| {row['far']:g} | {row['threshold']:.4f} | {percent(row['tar'])} | {percent(row['frr'])} "
                     f"| {percent(row['achieved_far'])} |")
    op = section.get("operating_point")
    if op and op["threshold"] is not None:
        lines += ["", (f"Operating threshold {op['threshold']:.4f} ({op['source']}; accept score {op['rule']} "
                       f"threshold): TAR {percent(op['tar'])}, FAR {percent(op['far'])}.")]
    return lines + [""]
