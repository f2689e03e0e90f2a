"""The OOD study's fitting and reporting: the combiner and threshold fitted on validation scores,
every test set reported (threshold-free metrics, rates at the threshold, leave-one-family-out
numbers, the verification effect of attacks), and the adaptive attack against a fitted detector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch

from facerec.eval.ood_study.splits import InputCache, attack_set, family
from facerec.ood.combiner import CEILING_CANDIDATES


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def verification_effect(
    emb: np.ndarray, source: np.ndarray, faces: dict, clean_emb: np.ndarray, fam: str, thr: float
) -> dict:
    """Verification decisions (cosine >= threshold = match) of the scored adversarial faces against
    their gallery face (dodging) or their target (impersonation), and of the same clean faces."""
    probe = faces["attacked"][source]
    ref = clean_emb[faces["target" if fam == "impersonation" else "gallery"][source]]
    adv, clean = cosine(emb, ref), cosine(clean_emb[probe], ref)
    return {
        "match_clean": float(np.mean(clean >= thr)),
        "match_attacked": float(np.mean(adv >= thr)),
        "cosine_clean": float(clean.mean()),
        "cosine_attacked": float(adv.mean()),
    }


def adaptive_win(
    emb: np.ndarray, source: np.ndarray, passed: np.ndarray, faces: dict, clean_emb: np.ndarray, thr: float
) -> tuple[float, int]:
    """Over the attacked faces that matched their gallery face when clean: the share whose attacked
    photo was scored, no longer matches, and passed the detector (``passed``, one per scored face).
    Returns (share, number of faces that matched when clean)."""
    att, gal_e = faces["attacked"], clean_emb[faces["gallery"]]
    matched = cosine(clean_emb[att], gal_e) >= thr
    win = np.zeros(len(att), bool)
    win[source] = (cosine(emb, gal_e[source]) < thr) & passed
    return float(np.sum(win & matched) / max(int(matched.sum()), 1)), int(matched.sum())


# ----------------------------------------------------------------------------- fitting and reporting


def evaluate(
    sv: dict[str, np.ndarray],
    st: dict[str, np.ndarray],
    sets_test: dict[str, dict],
    emb_test: dict[str, np.ndarray],
    tpr: float = 0.95,
    verification_threshold: float | None = None,
    ceiling_candidates=CEILING_CANDIDATES,
) -> dict:
    """Fit the combiner on validation layer scores ``sv`` (``faces`` vs. every other set, each family
    weighted equally; its ceiling quantile chosen among ``ceiling_candidates`` on validation data,
    ``combiner.select_ceiling_quantile``), calibrate the threshold for ``tpr`` on validation faces, and
    report every test set of ``st``: face-detector rejections, threshold-free metrics, the rates at
    the threshold, the leave-one-family-out numbers (``held_out``: ceiling chosen without the family
    too), per-layer AUROCs and, for attacks, the verification effect. Sets named ``ctl_*`` are
    genuine controls: only their pass rate is reported."""
    from facerec.ood.combiner import (
        calibrate_threshold,
        fit_combiner,
        leave_one_family_out,
        select_ceiling_quantile,
    )
    from facerec.ood.metrics import auroc, ood_report, rates_at_threshold

    key = f"tnr_at_tpr{round(tpr * 100)}"
    ood_names = [n for n in sv if n != "faces" and not n.startswith("ctl_")]
    test_names = [n for n in st if n != "faces" and not n.startswith("ctl_")]
    ctl_names = [n for n in st if n.startswith("ctl_")]
    fams = sorted({family(n) for n in ood_names})
    val_fams = {f: np.concatenate([sv[n] for n in ood_names if family(n) == f]) for f in fams}
    nonempty = {n: st[n] for n in test_names if len(st[n])}
    lofo = leave_one_family_out(
        sv["faces"],
        val_fams,
        st["faces"],
        nonempty,
        tpr=tpr,
        family_of={n: family(n) for n in nonempty},
        ceiling_candidates=ceiling_candidates,
    )
    q, table = (
        select_ceiling_quantile(sv["faces"], val_fams, ceiling_candidates)
        if ceiling_candidates
        else (None, {})
    )
    groups = np.concatenate([np.full(len(val_fams[f]), i) for i, f in enumerate(fams)])
    comb = fit_combiner(
        sv["faces"], np.concatenate([val_fams[f] for f in fams]), out_groups=groups, ceiling_quantile=q
    )
    thr = calibrate_threshold(comb.decision(sv["faces"]), tpr)
    s_in = comb.decision(st["faces"])
    rows = {}
    for n in test_names + ctl_names:
        s = sets_test[n]
        row = {
            "offered": int(s["offered"]),
            "rejected_by_face_detector": int(s["offered"]) - len(st[n]),
            "scored": len(st[n]),
        }
        if len(st[n]):
            s_out = comb.decision(st[n])
            if n.startswith("ctl_"):
                row["pass_rate_at_threshold"] = float(np.mean(s_out >= thr))
            else:
                row.update(ood_report(s_in, s_out, tpr))
                row["tnr_at_threshold"] = rates_at_threshold(s_in, s_out, thr)[1]
                row["held_out"] = {
                    k: lofo[n].get(k)
                    for k in (
                        "auroc",
                        key,
                        "tnr_at_val_threshold",
                        "tpr_at_val_threshold",
                        "weights",
                        "ceiling_quantile",
                    )
                }
                row["layer_auroc"] = [auroc(st["faces"][:, j], st[n][:, j]) for j in range(st[n].shape[1])]
            if family(n) in ("fgsm", "pgd", "impersonation") and verification_threshold is not None:
                row.update(
                    verification_effect(
                        emb_test[n],
                        s["source"],
                        sets_test["faces"],
                        emb_test["faces"],
                        family(n),
                        verification_threshold,
                    )
                )
        rows[n] = row
    return {
        "combiner": comb,
        "threshold": thr,
        "rows": rows,
        "tpr_test": float(np.mean(s_in >= thr)),
        "tpr_val": float(np.mean(comb.decision(sv["faces"]) >= thr)),
        "s_in": s_in,
        "combiner_weights": comb.weights.tolist(),
        "ceiling_quantile": q,
        "ceiling_table": {str(k): v for k, v in table.items()},
    }


def detection_layer(locator, faces: dict):
    """The face detector's confidence as a combiner column, its neutral value the median of the
    validation faces' (``faces``: the validation split's genuine set)."""
    from facerec.ood import DetectionLayer

    return DetectionLayer(locator.detector_name, float(np.median(DetectionLayer.logit(faces["det_score"]))))


def det_scores_of(det, set_: dict):
    """The face detector's confidences of a set's crops for ``det``'s detection layer (None when the
    detector has none, whatever the set holds)."""
    if det.detection is None:
        return None
    if "det_score" not in set_:
        raise KeyError("this cached set has no detector confidences (made by an older facerec): clear the cache")
    return set_["det_score"]


def detector_objective(det, use: list[int] | None = None, cap: float = 2.0) -> Callable:
    """A differentiable in-distribution score for adaptive attacks: the detector's log-odds above
    its threshold, capped at ``cap`` (once safely accepted, the attacker spends its budget on the
    embedding). ``use``: the layer columns the combiner reads (default: all)."""

    def score(features):
        # The detection column (if any) is not differentiable in the crop: it stays at its neutral
        # value here, and the attacked photo is detected again when the attack is scored.
        cols = det.layer_scores(features)
        if use is not None:
            cols = cols[:, use]
        return torch.clamp(det.combiner.decision(cols) - det.threshold, max=cap)

    return score


def adaptive_sets(
    model,
    det,
    locator,
    faces: dict,
    clean_emb: np.ndarray,
    cache: InputCache,
    domains,
    eps: float,
    steps: int,
    weights,
    seed: int,
    tag: str,
    use: list[int] | None = None,
) -> dict[str, dict]:
    """PGD dodging that also raises the detector's score, on the test faces' attack plan, for every
    domain and every weight of the detector term (the report keeps them all: take the strongest)."""
    att = faces["attacked"]
    gallery = torch.from_numpy(clean_emb[faces["gallery"]]).float()
    parts = [det.combiner.weights, [det.threshold]]
    if det.combiner.ceiling is not None:
        parts.append(det.combiner.ceiling)
    digest = hashlib.sha256(np.concatenate(parts).tobytes()).hexdigest()[:8]
    objective = detector_objective(det, use)
    out = {}
    for dom in domains:
        for w in weights:
            out[f"adaptive@{eps:g}/{dom}/w{w:g}"] = cache.get(
                f"test_adaptive_{dom}_{tag}_{digest}_w{w:g}_s{steps}",
                lambda dom=dom, w=w: attack_set(
                    model,
                    locator,
                    faces["photos"][att],
                    faces["landmarks"][att],
                    faces["crops"][att],
                    "pgd",
                    eps / 255,
                    dom,
                    steps,
                    seed,
                    reference=gallery,
                    detector_score=objective,
                    weight=w,
                    det_score=faces["det_score"][att],
                ),
            )
    return out


def adaptive_row(
    s_in: np.ndarray,
    s_out: np.ndarray,
    threshold: float,
    set_: dict,
    emb: np.ndarray,
    faces: dict,
    clean_emb: np.ndarray,
    tpr: float,
    verification_threshold: float,
) -> dict:
    from facerec.ood.metrics import ood_report, rates_at_threshold

    row = {
        "offered": int(set_["offered"]),
        "rejected_by_face_detector": int(set_["offered"]) - len(set_["crops"]),
        "scored": len(set_["crops"]),
    }
    if len(set_["crops"]):
        row.update(ood_report(s_in, s_out, tpr))
        row["tnr_at_threshold"] = rates_at_threshold(s_in, s_out, threshold)[1]
        row.update(
            verification_effect(emb, set_["source"], faces, clean_emb, "adaptive", verification_threshold)
        )
        row["success_and_undetected"], row["matched_when_clean"] = adaptive_win(
            emb, set_["source"], s_out >= threshold, faces, clean_emb, verification_threshold
        )
    return row


def markdown_rows(rows: dict, tpr: float) -> list[str]:
    """The per-set table of one detector (test split)."""
    pct = round(tpr * 100)
    key = f"tnr_at_tpr{pct}"
    lines = [
        (
            f"| set | offered | rejected by face detector | scored | AUROC | TNR@{pct} | held-out AUROC | "
            f"held-out TNR@{pct} | TNR at threshold | verification match, clean → attacked |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    adaptive = []
    for n, r in rows.items():
        if n.startswith("ctl_"):
            continue
        head = f"| {n} | {r['offered']} | {r['rejected_by_face_detector']} | {r['scored']} | "
        if "auroc" not in r:
            lines.append(head + "– | – | – | – | – | – |")
            continue
        h = r.get("held_out")
        held = f"{h['auroc']:.3f} | {h[key]:.3f}" if h else "(never fitted) | –"
        match = f"{r['match_clean']:.2f} → {r['match_attacked']:.2f}" if "match_attacked" in r else "–"
        lines.append(
            head + f"{r['auroc']:.3f} | {r[key]:.3f} | {held} | {r['tnr_at_threshold']:.3f} | {match} |"
        )
        if "success_and_undetected" in r:
            adaptive.append(
                f"- {n}: of the {r['matched_when_clean']} attacked faces that matched their gallery "
                f"face when clean, **{r['success_and_undetected']:.1%}** are scored, no longer match "
                "and pass the detector (the attacker's real win)."
            )
    if adaptive:
        lines += ["", *adaptive]
    ctl = [n for n in rows if n.startswith("ctl_")]
    if ctl:
        lines += [
            "",
            (
                "Controls: genuine faces, natural but poor captures (the quality score's business); the "
                f"share that passes the threshold should stay near {pct}%:"
            ),
            "",
            "| control | offered | rejected by face detector | pass rate at threshold |",
            "|---|---|---|---|",
        ]
        for n in ctl:
            r = rows[n]
            rate = f"{r['pass_rate_at_threshold']:.3f}" if "pass_rate_at_threshold" in r else "–"
            lines.append(f"| {n} | {r['offered']} | {r['rejected_by_face_detector']} | {rate} |")
    return lines
