"""The quality report folder: EDC / pAUC of per-image quality measures on the all-pairs protocol
of a set of images, with identity-level bootstrap intervals, in a plain and an identity-balanced
view; written as ``quality.json``, ``edc_fmr<FMR>.png`` / ``edc_balanced_fmr<FMR>.png`` and
``summary.md`` (see ``facerec.eval.reports`` for what every report folder holds, and
``facerec.eval.quality`` for the conventions of the curves).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from facerec.eval.allpairs import genuine_pairs, identity_ids, impostor_scores
from facerec.eval.quality import EDCResult
from facerec.eval.report_io import pyplot, write_json

def standard_quality_measures(es, meta=None, head=None, seed: int = 0) -> dict[str, np.ndarray]:
    """The per-image quality measures a quality report compares, the model's own output first.

    ``es``: a ``facerec.eval.embedder.EmbeddedSet``; ``meta``: a ``FaceMeta`` of the same images
    (adds the detector score and the face size); ``head``: a CR-FIQA-style ``QualityHead``.
    """
    from facerec.eval.image_measures import combined_heuristic, exposure

    m: dict[str, np.ndarray] = {}
    if es.quality is not None:
        m["model quality output (ViT-FIQA token)"] = es.quality
    if head is not None:
        m["CR-FIQA-style head on the embedding"] = head.predict(es.embedding)
    m["embedding norm"] = np.linalg.norm(es.embedding.astype(np.float64), axis=1)
    sharp, expo = es.image_stats[:, 0], exposure(es.image_stats[:, 2])
    parts = [sharp, expo]
    if meta is not None:
        m["detector score"] = meta.score
        m["face size (detector box)"] = meta.face_size
        parts.append(meta.face_size)
    m["sharpness (Laplacian variance)"] = sharp
    m["exposure (−abs(mean grey − 127.5))"] = expo
    what = "sharpness, exposure, face size" if meta is not None else "sharpness, exposure"
    m[f"image heuristic (mean rank: {what})"] = combined_heuristic(parts)
    m["random"] = np.random.default_rng(seed).random(len(sharp))
    return m


def _measure_entries(entry: dict, genuine, impostors, pq: dict, boots: dict, ref: str, fmr: float, discard,
                     thr: float, uppers, i30: int, genuine_weights=None) -> dict:
    """Fill ``entry["measures"]`` (EDC, identity-bootstrap intervals, FNMR at 30% discard and, but for
    the reference, the paired difference of each pAUC to it) and return the EDC curves."""
    from facerec.eval.cluster_bootstrap import difference_ci
    from facerec.eval.quality import edc_curve

    curves = {}
    for name, q in pq.items():
        kw = {} if genuine_weights is None else {"genuine_weights": genuine_weights}
        curve = edc_curve(genuine, impostors, q, fmr=fmr, discard=discard, threshold=thr, **kw)
        curves[name] = curve
        bt = boots[name]
        m = {"edc": curve.as_dict(), "bootstrap": bt.as_dict(), "fnmr_30": float(curve.fnmr[i30])}
        if name != ref:
            m["difference_to_reference"] = {
                f"pauc_{u:g}": dict(zip(("point", "low", "high"),
                                        difference_ci(bt, boots[ref], f"pauc_{u:g}"), strict=True))
                for u in uppers}
        entry["measures"][name] = m
    return curves


def quality_report(
    emb: np.ndarray,
    names: Sequence[str],
    measures: Mapping[str, np.ndarray],
    out: str | Path,
    *,
    fmrs: Sequence[float] = (1e-2, 1e-3),
    uppers: Sequence[float] = (0.3, 0.95),
    resamples: int = 200,
    seed: int = 0,
    title: str = "quality",
    command: str = "",
    meta: dict | None = None,
    progress: bool = True,
    balance: str = "both",
) -> dict:
    """EDC / pAUC of each per-image quality measure on the all-pairs protocol of these images.

    The first measure is the reference: every other one also gets the interval of its pAUC
    difference to it (paired, same identity resamples). Intervals: identity-level bootstrap.
    ``balance``: ``"none"`` (plain view: every pair counts once), ``"identity"`` (identity-balanced
    view: every identity's genuine pairs and every identity pair's impostors weigh the same, see
    ``facerec.eval.quality``), ``"both"``.
    """
    from facerec.eval.cluster_bootstrap import identity_bootstrap
    from facerec.eval.quality import (
        DEFAULT_DISCARD,
        bootstrap_ci,
        fixed_threshold,
        identity_balanced_weights,
        weighted_threshold,
    )

    if balance not in BALANCE_CHOICES:
        raise ValueError(f"balance must be one of {BALANCE_CHOICES}, got {balance!r}")
    plain_view, balanced_view = balance in ("none", "both"), balance in ("identity", "both")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    emb = np.asarray(emb, dtype=np.float32)
    ids = identity_ids(names)
    a, b = genuine_pairs(ids)
    if a.size == 0:
        raise ValueError("no identity has two images: no genuine pairs")
    genuine = np.sum(emb[a] * emb[b], axis=1).astype(np.float64)
    n_imp = (len(ids) ** 2 - int(np.sum(np.bincount(ids) ** 2))) // 2
    keep_top = min(n_imp, math.ceil(4 * max(fmrs) * n_imp) + 1000)
    # the balanced threshold sits deeper in the unweighted ranking when the highest impostors
    # belong to people with many images (LFW-H2, FMR 1e-2: the 1.24% highest instead of 1%)
    keep_balanced = min(n_imp, math.ceil(8 * max(fmrs) * n_imp) + 1000) if balanced_view else 0
    imp = impostor_scores(emb, ids, keep_top=max(keep_top, keep_balanced))
    # the plain view uses the same highest impostors as before (same thresholds, same numbers)
    top_s, top_a, top_b = imp.top_scores[:keep_top], imp.top_a[:keep_top], imp.top_b[:keep_top]
    counts = np.bincount(ids)
    pq = {}
    for name, q in measures.items():
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (len(ids),):
            raise ValueError(f"measure {name!r} has shape {q.shape}, expected ({len(ids)},)")
        q = np.where(np.isnan(q), -np.inf, q)  # unknown quality is discarded first
        pq[name] = np.minimum(q[a], q[b])
    ref = next(iter(measures))
    discard = DEFAULT_DISCARD
    i30 = int(np.argmin(np.abs(discard - 0.3)))
    report: dict = {"title": title, "command": command, "images": len(ids),
                    "identities": int(counts.size), "genuine": int(genuine.size),
                    "impostors": int(imp.scores.size), "reference": ref, **(meta or {}),
                    "balance": balance,
                    "conventions": {
                        "pair_quality": "min(q_a, q_b); an image without a value ranks lowest",
                        "threshold": "fixed at 0% discard for the FMR over all impostors",
                        "pauc": "trapezoid area under FNMR(discard), not normalised",
                        "bootstrap": (f"{resamples} identity-level resamples (seed {seed}), 95% percentile; "
                                      "a drawn identity brings all its genuine pairs and its impostor pairs "
                                      "with the other drawn identities; threshold re-estimated per "
                                      "resample; same resamples for every measure")},
                    "fmr": {}}
    pngs = {}
    for fmr in fmrs if plain_view else ():
        thr, ok, allowed = fixed_threshold(imp.scores, fmr)
        entry = {"threshold": thr, "supported": ok, "impostors_allowed_above": allowed, "measures": {}}
        if not ok:
            entry["note"] = (f"unsupported: needs >= {math.ceil(1 / fmr):,} impostors, "
                             f"have {imp.scores.size:,}")
            report["fmr"][f"{fmr:g}"] = entry
            continue
        boots = identity_bootstrap(genuine, ids[a], pq, imp.scores, top_s, ids[top_a],
                                   ids[top_b], images_per_identity=counts, fmr=fmr, discard=discard,
                                   uppers=uppers, num_resamples=resamples, seed=seed, progress=progress)
        curves = _measure_entries(entry, genuine, imp.scores, pq, boots, ref, fmr, discard, thr, uppers, i30)
        # For comparison only: the pair-level bootstrap (pairs as if independent) of the reference.
        pair = bootstrap_ci(genuine, imp.scores, pq[ref], fmr=fmr, discard=discard, uppers=uppers,
                            num_resamples=resamples, seed=seed)
        entry["reference_pair_bootstrap"] = pair.as_dict()
        report["fmr"][f"{fmr:g}"] = entry
        png = None
        if pyplot():
            png = plot_edc(curves, out / f"edc_fmr{fmr:g}.png",
                           title=f"EDC at FMR {fmr:g}, threshold fixed at 0% discard. {title}")
        if png:
            pngs[f"{fmr:g}"] = png.name
    report["files"] = {"quality": "quality.json", "edc_plots": pngs}
    if balanced_view:
        bw = identity_balanced_weights(ids[a], ids[imp.top_a], ids[imp.top_b], images_per_identity=counts)
        bal: dict = {
            "genuine_identities": bw.genuine_identities, "identity_pairs": int(bw.impostor_total),
            "conventions": {
                "weights": ("a genuine pair of identity a weighs 1/G_a (G_a: its genuine pairs), so every "
                            "identity with genuine pairs weighs 1; an impostor pair of identities a != b "
                            "weighs 1/(n_a n_b) (n: images), so every identity pair weighs 1"),
                "discard": ("discarding u drops exactly u of the genuine weight, lowest pair quality first; "
                            "the boundary pair keeps the part of its weight above u (no rounding to whole "
                            "pairs)"),
                "threshold": ("fixed at 0% discard: the lowest impostor score with at most FMR x (number "
                              "of identity pairs) impostor weight above it"),
                "bootstrap": ("the same identity resamples as the plain view (same seed); weights = "
                              "multiplicities x balancing weights (genuine m_a/G_a, impostor "
                              "m_a m_b/(n_a n_b)); threshold re-estimated per resample")},
            "fmr": {}}
        bpngs = {}
        for fmr in fmrs:
            thr = weighted_threshold(imp.top_scores, bw.impostor, bw.impostor_total, fmr)
            ok = not math.isnan(thr)
            entry = {"threshold": thr, "supported": ok,
                     "impostor_weight_allowed_above": fmr * bw.impostor_total, "measures": {}}
            if not ok:
                entry["note"] = (f"unsupported: needs >= {math.ceil(1 / fmr):,} identity pairs, "
                                 f"have {int(bw.impostor_total):,}")
                bal["fmr"][f"{fmr:g}"] = entry
                continue
            boots = identity_bootstrap(genuine, ids[a], pq, imp.scores, imp.top_scores, ids[imp.top_a],
                                       ids[imp.top_b], images_per_identity=counts, fmr=fmr,
                                       discard=discard, uppers=uppers, num_resamples=resamples, seed=seed,
                                       progress=progress, balance=True)
            curves = _measure_entries(entry, genuine, imp.scores, pq, boots, ref, fmr, discard, thr, uppers,
                                      i30, genuine_weights=bw.genuine)
            bal["fmr"][f"{fmr:g}"] = entry
            png = None
            if pyplot():
                png = plot_edc(curves, out / f"edc_balanced_fmr{fmr:g}.png",
                               title=(f"Identity-balanced EDC at FMR {fmr:g} (every person and every pair of "
                                      f"people weighs the same), threshold fixed at 0% discard. {title}"),
                               xlabel="fraction of the genuine weight discarded (lowest pair quality; "
                                      "every person weighs the same)")
            if png:
                bpngs[f"{fmr:g}"] = png.name
        report["balanced"] = bal
        report["files"]["edc_plots_balanced"] = bpngs
    write_json(out / "quality.json", report)
    (out / "summary.md").write_text(quality_markdown(report, uppers))
    return report


BALANCE_CHOICES = ("none", "identity", "both")


def _ci(b: dict, key: str) -> str:
    p, lo, hi = b["point"].get(key), b["ci_low"].get(key), b["ci_high"].get(key)
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "–"
    return f"{p:.4f} [{lo:.4f}, {hi:.4f}]"


def quality_markdown(r: dict, uppers: Sequence[float] = (0.3, 0.95)) -> str:
    lines = [f"# {r['title']}", ""]
    if r.get("command"):
        lines += [f"Command: `{r['command']}`", ""]
    lines += [(f"{r['images']:,} images of {r['identities']:,} identities; all {r['genuine']:,} genuine and "
               f"{r['impostors']:,} impostor pairs. Pair quality = the lower of the two images'; FNMR at a "
               "threshold fixed at 0% discard; pAUC = un-normalised area under FNMR vs. discarded fraction "
               "(lower is better); 95% intervals from an identity-level bootstrap "
               f"({r['conventions']['bootstrap'].split(' identity')[0]} resamples); Δ = pAUC minus the "
               f"reference ({r['reference']}), interval from the same resamples (paired)."), ""]
    lines += _fmr_sections(r["fmr"], r.get("files", {}).get("edc_plots", {}), uppers, "", "EDC")
    bal = r.get("balanced")
    if bal:
        lines += ["# Identity-balanced view", "",
                  (f"Every person counts once: a genuine pair of a person with G genuine pairs weighs 1/G "
                   f"({bal['genuine_identities']:,} people with genuine pairs weigh 1 each), an impostor "
                   "pair between people with n_a and n_b images weighs 1/(n_a·n_b) "
                   f"({bal['identity_pairs']:,} pairs of people weigh 1 each), so the FMR threshold is "
                   "balanced over pairs of people too. "
                   "Discarding u drops u of the genuine weight, lowest pair quality first (the boundary pair "
                   "in part). Intervals: the same identity resamples as above, multiplicities times these "
                   "weights."), ""]
        lines += _fmr_sections(bal["fmr"], r.get("files", {}).get("edc_plots_balanced", {}), uppers,
                               "Balanced, ", "Balanced EDC")
    return "\n".join(lines) + "\n"


def _fmr_sections(fmrs: dict, plots: dict, uppers: Sequence[float], prefix: str, alt: str) -> list[str]:
    lines: list[str] = []
    for fmr, e in fmrs.items():
        if not e["supported"]:
            lines += [f"## {prefix}FMR {fmr}: {e['note']}", ""]
            continue
        head = ["quality measure", "FNMR @0%", "FNMR @30%"]
        for u in uppers:
            head += [f"pAUC 0–{round(100 * u)}% [95% CI]", f"Δ pAUC 0–{round(100 * u)}% [95% CI]"]
        lines += [f"## {prefix}FMR {fmr} (threshold {e['threshold']:.4f})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, m in e["measures"].items():
            f0 = m["edc"]["fnmr"][0]
            cells = [name.replace("|", "\\|"), f"{f0:.4f}", f"{m['fnmr_30']:.4f}"]
            for u in uppers:
                key = f"pauc_{u:g}"
                cells.append(_ci(m["bootstrap"], key))
                d = m.get("difference_to_reference", {}).get(key)
                cells.append("(reference)" if d is None
                             else f"{d['point']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]")
            lines.append("| " + " | ".join(cells) + " |")
        pb = e.get("reference_pair_bootstrap")
        if pb:
            k, u = f"pauc_{uppers[0]:g}", round(100 * uppers[0])
            lines += ["", (f"For comparison, a bootstrap of pairs as if they were independent gives the "
                           f"reference's pAUC 0–{u}% the interval [{pb['ci_low'][k]:.4f}, "
                           f"{pb['ci_high'][k]:.4f}]: pairs share images and identities, so that interval "
                           "is too narrow.")]
        png = plots.get(fmr)
        lines += ["", f"![{alt} at FMR {fmr}]({png})" if png else "(plot skipped: matplotlib missing)", ""]
    return lines


def plot_edc(curves: Mapping[str, EDCResult], path: str | Path, title: str = "",
             xlabel: str = "fraction of genuine pairs discarded (lowest pair quality)") -> Path:
    """One EDC line per quality measure (all curves should share the FMR) -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import textwrap

    fig, ax = plt.subplots(figsize=(6.5, 4.6), dpi=120)
    for name, res in curves.items():
        if res.supported:
            ax.plot(res.discard, res.fnmr, label=name, lw=1.4 if name == next(iter(curves)) else 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FNMR (threshold fixed at 0% discard)")
    ax.set_xlim(0, float(max(r.discard[-1] for r in curves.values())))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    # below the axes, so that no curve is hidden behind it
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
