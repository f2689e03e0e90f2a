"""The shipped threshold's answer through a real service, on LFW-H2 pairs (final reports only).

    python benchmarks/service_lfw_h2.py [--model models/default] [--data ../shared/data] [--pairs 500]

Starts ``python -m service`` on a free loopback port with the model (its calibrated threshold, the
default detector, every setting at its default: what a new user runs) and posts each pair's two
original LFW photos to ``POST /v1/verify``, as a user would. ``--pairs`` pairs are taken evenly from
LFW-H2's five folds (6-10), half genuine and half impostor in each, the first of each kind in the
file. Reported: how often ``match`` is right, the genuine pairs accepted (TAR) and the impostors
accepted (FAR) at the shipped threshold, the 10-fold accuracy of the returned similarities, and the
pairs the service refused (no face: 422). LFW-H2 is the test split: run this once per shipped model,
never to choose anything. Writes ``benchmarks/results/service_lfw_h2_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pick_pairs(pairs, n: int):
    """``n`` pairs, the same number from each fold, half genuine and half impostor in each fold."""
    folds = sorted({p.fold for p in pairs})
    per_fold = n // len(folds)
    chosen = []
    for fold in folds:
        of = [p for p in pairs if p.fold == fold]
        chosen += [p for p in of if p.same][: per_fold // 2] + [p for p in of if not p.same][: per_fold - per_fold // 2]
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/default", help="model folder (calibrated)")
    ap.add_argument("--data", default=None, help="shared data root (default FACEREC_DATA or ../shared/data)")
    ap.add_argument("--pairs", type=int, default=500, help="LFW-H2 pairs, evenly over the 5 folds (default 500)")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    from facerec.data.protocol import LFW_IMAGES, data_root, lfw_h2_pairs
    from facerec.eval.verification import kfold_accuracy
    from service.testing import service_process

    command = "python benchmarks/service_lfw_h2.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    root = data_root(args.data)
    pairs = pick_pairs(lfw_h2_pairs(root), args.pairs)
    key = "lfw-h2-check-0123456789abcdef"
    env = {"FACEREC_MODEL": str(Path(args.model).resolve()), "FACEREC_API_KEYS": key}
    t0 = time.time()
    rows, refused = [], []
    with tempfile.TemporaryDirectory() as tmp, \
            service_process(env, Path(tmp) / "service.log", ready_timeout_s=300, client_timeout_s=120) as (_, client, _):
        info = client.get("/v1/models", headers={"X-API-Key": key}).json()
        for pair in tqdm(pairs, desc="LFW-H2 pairs", unit="pair"):
            pa, pb = pair.paths(root / LFW_IMAGES)
            r = client.post("/v1/verify", files={"image_a": pa.read_bytes(), "image_b": pb.read_bytes()},
                            headers={"X-API-Key": key})
            if r.status_code == 422:
                refused.append({"pair": [pa.name, pb.name], "error": r.json().get("error", {}).get("code")})
                continue
            r.raise_for_status()
            body = r.json()
            rows.append((pair.same, body["similarity"], body["match"], body.get("threshold")))
    labels = np.array([r[0] for r in rows], bool)
    sims = np.array([r[1] for r in rows], np.float64)
    match = np.array([r[2] for r in rows], bool)
    thresholds = sorted({r[3] for r in rows if r[3] is not None})
    report = {
        "command": command, "model": str(args.model), "models_endpoint": info,
        "pairs_sent": len(pairs), "answered": len(rows), "refused_no_face": refused,
        "genuine": int(labels.sum()), "impostor": int((~labels).sum()), "thresholds_used": thresholds,
        "match_right": float((match == labels).mean()),
        "tar_at_shipped_threshold": float(match[labels].mean()),
        "far_at_shipped_threshold": float(match[~labels].mean()),
        "kfold10_accuracy_of_similarities": float(kfold_accuracy(sims, labels, 10).mean),
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"service_lfw_h2_{args.tag}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(rows)} LFW-H2 pairs answered ({len(refused)} refused: no face) at threshold {thresholds}: "
          f"match right on {100 * report['match_right']:.2f}%, TAR {100 * report['tar_at_shipped_threshold']:.2f}%, "
          f"FAR {100 * report['far_at_shipped_threshold']:.2f}%, 10-fold {100 * report['kfold10_accuracy_of_similarities']:.2f}%"
          f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
