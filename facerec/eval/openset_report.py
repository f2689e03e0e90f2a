"""Open-set (1:N) identification report: CMC, DET at FPIR and a threshold table.

Protocol over identity-labelled embeddings (``facerec eval openset``): a seeded random half of the
people is enrolled with one image each (their first, in the given order); every other image of an
enrolled person is a *mated* search, every image of the other people a *non-mated* one. A search's
score against a person is its best similarity to that person's gallery samples.

- CMC: the share of mated searches whose own person is among the ``k`` best-scoring gallery people
  (rank = 1 + the number of people scoring strictly higher), k = 1..``ranks``; no threshold.
- DET at FPIR: at threshold ``t`` a non-mated search is a false positive when its best score is
  ``>= t`` (FPIR), a mated search is a miss unless its best person is its own *and* scores ``>= t``
  (FNIR = 1 - DIR), as the gallery search decides (facerec.gallery.openset).
- The table: per target FPIR the threshold of :func:`facerec.gallery.openset.fpir_threshold` on
  these non-mated searches, the DIR / FNIR there and the FPIR achieved; unsupported with fewer than
  1 / FPIR non-mated searches.

Writes ``openset.json``, ``cmc.png``, ``det_fpir.png`` and ``summary.md`` into the report folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facerec.eval.operating import percent, probit, save_figure
from facerec.eval.report_io import pyplot
from facerec.eval.reports import write_json
from facerec.gallery.openset import fpir_threshold, per_person_max

FPIRS = (0.1, 0.01, 0.001)


def split_gallery(names: Sequence[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(gallery rows, probe rows): a seeded random half of the people, one (first) image each."""
    names = np.asarray(names)
    people = np.unique(names)
    enrolled = set(np.random.default_rng(seed).permutation(people)[: len(people) // 2].tolist())
    first = {}
    for row, name in enumerate(names.tolist()):
        if name in enrolled:
            first.setdefault(name, row)
    gallery = np.array(sorted(first.values()), dtype=np.int64)
    probes = np.setdiff1d(np.arange(len(names)), gallery)
    return gallery, probes


def search_outcomes(emb: np.ndarray, names: Sequence[str], gallery: np.ndarray, probes: np.ndarray) -> dict:
    """Per search: mated or not, the rank of its own person (mated), the best score and whether the
    best person is its own."""
    names = np.asarray(names)
    # float64: a float32 score compared with fpir_threshold's float64 threshold (the next double
    # above a score) would round the threshold back down to that score (NumPy 2 casts the scalar).
    scores = np.asarray(emb[probes], np.float64) @ np.asarray(emb[gallery], np.float64).T
    best, people = per_person_max(scores, names[gallery])
    probe_names = names[probes]
    mated = np.isin(probe_names, people)
    own = np.searchsorted(people, probe_names).clip(0, len(people) - 1)
    own_score = best[np.arange(len(best)), own]
    rank = 1 + (best > own_score[:, None]).sum(axis=1)
    top = best.argmax(axis=1)
    return {"mated": mated, "rank": np.where(mated, rank, 0), "top_score": best[np.arange(len(best)), top],
            "correct": mated & (people[top] == probe_names), "people": len(people)}


def cmc(rank: np.ndarray, mated: np.ndarray, ranks: int) -> list[float]:
    """Identification rate at ranks 1..``ranks`` over the mated searches."""
    r = rank[mated]
    return [float(np.mean(r <= k)) for k in range(1, ranks + 1)]


def fpir_table(outcomes: dict, fpirs: Sequence[float] = FPIRS) -> list[dict]:
    top, mated, correct = outcomes["top_score"], outcomes["mated"], outcomes["correct"]
    nonmated = top[~mated]
    rows = []
    for f in sorted(set(fpirs), reverse=True):
        if len(nonmated) * f < 1:
            rows.append({"fpir": f, "supported": False, "threshold": None, "dir": None, "fnir": None,
                         "achieved_fpir": None})
            continue
        t = fpir_threshold(nonmated, f)
        hit = float(np.mean((correct & (top >= t))[mated]))
        rows.append({"fpir": f, "supported": True, "threshold": t, "dir": hit, "fnir": 1.0 - hit,
                     "achieved_fpir": float(np.mean(nonmated >= t))})
    return rows


def det_fpir(outcomes: dict) -> dict[str, list[float]]:
    """(FPIR, FNIR) at every distinct best score of a search, thresholds descending."""
    top, mated, correct = outcomes["top_score"], outcomes["mated"], outcomes["correct"]
    thresholds = np.unique(top)[::-1]
    nonmated = np.sort(top[~mated])
    hits = np.sort(top[correct])
    fpir = (len(nonmated) - np.searchsorted(nonmated, thresholds, side="left")) / max(len(nonmated), 1)
    dir_ = (len(hits) - np.searchsorted(hits, thresholds, side="left")) / max(int(mated.sum()), 1)
    return {"threshold": thresholds.tolist(), "fpir": fpir.tolist(), "fnir": (1.0 - dir_).tolist()}


def openset_report(emb: np.ndarray, names: Sequence[str], out: str | Path, *, fpirs: Sequence[float] = FPIRS,
                   ranks: int = 20, seed: int = 0, title: str = "open-set identification", command: str = "",
                   meta: dict | None = None) -> dict:
    """The report of the module docstring for L2-normalised ``emb`` (rows = images)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gallery, probes = split_gallery(names, seed)
    outcomes = search_outcomes(emb, names, gallery, probes)
    mated = outcomes["mated"]
    if not mated.any() or mated.all():
        raise ValueError("open-set evaluation needs people with two or more images and people to leave out")
    ranks = min(ranks, outcomes["people"])
    report = {"title": title, "command": command, **(meta or {}), "seed": seed,
              "gallery_people": outcomes["people"], "mated_searches": int(mated.sum()),
              "nonmated_searches": int((~mated).sum()), "cmc": cmc(outcomes["rank"], mated, ranks),
              "fpir_table": fpir_table(outcomes, fpirs)}
    curve = det_fpir(outcomes)
    write_json(out / "det_fpir.json", curve)
    files = {"metrics": "openset.json", "det_arrays": "det_fpir.json"}
    if plot_cmc(report["cmc"], out / "cmc.png", title):
        files["cmc_plot"] = "cmc.png"
    if plot_det_fpir(curve, report["fpir_table"], out / "det_fpir.png", title):
        files["det_plot"] = "det_fpir.png"
    report["files"] = files
    write_json(out / "openset.json", report)
    (out / "summary.md").write_text(openset_markdown(report))
    return report


def plot_cmc(rates: list[float], path: Path, title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(np.arange(1, len(rates) + 1), rates, "o-", ms=3)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate (mated searches)")
    ax.set_ylim(min(rates) - 0.05, 1.0)
    return save_figure(fig, ax, path, title, legend=False)


def plot_det_fpir(curve: dict, table: list[dict], path: Path, title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fpir, fnir = np.asarray(curve["fpir"]), np.asarray(curve["fnir"])
    keep = fpir > 0
    fig, ax = plt.subplots(figsize=(5.5, 4.4), dpi=120)
    ax.plot(probit(fpir[keep]), probit(fnir[keep]))
    for row in (r for r in table if r["supported"]):
        ax.plot(probit([row["achieved_fpir"] or row["fpir"]]), probit([row["fnir"]]), "o", ms=5,
                label=f"FPIR {row['fpir']:g}: threshold {row['threshold']:.3f}")
    ticks = (1e-3, 1e-2, 0.05, 0.2, 0.5, 0.8)
    ax.set_xticks(probit(ticks), [f"{100 * t:g}%" for t in ticks], fontsize=7)
    ax.set_yticks(probit(ticks), [f"{100 * t:g}%" for t in ticks], fontsize=7)
    ax.set_xlabel("false positive identification rate (FPIR)")
    ax.set_ylabel("false negative identification rate (FNIR)")
    return save_figure(fig, ax, path, title)


def openset_markdown(r: dict) -> str:
    lines = [f"# {r['title']}", ""]
    if r.get("command"):
        lines += [f"Command: `{r['command']}`", ""]
    lines += [(f"{r['gallery_people']:,} people enrolled with one image each (seed {r['seed']}); "
               f"{r['mated_searches']:,} mated and {r['nonmated_searches']:,} non-mated searches."), "",
              "## CMC (mated searches, no threshold)", "", "| rank | identification rate |", "|---|---|"]
    lines += [f"| {k} | {percent(r['cmc'][k - 1])} |" for k in (1, 5, 10, 20) if k <= len(r["cmc"])]
    lines += ["", "## Thresholds at FPIR (a match needs the best score >= threshold)", "",
              "| FPIR (target) | threshold | DIR | FNIR | FPIR achieved |", "|---|---|---|---|---|"]
    for row in r["fpir_table"]:
        if not row["supported"]:
            lines.append(f"| {row['fpir']:g} | unsupported ({r['nonmated_searches']:,} non-mated searches) | | | |")
            continue
        lines.append(f"| {row['fpir']:g} | {row['threshold']:.4f} | {percent(row['dir'])} | {percent(row['fnir'])} "
                     f"| {percent(row['achieved_fpir'])} |")
    lines.append("")
    files = r.get("files", {})
    lines += [f"![{key}]({files[key]})" for key in ("cmc_plot", "det_plot") if key in files]
    if "cmc_plot" not in files:
        lines.append("(plots skipped: matplotlib is not installed)")
    return "\n".join(lines) + "\n"
