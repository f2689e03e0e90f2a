"""Open-set identification: the threshold that answers "unknown", and the metrics that judge it.

A 1:N search is *non-mated* when the probe's person is not in the gallery; its score is the best
similarity against the whole gallery. The false-positive identification rate at threshold ``t`` is
the share of non-mated searches scoring ``>= t`` (then the service would name someone who is not
enrolled). It grows with the gallery: the best of more impostors is higher. So the threshold is
calibrated per gallery size, on the validation split only (LFW fold 5 people; never LFW-H2):

- for each size G in a grid and each of ``repeats`` random draws, G people are enrolled with one
  random image each and every image of the other people is searched (non-mated);
- per (G, FPIR) the threshold is the smallest ``t`` with FPIR(t) <= target on the pooled searches
  (``fpir_threshold``); ``None`` where there are fewer than 1/FPIR searches;
- galleries larger than the validation people allow are calibrated from all cross-identity pairs
  of the validation images under independence: a non-mated search over G samples stays below ``t``
  when each of its G impostor scores does, so FPIR(t, G) = 1 - (1 - FAR(t))^G and the threshold is
  the pair score at FAR = 1 - (1 - FPIR)^(1/G), as long as at least ``min_pairs`` impostor pairs lie
  above it (on the sizes both methods cover they agree to about 0.01; the file records both);
- thresholds are made non-decreasing in G (a larger gallery never gets a laxer threshold).

At search time :meth:`OpenSetCalibration.lookup` takes the smallest calibrated size >= the
gallery's sample count (a person with several samples offers several chances to a false match,
so counting samples is the conservative choice); beyond the largest size it uses the largest and
says so (``beyond_calibration``). DIR (detection and identification rate) at FPIR is the share of
mated searches whose best person is the right one *and* scores ``>= t``; rank-1 ignores ``t``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from facerec.bundle import OPENSET_FILE  # noqa: F401 - where the model folder keeps it (re-exported)

DEFAULT_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 400)
PAIR_SIZES = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000)
DEFAULT_FPIRS = (0.1, 0.01, 0.001)


def fpir_threshold(nonmated: np.ndarray, fpir: float) -> float:
    """The smallest threshold ``t`` with ``mean(nonmated >= t) <= fpir`` (a match needs ``>= t``)."""
    scores = np.sort(np.asarray(nonmated, dtype=np.float64))[::-1]
    if not 0.0 < fpir < 1.0:
        raise ValueError(f"fpir must be in (0, 1), got {fpir}")
    if len(scores) * fpir < 1:
        raise ValueError(
            f"FPIR {fpir:g} needs at least {math.ceil(1 / fpir)} non-mated searches; there are {len(scores)}"
        )
    allowed = math.floor(fpir * len(scores) + 1e-9)  # false positives permitted
    # Everything strictly above scores[allowed] may match: at most `allowed` searches.
    return float(np.nextafter(scores[allowed], np.inf))


def pair_model_threshold(
    impostor_desc: np.ndarray, fpir: float, size: int, min_pairs: int = 5
) -> float | None:
    """Threshold for a gallery of ``size`` samples from impostor pair scores (sorted, highest first)
    under independence; None when fewer than ``min_pairs`` pairs would lie above it."""
    far = -np.expm1(np.log1p(-fpir) / size)  # 1 - (1 - fpir)^(1/size), without cancellation
    allowed = far * len(impostor_desc)
    if allowed < min_pairs:
        return None
    return float(np.nextafter(impostor_desc[math.floor(allowed)], np.inf))


def per_person_max(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, S) sample scores -> (P, L) best score per gallery label, and the L labels (sorted)."""
    uniq, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
    return np.maximum.reduceat(scores[:, order], starts, axis=1), uniq


def nonmated_max_scores(gallery: np.ndarray, probes: np.ndarray) -> np.ndarray:
    return (np.asarray(probes, np.float32) @ np.asarray(gallery, np.float32).T).max(axis=1)


class OperatingPoint(BaseModel):
    threshold: float
    fpir: float
    gallery_size: int
    calibrated_gallery_size: int
    beyond_calibration: bool
    calibrated_on: str
    calibration_method: str  # searches | pairs


