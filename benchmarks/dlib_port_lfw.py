"""Can facerec serve dlib's ResNet through the torch port? LFW validation pairs, two pipelines.

    python benchmarks/dlib_port_lfw.py [--data ../shared/data] [--pairs 300] [--budget-s 100]

1. The chip template. dlib's 150 x 150 chip (padding 0.25) is a similarity transform of the photo
   fixed by its 5-point shape predictor (eye corners, nose base); facerec's MTCNN gives other
   points (eye centres, nose tip, mouth corners). On the bundled LFW sample (tests/data, people of
   the training folds 1-4 only) each face's MTCNN points are mapped into dlib's chip with dlib's own
   transform (``dlib_chip_matrix``, checked against ``dlib.get_face_chip`` pixel by pixel), and
   their mean is the MTCNN template of dlib's chip. Also reported: the similarity taking facerec's
   112 x 112 ArcFace frame to that chip.
2. Embeddings of every image of ``--pairs`` LFW fold-5 (validation) pairs, every other pair of
   ``pairs.txt`` fold 5 (half genuine, half impostor):
   (a) dlib's own pipeline (``DlibTeacher``: HOG box, facerec's box where HOG finds none, 5-point
       shape, dlib's chip, dlib's network), and the port on that same chip;
   (b) the port on a chip cut from the ORIGINAL photo with facerec's MTCNN landmarks (largest
       face, padded retry) mapped onto the template of step 1 (``cv2.warpAffine``, bilinear).
   Work is cached (runs/dlib_port_lfw_cache.npz, ignored by git) and stops after ``--budget-s``
   seconds, so the run can be resumed in short steps; when every image is done:
3. accuracy: 10-fold stratified cross-validated accuracy on cosine scores (the house rule), and
   the accuracy at dlib's fixed Euclidean threshold 0.6 on the raw descriptors (nothing fitted).
   Written to benchmarks/results/dlib_port_lfw.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from facerec.data import protocol  # noqa: E402
from facerec.data.align import ARCFACE_TEMPLATE, umeyama  # noqa: E402
from facerec.data.datasets import read_rgb  # noqa: E402
from facerec.data.detect import detect_faces  # noqa: E402
from facerec.data.verification import lfw_image_path  # noqa: E402
from facerec.eval.verification import kfold_accuracy  # noqa: E402
from facerec.teachers.base import default_detector  # noqa: E402
from facerec.teachers.dlib_port import CHIP_SIZE, dlib_chip_matrix, embed_chips, load_dlib_resnet  # noqa: E402
from facerec.teachers.dlib_teacher import WEIGHTS, DlibTeacher, default_models_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SAMPLE = REPO / "tests" / "data" / "lfw_sample"


def warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return cv2.warpAffine(image, matrix, (CHIP_SIZE, CHIP_SIZE), flags=cv2.INTER_LINEAR, borderValue=0.0)


def mtcnn_points(detector, image: np.ndarray) -> np.ndarray | None:
    faces = detect_faces(detector, image, policy="largest")
    return np.asarray(faces[0].landmarks, np.float64) if faces else None


def fit_template(teacher: DlibTeacher, detector) -> dict:
    import dlib

    points, pixel_err, skipped = [], [], 0
    for path in sorted(SAMPLE.glob("*/*.jpg")):
        image = np.ascontiguousarray(read_rgb(path))
        box = teacher._hog(image, teacher.upsample)
        lm = mtcnn_points(detector, image)
        if not len(box) or lm is None:
            skipped += 1
            continue
        shape = teacher._shape(image, max(box, key=lambda r: r.area()))
        parts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float64)
        matrix = dlib_chip_matrix(parts)
        ours = warp(image, matrix).astype(np.float64)
        theirs = np.asarray(dlib.get_face_chip(image, shape, CHIP_SIZE, 0.25), np.float64)
        pixel_err.append(np.abs(ours - theirs).mean())
        points.append(lm @ matrix[:, :2].T + matrix[:, 2])
    points = np.stack(points)
    template = points.mean(axis=0)
    arc = umeyama(ARCFACE_TEMPLATE, template)
    spread = np.sqrt(((points - template) ** 2).sum(axis=2)).mean(axis=0)
    fitted = ARCFACE_TEMPLATE @ arc[:2, :2].T + arc[:2, 2]
    return {
        "faces": len(points), "skipped": skipped,
        "mtcnn_template_150": np.round(template, 4).tolist(),
        "per_point_spread_px": np.round(spread, 2).tolist(),
        "our_warp_vs_dlib_get_face_chip_mean_abs_px": round(float(np.mean(pixel_err)), 3),
        "arcface112_to_chip150": {
            "matrix": np.round(arc[:2], 5).tolist(),
            "scale": round(float(np.sqrt(abs(np.linalg.det(arc[:2, :2])))), 5),
            "rotation_deg": round(float(np.degrees(np.arctan2(arc[1, 0], arc[0, 0]))), 3),
            "rms_residual_px": round(float(np.sqrt(((fitted - template) ** 2).sum(axis=1).mean())), 3),
        },
    }


def pair_images(pairs) -> list[str]:
    keys = {f"{p.name1}/{p.index1}" for p in pairs} | {f"{p.name2}/{p.index2}" for p in pairs}
    return sorted(keys)


def embed_image(key: str, root: Path, teacher, detector, port, template) -> dict:
    name, index = key.split("/")
    image = np.ascontiguousarray(read_rgb(lfw_image_path(root / protocol.LFW_IMAGES, name, int(index))))
    out = {"dlib": np.full(128, np.nan), "port_dlib_chip": np.full(128, np.nan),
           "port_mtcnn": np.full(128, np.nan), "hog": 0.0}
    hog_before = teacher.stats["hog"]
    box = teacher.face_box(image)
    out["hog"] = float(teacher.stats["hog"] > hog_before)
    if box is not None:
        import dlib

        chip = np.asarray(dlib.get_face_chip(image, teacher._shape(image, box), CHIP_SIZE, 0.25))
        out["dlib"] = np.asarray(teacher._net.compute_face_descriptor(chip))
        out["port_dlib_chip"] = embed_chips(port, chip)[0]
    lm = mtcnn_points(detector, image)
    if lm is not None:
        out["port_mtcnn"] = embed_chips(port, warp(image, umeyama(lm, template)[:2]))[0]
    return out


def load_cache(path: Path) -> dict:
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as z:
        keys = list(z["keys"])
        return {k: {f: z[f][i] for f in ("dlib", "port_dlib_chip", "port_mtcnn", "hog")} for i, k in enumerate(keys)}


def save_cache(path: Path, cache: dict) -> None:
    keys = sorted(cache)
    arrays = {f: np.stack([cache[k][f] for k in keys]) for f in ("dlib", "port_dlib_chip", "port_mtcnn", "hog")}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, keys=np.array(keys), **arrays)
    os.replace(tmp, path)


def scores(cache: dict, pairs, field: str) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and raw Euclidean distance per pair; a missing face scores -1 / +inf (a rejection)."""
    a = np.stack([cache[f"{p.name1}/{p.index1}"][field] for p in pairs])
    b = np.stack([cache[f"{p.name2}/{p.index2}"][field] for p in pairs])
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    dist = np.linalg.norm(a - b, axis=1)
    return np.nan_to_num(cos, nan=-1.0), np.nan_to_num(dist, nan=np.inf)


