"""``facerec clean``: find wrong-person images of an identity-folder dataset with a teacher.

Applies the rule of :mod:`facerec.teachers.clean` (written before it is applied: an image less
like its own person than all but one in a thousand pairs of strangers) to the teacher embeddings
that ``facerec teach`` cached for the dataset, and writes into ``--out``:

- ``exclude.txt``: the flagged images, one dataset-relative path a line (``data.exclude`` of a
  training config leaves them out; nothing is deleted);
- ``flagged.csv``: path, identity, cosine to its own identity, the nearest other identity and its
  cosine, worst first;
- ``summary.json``: the rule in words, the threshold, how many images were judged and flagged;
- ``contact_sheet.png``: the worst flagged images (red frame) beside typical images of their
  identity, for a person to check.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="the identity-folder tree the cache was made for")
    parser.add_argument("--cache", required=True, help="its teacher cache (`facerec teach ... --data DIR`)")
    parser.add_argument("--out", required=True, help="folder for exclude.txt, flagged.csv, summary.json, the sheet")
    parser.add_argument("--far", type=float, default=1e-3,
                        help="tau is the (1 - far) quantile of random different-identity cosines (1e-3)")
    parser.add_argument("--min-images", type=int, default=3, help="identities with fewer are not judged (3)")
    parser.add_argument("--pairs", type=int, default=200_000, help="random different-identity pairs for tau")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random impostor pairs")
    parser.add_argument("--sheet-rows", type=int, default=24, help="flagged images on the contact sheet")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from facerec.data.folders import folder_samples
    from facerec.data.image_io import load_image
    from facerec.teachers.cache import TeacherCache, TeacherCacheError, file_hash
    from facerec.teachers.clean import CleaningRule, contact_sheet, find_wrong_person_images

    root = Path(args.data)
    if not root.is_dir():
        raise SystemExit(f"facerec clean: {root} is not a folder")
    try:
        rule = CleaningRule(far=args.far, min_images=args.min_images, pairs=args.pairs, seed=args.seed)
        cache = TeacherCache(args.cache)
    except (ValueError, TeacherCacheError) as err:
        raise SystemExit(f"facerec clean: {err}") from None
    entries = [(s.path, s.identity) for s in folder_samples(root)]  # the paths data.exclude compares
    if not entries:
        raise SystemExit(f"facerec clean: no images under {root}")
    names = sorted({ident for _, ident in entries})
    label_of = {n: i for i, n in enumerate(names)}
    labels = np.array([label_of[ident] for _, ident in entries])
    keys = [file_hash(root / rel) for rel, _ in tqdm(entries, desc="hashing", unit="img", disable=args.no_progress)]
    emb, found = cache.lookup(keys)
    emb = np.where(found[:, None], emb, np.nan)
    try:
        result = find_wrong_person_images(emb, labels, rule)
    except ValueError as err:
        raise SystemExit(f"facerec clean: {err}") from None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    order = np.flatnonzero(result.flagged)
    order = order[np.argsort(result.cos_own[order])]
    (out / "exclude.txt").write_text("".join(f"{entries[i][0]}\n" for i in order))
    with open(out / "flagged.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "identity", "cos_own", "nearest_other_identity", "cos_other"])
        for i in order:
            w.writerow([entries[i][0], entries[i][1], f"{result.cos_own[i]:.4f}",
                        names[result.nearest_other[i]], f"{result.cos_other[i]:.4f}"])
    summary = {
        "rule": rule.text(), "threshold": result.threshold, "impostor_pairs": result.impostor_pairs,
        "images": len(entries), "with_teacher_embedding": int(found.sum()), "judged": int(result.judged.sum()),
        "flagged": int(result.flagged.sum()), "identities": len(names),
        "identities_with_flagged_images": len({entries[i][1] for i in order}),
        "teacher_id": cache.teacher_id, "data": str(root), "cache": str(args.cache),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if len(order):
        rows = []
        for i in order[: args.sheet_rows]:
            same = np.flatnonzero((labels == labels[i]) & result.judged & ~result.flagged)
            typical = same[np.argsort(-result.cos_own[same])][:4]
            caption = (f"{entries[i][0]}  own {result.cos_own[i]:.3f} < {result.threshold:.3f}; "
                       f"nearest {names[result.nearest_other[i]]} {result.cos_other[i]:.3f}")
            rows.append((load_image(root / entries[i][0]), caption, [load_image(root / entries[j][0]) for j in typical]))
        import cv2

        cv2.imwrite(str(out / "contact_sheet.png"), cv2.cvtColor(contact_sheet(rows), cv2.COLOR_RGB2BGR))
    print(f"rule: {rule.text()}")
    print(f"tau = {result.threshold:.4f}; {summary['judged']:,} of {len(entries):,} images judged "
          f"({summary['with_teacher_embedding']:,} with a teacher embedding); {summary['flagged']:,} flagged "
          f"in {summary['identities_with_flagged_images']:,} identities -> {out / 'exclude.txt'}")
    return 0
