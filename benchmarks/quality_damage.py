"""Does the quality score fall when a face is damaged? Clean against damaged copies of validation faces.

    python benchmarks/quality_damage.py [--model models/default] [--data ../shared/data]
        [--limit 400] [--tag v11]

A quality score is only useful if a damaged copy of a face scores below the face itself. For each
image of the validation people (LFW View-2 fold 5, the protocol's split for every choice; a fixed
every-k-th subset of ``--limit`` images), the model's raw quality output on the clean face is
compared with its output on damaged copies:

- ``recipe/crop``: the issue's check (``facerec.data.degrade.DamageRecipe``: Gaussian blur
  sigma 3, shrink to 60 px, JPEG quality 10) applied to the aligned 112x112 crop that the pipeline
  cut from the clean photo: what the model sees, detection taken out of the question;
- ``recipe/photo``: the same damage applied to the whole 250x250 photo (scaled to it, so the face,
  about 110 px wide, ends near 60 px), then the full pipeline (detection, alignment) as a user's
  upload would go; images whose damaged copy has no face found are counted apart;
- one kind of damage at a time on the crop (blur sigma 3, a 40 px face, JPEG 10, noise sigma 20,
  low light gain 0.25 gamma 1.5, a 30% occluder), to see which the score misses.

A model whose crop is not the 112 px ArcFace crop (dlib's chip, the 192 px canvas of model 2.1) gets
the same damage relative to the face: strengths are scaled by the crop pixels one ArcFace pixel spans.

Reported per check: how often the clean face scores strictly higher (the target: >= 95% for the
recipe), ties, and the median drop. Writes benchmarks/results/quality_damage_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from facerec.bundle import find_graph
from facerec.contract import ARCFACE_TEMPLATE_112
from facerec.data import degrade as D
from facerec.data import protocol
from facerec.data.image_io import load_image
from facerec.runtime import FacePipeline, NoFaceError, load_backend

# One kind of damage at a time, at a strength a person would call clearly damaged. Strengths are for
# a 112 px ArcFace crop; ``k`` is how many of the model's crop pixels one ArcFace pixel spans (1 for
# ArcFace-aligned models; 1.51 for dlib's chip and its canvas), so every model's crop gets the same
# damage relative to the face.
SINGLE = {
    "blur_s3": lambda x, rng, k: D.gaussian_blur(x, 3.0 * k),
    "face_40px": lambda x, rng, k: D.resample(x, round(40 * x.shape[0] / (112 * k))),
    "jpeg_q10": lambda x, rng, k: D.jpeg(x, 10),
    "noise_s20": lambda x, rng, k: D.gaussian_noise(x, 20.0, rng),
    "low_light": lambda x, rng, k: D.low_light(x, 0.25, 1.5),
    "occlusion_30": lambda x, rng, k: D.occlude(x, 0.3, rng),
}


def arcface_pixel_scale(alignment: str, size: int) -> float:
    """Crop pixels per ArcFace-112 pixel: the scale of the similarity between the two templates."""
    from facerec.data.align import alignment_template, umeyama

    if alignment == ARCFACE_TEMPLATE_112:
        return size / 112.0
    m = umeyama(alignment_template(ARCFACE_TEMPLATE_112, 112), alignment_template(alignment, size))
    return float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))


def summarise(clean: np.ndarray, damaged: np.ndarray) -> dict:
    diff = clean - damaged
    n = len(diff)
    return {
        "n": n,
        "clean_higher": int((diff > 0).sum()),
        "ties": int((diff == 0).sum()),
        "clean_higher_rate": float((diff > 0).mean()) if n else None,
        "median_drop": float(np.median(diff)) if n else None,
        "clean_median": float(np.median(clean)) if n else None,
        "damaged_median": float(np.median(damaged)) if n else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/default", help="export folder or .onnx")
    ap.add_argument("--data", default=None, help="shared data root (default FACEREC_DATA or ../shared/data)")
    ap.add_argument("--limit", type=int, default=400, help="validation images to use (every k-th)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random damages (noise, occluder)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    t0 = time.time()
    command = "python benchmarks/quality_damage.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    backend = load_backend(find_graph(Path(args.model)), device="cpu", threads=args.threads or None)
    if "quality" not in backend.output_names:
        raise SystemExit(f"{args.model}: the model has no quality output")
    pipeline = FacePipeline(backend, keep_crops=True)
    items = sorted(protocol.lfw_images_of(protocol.validation_people(args.data), args.data))
    step = max(1, len(items) // args.limit)
    items = items[::step][: args.limit]
    rng = np.random.default_rng(args.seed)
    contract = backend.contract
    k = arcface_pixel_scale(contract.alignment, contract.input_size)
    # On the crop, the recipe's 112 px reference is the ArcFace crop's width in this model's pixels.
    crop_recipe = D.DamageRecipe(reference_width=round(contract.input_size / k, 3))
    recipe = D.DamageRecipe()

    def quality_of(crops: list[np.ndarray]) -> np.ndarray:
        return np.asarray(backend.run(np.stack(crops))["quality"], dtype=np.float64).reshape(-1)

    rows: dict[str, list[tuple[float, float]]] = {"recipe/crop": [], "recipe/photo": []}
    rows.update({f"single/{k}": [] for k in SINGLE})
    no_face_clean = no_face_damaged = 0
    for path, _name in tqdm(items, desc="validation faces", unit="img"):
        photo = load_image(path)
        try:
            face = pipeline.process(photo).faces[0]
        except NoFaceError:
            no_face_clean += 1
            continue
        crop = face.crop
        damaged = {"recipe/crop": crop_recipe(crop)}
        damaged.update({f"single/{name}": f(crop, rng, k) for name, f in SINGLE.items()})
        names = list(damaged)
        q = quality_of([crop] + [damaged[k] for k in names])
        for i, key in enumerate(names):
            rows[key].append((q[0], q[i + 1]))
        try:
            hurt = pipeline.process(recipe(photo)).faces[0]
        except NoFaceError:
            no_face_damaged += 1
            continue
        rows["recipe/photo"].append((float(face.quality), float(hurt.quality)))

    results = {}
    for key, pairs in rows.items():
        a = np.array(pairs, dtype=np.float64).reshape(-1, 2)
        results[key] = summarise(a[:, 0], a[:, 1])
    report = {
        "command": command,
        "model": str(args.model),
        "images": len(items),
        "split": "LFW View-2 fold 5 people (validation)",
        "no_face_clean": no_face_clean,
        "no_face_after_photo_damage": no_face_damaged,
        "recipe": {"blur_sigma": recipe.blur_sigma, "shrink_to": recipe.shrink_to,
                   "jpeg_quality": recipe.jpeg_quality, "reference_width": recipe.reference_width},
        "crop": {"alignment": contract.alignment, "size": contract.input_size, "pixels_per_arcface_pixel": round(k, 4),
                 "recipe_reference_width": crop_recipe.reference_width},
        "results": results,
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_damage_{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Quality under damage: {args.model}",
        "",
        f"`{command}`; {len(items)} validation images, {no_face_clean} without a face; the damaged "
        f"photo lost its face in {no_face_damaged}. Target: clean higher in >= 95% for the recipe.",
        "",
        "| check | n | clean higher | ties | median raw drop |",
        "|---|---|---|---|---|",
    ]
    for key, r in results.items():
        rate = "–" if r["clean_higher_rate"] is None else f"{100 * r['clean_higher_rate']:.1f}%"
        drop = "–" if r["median_drop"] is None else f"{r['median_drop']:.4f}"
        lines.append(f"| {key} | {r['n']} | {rate} | {r['ties']} | {drop} |")
    (out / f"quality_damage_{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
