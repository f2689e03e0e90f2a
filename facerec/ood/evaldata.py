"""The OOD detector's evaluation data on the project's protocol, built once and cached.

Shared by ``facerec fit-ood`` (which fits and reports the shipped detector) and
``benchmarks/ood_eval.py`` (which compares variants), so both see exactly the same inputs:

- validation = LFW fold-5 people, CIFAR first half, even-numbered scikit-image photos and the
  first 50 non-face patches; test = LFW-H2 people (folds 6-10), CIFAR second half, the odd
  photos and the last 50 patches. Nothing of the test split is used to fit or tune anything;
- every set is made of aligned crops from ``evalsets.ServiceLocator`` (the service's own face
  location), with the number of photos offered, so face-detector rejections are counted;
- attacks are made with the torch model; dodging moves away from the person's gallery face
  (another photo of them), impersonation toward another person's face.

The cache is a folder of ``.npz`` files named after the sets, in a sub-folder whose name hashes
the configuration, so a changed setting never reuses stale inputs. Delete it to recompute.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from facerec.ood import evalsets as ev
from facerec.ood.combiner import CEILING_CANDIDATES


def family(name: str) -> str:
    """'fgsm@4/photo' -> 'fgsm'; 'adaptive@4/crop' -> 'adaptive'; 'cifar' -> 'cifar'."""
    return name.split("@")[0].split("/")[0]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class EvalConfig:
    """What the inputs depend on (sizes per split, attack settings, seed)."""

    checkpoint: str
    faces: int = 500  # LFW photos sampled per split
    attacked: int = 200  # faces attacked / corrupted per set, test split
    attacked_val: int = 100  # the same, validation split
    cifar: int = 1000  # CIFAR images per split, each shown at 32, 112 and 224 px
    skimage_crops: int = 150  # random crops per scikit-image photo
    attack_eps: tuple[float, ...] = (2.0, 4.0, 8.0)  # grey levels (/255)
    domains: tuple[str, ...] = ("photo", "crop")
    pgd_steps: int = 5
    seed: int = 0

    def cache_key(self, feature_dims) -> dict:
        key = asdict(self)
        key["attack_eps"], key["domains"] = list(self.attack_eps), list(self.domains)
        key["feature_dims"] = list(feature_dims)
        key["dodging_reference"] = "gallery"
        key["det_score"] = True  # every set carries the face detector's confidence of each crop
        return key


class InputCache:
    def __init__(self, root: str | Path, key: dict) -> None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        self.dir = Path(root) / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
        self.loaded = self.computed = 0  # how many sets came from the cache / were made in this run

    def get(self, name: str, fn: Callable[[], dict]) -> dict:
        path = self.dir / f"{name.replace('/', '_')}.npz"
        if path.exists():
            self.loaded += 1
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        self.computed += 1
        t0 = time.time()
        value = fn()
        tmp = path.with_suffix(".tmp.npz")
        with open(tmp, "wb") as fh:
            np.savez(fh, **value)
        tmp.replace(path)  # atomic: an interrupted run never leaves a half-written set
        log(f"  {name}: {time.time() - t0:.0f} s")
        return value


@dataclass
class SplitSpec:
    photos: list[Path]
    names: list[str]
    cifar: list[Path]
    skimage_photos: list[str]
    skimage_patches: list[int]
    seed: int
    attacked: int


def lfw_splits(cfg: EvalConfig, data=None, rng: np.random.Generator | None = None) -> dict[str, SplitSpec]:
    """The validation and test inputs of the protocol (see the module doc)."""
    from facerec.data import protocol

    root = protocol.data_root(data)
    rng = rng if rng is not None else np.random.default_rng(cfg.seed)

    def people_photos(people):
        items = [(p, n) for p, n in protocol.lfw_images_of(people, root) if p.exists()]
        idx = sorted(rng.permutation(len(items))[: cfg.faces])
        return [items[i][0] for i in idx], [items[i][1] for i in idx]

    val_p, val_n = people_photos(protocol.validation_people(root))
    test_p, test_n = people_photos(protocol.test_people(root))
    cifar = sorted((root / "cifar10_ood").glob("*/*.jpg"))
    cifar = [cifar[i] for i in rng.permutation(len(cifar))]
    half = len(cifar) // 2
    sk = list(ev.SKIMAGE_PHOTOS)
    return {
        "val": SplitSpec(
            val_p, val_n, cifar[:half][: cfg.cifar], sk[0::2], list(range(50)), cfg.seed, cfg.attacked_val
        ),
        "test": SplitSpec(
            test_p,
            test_n,
            cifar[half:][: cfg.cifar],
            sk[1::2],
            list(range(50, 100)),
            cfg.seed + 1,
            cfg.attacked,
        ),
    }


def as_set(s: ev.EvalSet) -> dict:
    return {"crops": s.crops, "offered": np.array(s.offered), "source": s.source, "det_score": s.det_score}


def read_photos(paths) -> np.ndarray:
    from facerec.data.datasets import read_rgb

    return np.stack([read_rgb(p) for p in paths])


def attack_plan(names: list[str], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of up to ``n`` faces to attack (those whose person has another face in the set), the
    gallery face of each (another photo of the same person) and an impersonation target (the face
    of the next attacked person who is someone else)."""
    first: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        first.setdefault(name, []).append(i)
    att = np.array([i for i, name in enumerate(names) if len(first[name]) > 1][:n], dtype=np.int64)
    if len(set(np.asarray(names)[att])) < 2:
        raise ValueError("too few people with two or more faces to attack: sample more faces")
    gal = np.array([next(j for j in first[names[i]] if j != i) for i in att], dtype=np.int64)
    tgt = np.array(
        [
            next(
                att[(k + d) % len(att)]
                for d in range(1, len(att))
                if names[att[(k + d) % len(att)]] != names[i]
            )
            for k, i in enumerate(att)
        ],
        dtype=np.int64,
    )
    return att, gal, tgt


