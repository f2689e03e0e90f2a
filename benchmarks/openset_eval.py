"""Open-set identification on LFW-H2 people: DIR at FPIR, rank-1, and what the enrollment gate does.

    OMP_NUM_THREADS=1 python benchmarks/openset_eval.py [--model models/default] [--cache FILE]

Protocol (LFW-H2 = the people of View-2 folds 6-10; the thresholds the service uses were calibrated
on fold 5 by `facerec calibrate-openset`, never here):
- every image goes through the service's pipeline (MTCNN, alignment, the fp32 ONNX model, quality,
  OOD): one embedding per image, no flip; images without a face are left out (the service answers
  them with 422 no_face);
- a random half of the people is enrolled with one image each; probes are their other images
  (mated) and every image of the other half (non-mated); 5 random splits, mean and spread;
- "no gate": each enrolled person's first image (by LFW index); "gate": the first of the person's
  images that passes the default enrollment policy (as a user would offer another photo) including
  the duplicate check against the persons enrolled before, at the calibrated threshold; a person
  none of whose images passes is not enrolled (failure to enroll), and his images become non-mated;
- DIR at FPIR uses the threshold at which that FPIR holds on these non-mated searches (the metric);
  "at the calibrated threshold" uses the service's threshold from openset.json for this gallery
  size (the FPIR a deployment would actually see);
- ``--index hnsw``: every search through the approximate index (faiss HNSW, exact re-ranking) the
  SQLite store uses for large galleries, instead of exact search: the same protocol then shows
  whether the index changes DIR at FPIR (compare with the exact run).
Writes benchmarks/results/openset_eval.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from facerec.data import protocol
from facerec.gallery import (
    EnrollmentPolicy,
    OpenSetCalibration,
    Reason,
    assess,
    identification_metrics,
)
from facerec.gallery.ann_policy import IndexPolicy
from facerec.gallery.measure import Measured, OfflineModel, measure
from facerec.gallery.openset import OPENSET_FILE, approximate_top1

FPIRS = (0.1, 0.01)
MODES = {
    "no_gate": "first image, no gate",
    "gate": "first image passing the gate",
    "same_people": "first image, only the persons the gate enrolls",
}


def gate_reasons(m: Measured, i: int, policy: EnrollmentPolicy, model: OfflineModel) -> list[str]:
    if not m.found[i]:
        return [Reason.MULTIPLE_FACES.value if m.error[i] == "too_many_faces" else Reason.NO_FACE.value]
    ev = m.evidence(i, model.quality_score, model.ood_threshold)
    return [r.reason.value for r in assess(policy, ev)]


def build_gallery(
    m: Measured,
    rows_of: dict,
    enrolled: list[str],
    gate: bool,
    policy: EnrollmentPolicy,
    model: OfflineModel,
    calibration: OpenSetCalibration,
    reasons: dict,
) -> dict:
    """{person: enrolled row}; with the gate, the first passing image (duplicates checked)."""
    gallery: dict[str, int] = {}
    vecs: list[np.ndarray] = []
    for name in enrolled:
        for i in rows_of[name]:
            if not m.found[i]:
                continue
            if gate:
                if reasons[i]:
                    continue
                if vecs:
                    t = calibration.lookup(calibration.default_fpir, len(vecs)).threshold
                    if float((np.stack(vecs) @ m.embedding[i]).max()) >= t:
                        continue  # duplicate_of_other_person
            gallery[name] = i
            vecs.append(m.embedding[i])
            break
    return gallery


def run_split(m, names, rows_of, people, seed, mode, policy, model, calibration, reasons, index="exact") -> dict:
    """mode: "no_gate" | "gate" | "same_people" (first images of the persons the gate enrolls)."""
    rng = np.random.default_rng(seed)
    enrolled = sorted(rng.permutation(people)[: len(people) // 2].tolist())
    rng.shuffle(enrolled)  # enrollment order (matters for the duplicate check)
    gallery = build_gallery(m, rows_of, enrolled, mode == "gate", policy, model, calibration, reasons)
    if mode == "same_people":
        gated = build_gallery(m, rows_of, enrolled, True, policy, model, calibration, reasons)
        gallery = {name: row for name, row in gallery.items() if name in gated}
    g_rows = np.array(list(gallery.values()))
    in_gallery = set(g_rows.tolist())
    probes = np.array([i for i in np.flatnonzero(m.found) if i not in in_gallery])
    points = {f: calibration.lookup(f, len(g_rows)) for f in FPIRS}
    thresholds = {f"calibrated_fpir_{f:g}": p.threshold for f, p in points.items()}
    top1 = None
    if index == "hnsw":
        top1 = approximate_top1(m.embedding[g_rows], names[g_rows], IndexPolicy(kind="approximate"))
    out = identification_metrics(
        m.embedding[g_rows], names[g_rows], m.embedding[probes], names[probes], FPIRS, thresholds, top1
    )
    out["enrolled_people"] = len(enrolled)
    out["failure_to_enroll"] = len(enrolled) - len(gallery)
    out["calibration_used"] = {
        f"{f:g}": {
            "size": p.calibrated_gallery_size,
            "method": p.calibration_method,
            "beyond_calibration": p.beyond_calibration,
        }
        for f, p in points.items()
    }
    return out


def summarise(runs: list[dict]) -> dict:
    def stat(values):
        v = np.array([x for x in values if x is not None], float)
        return {"mean": float(v.mean()), "std": float(v.std())} if len(v) else None

    s = {
        k: stat([r[k] for r in runs])
        for k in ("rank1", "gallery_persons", "mated_searches", "nonmated_searches", "failure_to_enroll")
    }
    s["dir_at_fpir"] = {f: stat([r["dir_at_fpir"][f]["dir"] for r in runs]) for f in runs[0]["dir_at_fpir"]}
    s["at_calibrated_threshold"] = {
        k: {
            "threshold": stat([r["at_threshold"][k]["threshold"] for r in runs]),
            "fpir": stat([r["at_threshold"][k]["fpir"] for r in runs]),
            "dir": stat([r["at_threshold"][k]["dir"] for r in runs]),
        }
        for k in runs[0]["at_threshold"]
    }
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--data", default=None, help="shared data root (default FACEREC_DATA or ../shared/data)")
    ap.add_argument("--cache", default=None, help=".npz of the measured LFW-H2 images (made when absent)")
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--index", choices=["exact", "hnsw"], default="exact",
                    help="search exactly, or through the approximate index (faiss HNSW) large galleries use")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    model = OfflineModel(args.model, threads=args.threads)
    calibration = OpenSetCalibration.load(Path(args.model) / OPENSET_FILE)
    people = protocol.test_people(args.data)
    items = protocol.lfw_images_of(people, args.data)
    keys = [f"{name}/{path.name}" for path, name in items]
    cache = Path(args.cache) if args.cache else None
    t0 = time.time()
    if cache is not None and cache.exists():
        m = Measured.load(cache)
        assert m.keys == keys, f"{cache} holds other images"
    else:
        m = measure(model, [p for p, _ in items], keys)
        if cache is not None:
            m.save(cache)
    names = np.array([n for _, n in items])
    rows_of: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        rows_of.setdefault(n, []).append(i)
    policy = EnrollmentPolicy()
    reasons = {i: gate_reasons(m, i, policy, model) for i in range(len(m.keys))}
    refused = Counter(r for rs in reasons.values() for r in set(rs))
    report = {
        "model": args.model,
        "contract_id": model.contract.contract_id,
        "openset_calibration": calibration.calibrated_on,
        "policy": policy.model_dump(),
        "images": len(items),
        "people": len(people),
        "faces_found": int(m.found.sum()),
        "gate_on_all_images": {
            "refused": int(sum(bool(r) for r in reasons.values())),
            "by_reason": dict(refused.most_common()),
        },
        "splits": args.splits,
        "index": args.index,
        "seconds_measuring": round(time.time() - t0, 1),
    }
    for mode in MODES:
        runs = [
            run_split(m, names, rows_of, people, seed, mode, policy, model, calibration, reasons, args.index)
            for seed in range(args.splits)
        ]
        report[mode] = {"summary": summarise(runs), "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "openset_eval.json").write_text(json.dumps(report, indent=1))
    md = render(report)
    (out / "openset_eval.md").write_text(md)
    print(md)


def _pm(s, scale=100.0, digits=2) -> str:
    return "n/a" if s is None else f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def render(r: dict) -> str:
    lines = [
        "# Open-set identification on LFW-H2 people",
        "",
        (
            f"Model `{r['model']}` (contract {r['contract_id']}); thresholds from openset.json: "
            f"{r['openset_calibration']}."
        ),
        (
            f"{r['images']:,} images of {r['people']:,} people, faces found in {r['faces_found']:,}; "
            f"half the people enrolled with one image, {r['splits']} random splits (mean ± std); "
            f"search: {'approximate index (faiss HNSW, exact re-ranking)' if r.get('index') == 'hnsw' else 'exact'}."
        ),
        "",
        (
            "| enrollment | enrolled persons | failure to enroll | mated / non-mated searches | rank-1 | "
            "DIR @ FPIR 1e-1 | DIR @ FPIR 1e-2 |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in MODES.items():
        s = r[key]["summary"]
        lines.append(
            f"| {label} | {s['gallery_persons']['mean']:.0f} | {s['failure_to_enroll']['mean']:.0f} | "
            f"{s['mated_searches']['mean']:.0f} / {s['nonmated_searches']['mean']:.0f} | "
            f"{_pm(s['rank1'])}% | "
            f"{_pm(s['dir_at_fpir']['0.1'])}% | {_pm(s['dir_at_fpir']['0.01'])}% |"
        )
    lines += [
        "",
        "At the service's calibrated thresholds (validation split, for this gallery size):",
        "",
        (
            "| enrollment | target FPIR | threshold | calibrated for size (method) | FPIR reached on LFW-H2 "
            "| DIR |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for key, label in MODES.items():
        used = r[key]["runs"][0]["calibration_used"]
        for name, s in r[key]["summary"]["at_calibrated_threshold"].items():
            u = used[name.rsplit("_", 1)[1]]
            size = f"{u['size']:,} ({u['method']}{', gallery beyond it' if u['beyond_calibration'] else ''})"
            lines.append(
                f"| {label} | {name.rsplit('_', 1)[1]} | {s['threshold']['mean']:.4f} | {size} | "
                f"{_pm(s['fpir'], digits=2)}% | {_pm(s['dir'])}% |"
            )
    g = r["gate_on_all_images"]
    lines += [
        "",
        f"The default gate applied to every LFW-H2 image refuses {g['refused']:,} of {r['images']:,} "
        "(an image can have several reasons): "
        + ", ".join(f"`{k}` {v:,}" for k, v in g["by_reason"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
