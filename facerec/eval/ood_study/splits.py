"""The OOD study's inputs on the project's protocol, built once and cached.

Shared (through :mod:`.driver`) by ``facerec fit-ood``, which fits and reports the shipped
detector, and ``benchmarks/ood_eval.py``, which compares variants, so both see exactly the same
inputs:

- validation = LFW fold-5 people, CIFAR first half, even-numbered scikit-image photos and the
  first 50 non-face patches; test = LFW-H2 people (folds 6-10), CIFAR second half, the odd
  photos and the last 50 patches. Nothing of the test split is used to fit or tune anything;
- every set is made of aligned crops from ``families.ServiceLocator`` (the service's own face
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facerec.eval.ood_study import families as ev
from facerec.eval.ood_study.options import EvalConfig


def family(name: str) -> str:
    """'fgsm@4/photo' -> 'fgsm'; 'adaptive@4/crop' -> 'adaptive'; 'cifar' -> 'cifar'."""
    return name.split("@")[0].split("/")[0]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
        contract = locator.pipeline.contract  # the model's crop: the warp cuts what the service cuts
        adv = ev.attack_photos(
            model, photos, lms, kind, eps, steps, target, detector_score, weight, seed, reference=reference,
            alignment=contract.alignment, size=contract.input_size,
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

    if not cfg.domains:  # no attacks (e.g. no torch weights to take gradients with)
        return sets
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