def attack_set(
    model,
    locator: ev.ServiceLocator,
    photos,
    lms,
    faces,
    kind: str,
    eps: float,
    domain: str,
    steps: int,
    seed: int,
    target=None,
    reference=None,
    detector_score=None,
    weight: float = 1.0,
    det_score=None,
) -> dict:
    """One attacked set: photos through the alignment then located again (``photo``), or crops.
    ``det_score``: the face detector's confidence of each clean photo, which a crop attack keeps (it
    perturbs the crop after detection); a photo attack is detected again."""
    if domain == "photo":
        adv = ev.attack_photos(
            model, photos, lms, kind, eps, steps, target, detector_score, weight, seed, reference=reference
        )
        return as_set(locator.crops(adv))
    adv = ev.attack_crops(
        model, faces, kind, eps, steps, target, detector_score, weight, seed, reference=reference
    )
    if det_score is None:
        raise ValueError("a crop attack needs the clean photos' det_score")
    return {
        "crops": adv,
        "offered": np.array(len(adv)),
        "source": np.arange(len(adv)),
        "det_score": np.asarray(det_score, np.float64),
    }


def build_split(
    split: str,
    spec: SplitSpec,
    cfg: EvalConfig,
    model,
    locator: ev.ServiceLocator,
    cache: InputCache,
    controls: bool | None = None,
) -> dict[str, dict]:
    """Every set of one split: ``faces`` (with ``photos``, ``landmarks`` and the attack plan
    ``attacked`` / ``gallery`` / ``target``), corruptions, non-faces, attacks and, on test, the
    controls. Each set: ``crops`` (N, 112, 112, 3) uint8, ``offered``, ``source``."""
    controls = split == "test" if controls is None else controls
    sets: dict[str, dict] = {}

    def genuine():
        photos = read_photos(spec.photos)
        crops, lms, keep, score = [], [], [], []
        for i, p in enumerate(photos):
            found = locator.locate(p)
            if found is not None:
                crops.append(found[0])
                lms.append(found[1])
                score.append(found[2])
                keep.append(i)
        return {
            "crops": np.stack(crops),
            "offered": np.array(len(photos)),
            "source": np.array(keep),
            "landmarks": np.stack(lms),
            "photos": photos[keep],
            "det_score": np.asarray(score, np.float64),
        }

    g = cache.get(f"{split}_faces", genuine)
    sets["faces"] = g
    att, gal, tgt = attack_plan([spec.names[i] for i in g["source"]], spec.attacked)
    g["attacked"], g["gallery"], g["target"] = att, gal, tgt
    photos, lms, crops, det = g["photos"][att], g["landmarks"][att], g["crops"][att], g["det_score"][att]

    for name, imgs in ev.corruptions(photos, lms, spec.seed).items():
        sets[name] = cache.get(f"{split}_{name}", lambda imgs=imgs: as_set(locator.crops(imgs)))
    if controls:
        for name, imgs in ev.controls(photos, spec.seed).items():
            sets[name] = cache.get(f"{split}_{name}", lambda imgs=imgs: as_set(locator.crops(imgs)))
    sets["cifar"] = cache.get(f"{split}_cifar", lambda: as_set(locator.crops(ev.cifar_photos(spec.cifar))))
    sets["skimage"] = cache.get(
        f"{split}_skimage",
        lambda: as_set(
            locator.crops(
                ev.skimage_photos(spec.skimage_photos, cfg.skimage_crops, spec.seed)
                + ev.skimage_patches(spec.skimage_patches)
            )
        ),
    )

    with torch.no_grad():
        emb = torch.cat(
            [model(ev.to_input(g["crops"][i : i + 50])).embedding for i in range(0, len(g["crops"]), 50)]
        )
    gallery, target = emb[gal], emb[tgt]
    for dom in cfg.domains:
        for e in cfg.attack_eps:
            for kind in ("fgsm", "pgd"):
                name = f"{kind}@{e:g}/{dom}"
                sets[name] = cache.get(
                    f"{split}_{name}",
                    lambda kind=kind, e=e, dom=dom: attack_set(
                        model,
                        locator,
                        photos,
                        lms,
                        crops,
                        kind,
                        e / 255,
                        dom,
                        cfg.pgd_steps,
                        spec.seed,
                        reference=gallery,
                        det_score=det,
                    ),
                )
        name = f"impersonation@8/{dom}"
        sets[name] = cache.get(
            f"{split}_{name}",
            lambda dom=dom: attack_set(
                model,
                locator,
                photos,
                lms,
                crops,
                "pgd",
                8 / 255,
                dom,
                cfg.pgd_steps,
                spec.seed,
                target=target,
                det_score=det,
            ),
        )
    return sets


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


def pool_sample(root: str | Path, n: int, rng: np.random.Generator) -> list[tuple[Path, str]]:
    """Up to 3 images each of randomly ordered identities of an aligned pool tree, ``n`` in all, so
    the statistics span many people."""
    people = sorted(p for p in Path(root).iterdir() if p.is_dir())
    pool: list[tuple[Path, str]] = []
    for i in rng.permutation(len(people)):
        pool += [(f, people[i].name) for f in sorted(people[i].glob("*.jpg"))[:3]]
        if len(pool) >= n:
            break
    return pool[:n]