class OpenSetCalibration(BaseModel):
    """What ``facerec calibrate-openset`` writes into the model folder (``openset.json``)."""

    contract_id: str
    calibrated_on: str
    method: str = Field(
        "max non-mated score over random galleries of one image per person, "
        "pooled over repeats; non-decreasing in gallery size"
    )
    gallery_sizes: list[int]
    fpirs: list[float]
    thresholds: dict[str, list[float | None]]  # f"{fpir:g}" -> one per gallery size
    searches: list[int]  # pooled non-mated searches per gallery size (0: calibrated from pairs)
    size_method: list[str] = Field(default_factory=list)  # per size: "searches" | "pairs"
    impostor_pairs: int = 0
    pair_model_check: dict[str, list[float | None]] = Field(
        default_factory=dict, description="the pair model's thresholds at the searched sizes, for comparison"
    )
    repeats: int
    default_fpir: float = 0.01
    command: str | None = None

    def fpir_key(self, fpir: float) -> str:
        for f in self.fpirs:
            if math.isclose(f, fpir, rel_tol=1e-6):
                return f"{f:g}"
        raise ValueError(
            f"FPIR {fpir:g} is not calibrated for this model; calibrated: "
            + ", ".join(f"{f:g}" for f in self.fpirs)
        )

    def lookup(self, fpir: float, gallery_size: int) -> OperatingPoint:
        row = self.thresholds[self.fpir_key(fpir)]
        methods = self.size_method or ["searches"] * len(self.gallery_sizes)
        usable = [(s, t, m) for s, t, m in zip(self.gallery_sizes, row, methods) if t is not None]
        if not usable:
            raise ValueError(f"FPIR {fpir:g}: too few validation searches to calibrate it")
        chosen = next((u for u in usable if u[0] >= gallery_size), None)
        beyond = chosen is None
        size, threshold, method = usable[-1] if beyond else chosen
        return OperatingPoint(
            threshold=float(threshold),
            fpir=fpir,
            gallery_size=int(gallery_size),
            calibrated_gallery_size=int(size),
            beyond_calibration=beyond,
            calibrated_on=self.calibrated_on,
            calibration_method=method,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.model_dump(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> OpenSetCalibration:
        return cls.model_validate_json(Path(path).read_text())


def calibrate(
    embeddings: np.ndarray,
    labels,
    contract_id: str,
    calibrated_on: str,
    sizes=DEFAULT_SIZES,
    fpirs=DEFAULT_FPIRS,
    repeats: int = 20,
    seed: int = 0,
    min_probe_people: int = 50,
    pair_sizes=PAIR_SIZES,
    min_pairs: int = 5,
) -> OpenSetCalibration:
    """Thresholds per (gallery size, FPIR): from non-mated searches among ``embeddings``' people for
    the sizes they allow, from all cross-identity pairs for ``pair_sizes`` beyond those."""
    emb = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels)
    people, inverse = np.unique(labels, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(people))]
    sizes = [int(s) for s in sizes if s <= len(people) - min_probe_people]
    if not sizes:
        raise ValueError(f"{len(people)} people are too few to calibrate (need > {min_probe_people})")
    rng = np.random.default_rng(seed)
    pooled: list[list[np.ndarray]] = [[] for _ in sizes]
    for _ in range(repeats):
        for j, size in enumerate(sizes):
            chosen = rng.permutation(len(people))[:size]
            gallery = np.array([rng.choice(rows_of[p]) for p in chosen])
            enrolled = np.zeros(len(people), bool)
            enrolled[chosen] = True
            probes = np.flatnonzero(~enrolled[inverse])
            pooled[j].append(nonmated_max_scores(emb[gallery], emb[probes]))
    scores = [np.concatenate(p) for p in pooled]
    upper = np.triu_indices(len(emb), k=1)
    impostor = (emb @ emb.T)[upper][inverse[upper[0]] != inverse[upper[1]]]
    impostor = np.sort(impostor.astype(np.float64))[::-1]
    extra = [int(s) for s in pair_sizes if s > sizes[-1]]
    table: dict[str, list[float | None]] = {}
    check: dict[str, list[float | None]] = {}
    for f in fpirs:
        row: list[float | None] = [fpir_threshold(s, f) if len(s) * f >= 1 else None for s in scores]
        check[f"{f:g}"] = [pair_model_threshold(impostor, f, size, min_pairs) for size in sizes]
        row += [pair_model_threshold(impostor, f, size, min_pairs) for size in extra]
        running = -np.inf  # non-decreasing in size
        for i, t in enumerate(row):
            if t is not None:
                running = max(running, t)
                row[i] = float(running)
        table[f"{f:g}"] = row
    return OpenSetCalibration(
        contract_id=contract_id,
        calibrated_on=calibrated_on,
        gallery_sizes=sizes + extra,
        fpirs=[float(f) for f in fpirs],
        thresholds=table,
        searches=[len(s) for s in scores] + [0] * len(extra),
        size_method=["searches"] * len(sizes) + ["pairs"] * len(extra),
        impostor_pairs=len(impostor),
        pair_model_check=check,
        repeats=repeats,
    )