def report(cache: dict, pairs, template_info: dict, args, seconds: float) -> dict:
    labels = np.array([p.same for p in pairs])
    rows = {}
    for field, what in (("dlib", "(a) dlib's own pipeline (dlib-bin)"),
                        ("port_dlib_chip", "(a') the port on dlib's chip"),
                        ("port_mtcnn", "(b) the port on MTCNN-landmark chips of the original photo")):
        cos, dist = scores(cache, pairs, field)
        kf = kfold_accuracy(cos, labels, 10)
        missing = sum(np.isnan(cache[k][field]).any() for k in pair_images(pairs))
        rows[field] = {"pipeline": what, "kfold10_accuracy": round(float(kf.mean), 4),
                       "kfold10_std": round(float(kf.std), 4),
                       "accuracy_at_dlib_threshold_0.6": round(float(np.mean((dist < 0.6) == labels)), 4),
                       "images_without_face": int(missing)}
    keys = pair_images(pairs)
    d = np.stack([cache[k]["dlib"] for k in keys])
    p = np.stack([cache[k]["port_dlib_chip"] for k in keys])
    ok = ~np.isnan(d).any(axis=1)
    m = np.stack([cache[k]["port_mtcnn"] for k in keys])
    both = ok & ~np.isnan(m).any(axis=1)
    cos_dm = np.sum(d[both] * m[both], 1) / np.linalg.norm(d[both], axis=1) / np.linalg.norm(m[both], axis=1)
    return {
        "command": " ".join(["python benchmarks/dlib_port_lfw.py", *sys.argv[1:]]),
        "pairs": f"{len(pairs)} pairs of LFW fold 5 (every other pair; {int(labels.sum())} genuine)",
        "images": len(keys), "hog_found": int(sum(cache[k]["hog"] for k in keys)),
        "parity_port_vs_dlib_same_chip": {
            "images": int(ok.sum()), "max_abs_diff": float(np.abs(d[ok] - p[ok]).max()),
            "min_cosine": float((np.sum(d[ok] * p[ok], 1) / np.linalg.norm(d[ok], axis=1)
                                 / np.linalg.norm(p[ok], axis=1)).min())},
        "dlib_vs_mtcnn_chip_descriptor_cosine": {"median": round(float(np.median(cos_dm)), 4),
                                                 "p05": round(float(np.percentile(cos_dm, 5)), 4)},
        "accuracy": rows, "template": template_info, "seconds_last_step": round(seconds, 1),
    }


def write_md(result: dict, path: Path) -> None:
    lines = ["# dlib's ResNet: dlib-bin vs the torch port (facerec/teachers/dlib_port.py)", "",
             f"`{result['command']}` (resumable: run until every image is cached)", "",
             f"{result['pairs']}; {result['images']} images "
             f"(HOG found {result['hog_found']}, facerec's box for the rest).", "",
             "| pipeline | 10-fold acc. (cosine) | acc. at dlib's 0.6 | images without a face |",
             "|---|---|---|---|"]
    for row in result["accuracy"].values():
        lines.append(f"| {row['pipeline']} | {100 * row['kfold10_accuracy']:.2f}% ± {100 * row['kfold10_std']:.2f} "
                     f"| {100 * row['accuracy_at_dlib_threshold_0.6']:.2f}% | {row['images_without_face']} |")
    par, t = result["parity_port_vs_dlib_same_chip"], result["template"]
    lines += ["", f"Port vs dlib on the same {par['images']} chips: max |diff| {par['max_abs_diff']:.2e}, "
              f"min cosine {par['min_cosine']:.8f}.",
              f"Descriptor cosine, dlib chip vs MTCNN chip of the same photo: median "
              f"{result['dlib_vs_mtcnn_chip_descriptor_cosine']['median']}, 5th percentile "
              f"{result['dlib_vs_mtcnn_chip_descriptor_cosine']['p05']}.", "",
              f"MTCNN template of dlib's 150 px chip (fitted on {t['faces']} training-fold faces of "
              f"tests/data/lfw_sample): `{t['mtcnn_template_150']}`; mean spread per point "
              f"{t['per_point_spread_px']} px; our warp vs dlib.get_face_chip: "
              f"{t['our_warp_vs_dlib_get_face_chip_mean_abs_px']} grey levels mean abs.",
              f"ArcFace 112 frame -> dlib chip 150: scale {t['arcface112_to_chip150']['scale']}, rotation "
              f"{t['arcface112_to_chip150']['rotation_deg']} deg, matrix {t['arcface112_to_chip150']['matrix']}, "
              f"rms residual {t['arcface112_to_chip150']['rms_residual_px']} px.", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", help="shared data root (default $FACEREC_DATA or ../shared/data)")
    parser.add_argument("--pairs", type=int, default=300, help="fold-5 pairs, every other one (max 300)")
    parser.add_argument("--budget-s", type=float, default=100.0, help="stop embedding after this long; rerun to resume")
    args = parser.parse_args()
    if not protocol.has_lfw(args.data):
        raise SystemExit("dlib_port_lfw: LFW (pairs.txt, people.txt) not found; set --data or FACEREC_DATA")
    start = time.perf_counter()
    root = protocol.data_root(args.data)
    pairs = protocol.validation_pairs(args.data)[::2][: args.pairs]
    teacher, detector = DlibTeacher(), default_detector()
    port = load_dlib_resnet(default_models_dir() / WEIGHTS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    template_path = RESULTS / "dlib_port_lfw_template.json"
    if not template_path.is_file():
        template_path.write_text(json.dumps(fit_template(teacher, detector), indent=1))
    template_info = json.loads(template_path.read_text())
    template = np.asarray(template_info["mtcnn_template_150"])
    cache_path = REPO / "runs" / "dlib_port_lfw_cache.npz"
    cache_path.parent.mkdir(exist_ok=True)
    cache = load_cache(cache_path)
    todo = [k for k in pair_images(pairs) if k not in cache]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    for key in tqdm(todo, desc="images", unit="img", mininterval=10):
        if time.perf_counter() - start > args.budget_s:
            break
        cache[key] = embed_image(key, root, teacher, detector, port, template)
    save_cache(cache_path, cache)
    left = sum(k not in cache for k in pair_images(pairs))
    if left:
        print(f"{left} images left; run again to continue")
        return 0
    result = report(cache, pairs, template_info, args, time.perf_counter() - start)
    (RESULTS / "dlib_port_lfw.json").write_text(json.dumps(result, indent=1))
    write_md(result, RESULTS / "dlib_port_lfw.md")
    print((RESULTS / "dlib_port_lfw.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