def identification_metrics(
    gallery: np.ndarray,
    gallery_labels,
    probes: np.ndarray,
    probe_labels,
    fpirs=(0.1, 0.01),
    thresholds: dict[str, float] | None = None,
    top1=None,
) -> dict:
    """Rank-1, DIR at FPIR (threshold set on these non-mated searches), and the FPIR / DIR reached
    at given ``thresholds`` (e.g. the validation-calibrated ones). ``top1(probes)`` gives each
    probe's best gallery label and its score (e.g. through the approximate index,
    :func:`approximate_top1`); default: exact, by brute force."""
    people = np.unique(np.asarray(gallery_labels))
    if top1 is None:
        scores = np.asarray(probes, np.float32) @ np.asarray(gallery, np.float32).T
        best, people = per_person_max(scores, np.asarray(gallery_labels))
        top = best.argmax(axis=1)
        top_label, top_score = people[top], best[np.arange(len(best)), top]
    else:
        top_label, top_score = top1(probes)
    # float64: a threshold just above a float32 score (fpir_threshold's nextafter) must stay above it;
    # compared with float32 scores, NumPy 2 would round the threshold down onto the score.
    top_score = np.asarray(top_score).astype(np.float64)
    probe_labels = np.asarray(probe_labels)
    mated = np.isin(probe_labels, people)
    correct = np.asarray(top_label) == probe_labels
    out = {
        "gallery_persons": len(people),
        "gallery_samples": len(gallery),
        "mated_searches": int(mated.sum()),
        "nonmated_searches": int((~mated).sum()),
        "rank1": float(correct[mated].mean()) if mated.any() else None,
        "dir_at_fpir": {},
        "at_threshold": {},
    }
    nonmated = top_score[~mated]
    for f in fpirs:
        if len(nonmated) * f < 1:
            out["dir_at_fpir"][f"{f:g}"] = None
            continue
        t = fpir_threshold(nonmated, f)
        out["dir_at_fpir"][f"{f:g}"] = {
            "threshold": t,
            "dir": float((correct & (top_score >= t))[mated].mean()),
        }
    for name, t in (thresholds or {}).items():
        out["at_threshold"][name] = {
            "threshold": float(t),
            "fpir": float((nonmated >= t).mean()),
            "dir": float((correct & (top_score >= t))[mated].mean()),
        }
    return out


def approximate_top1(gallery: np.ndarray, labels, policy=None):
    """``top1(probes) -> (best label, its score)`` through an approximate index of ``gallery``
    (one sample per row, ``labels`` its persons): what :func:`identification_metrics` takes to evaluate open-set identification as the approximate index answers it (``policy``: an
    :class:`~facerec.gallery.ann.IndexPolicy`, default approximate with its defaults)."""
    from facerec.gallery.ann import ApproxIndex, IndexPolicy  # faiss: only when asked for

    labels = np.asarray(labels)
    names = {str(x): x for x in labels}
    index = ApproxIndex(gallery.shape[1], policy or IndexPolicy(kind="approximate"))
    index.add([str(i) for i in range(len(gallery))], [str(x) for x in labels], gallery)

    def top1(probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = [index.search(q, 1)[0] for q in np.asarray(probes, np.float32)]
        return np.array([names[c.person_id] for c in found]), np.array([c.similarity for c in found])

    return top1
