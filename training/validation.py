"""Validation while training: a set of verification pairs, embedded by the current model.

Never the test pairs: the protocol's validation split is LFW fold 5 (``kind: lfw_fold``); a
``.bin``, pairs over a held-out range of identities of an image folder, or unseen synthetic
identities serve the other cases. Images are decoded once and kept as uint8 in memory.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from facerec.data.datasets import EvalTransform, read_rgb
from facerec.eval.verification import (
    VerificationResult,
    cosine_scores,
    evaluate_pairs,
    stratified_folds,
    tar_at_far,
)
from training.data import SyntheticFaces, center_crop, folder_samples, select_identities


@dataclass
class PairSet:
    images: torch.Tensor  # (N, 3, 112, 112) normalised float32
    first: np.ndarray  # (P,) image index of each pair's first image
    second: np.ndarray
    same: np.ndarray  # (P,) bool
    folds: np.ndarray  # (P,) fold id
    # Pairs the k-fold accuracy uses (None: all). Over all pairs of a folder impostors outnumber
    # genuine pairs ~10:1 and "always reject" would score 90%, so accuracy takes a balanced subset
    # while TAR at FAR keeps every impostor (finer FAR resolution).
    accuracy_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.same)


def _load(paths, crop) -> torch.Tensor:
    transform = EvalTransform()
    return torch.stack([transform(center_crop(read_rgb(p), crop)) for p in paths])


def lfw_fold_files(cfg) -> list[Path]:
    """Every image of the validation people (LFW fold 5) under ``val.path``, in people.txt order."""
    from facerec.data.protocol import (
        LFW_IMAGES,
        data_root,
        lfw_images_of,
        validation_people,
    )

    root = data_root(cfg.data_root)
    image_root = Path(cfg.path) if cfg.path else root / LFW_IMAGES
    files = [image_root / name / path.name for path, name in lfw_images_of(validation_people(root), root)]
    if files and not files[0].exists() and files[0].with_suffix(".png").exists():
        files = [f.with_suffix(".png") for f in files]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"val.kind lfw_fold: {len(missing)} of {len(files)} images of the validation "
                                f"people are missing under {image_root}, e.g. {missing[0]} (val.path must be "
                                "the LFW tree, aligned with `facerec align --preset lfw` or deep-funneled)")
    return files


def _lfw_fold_pairs(cfg) -> PairSet:
    """The protocol's validation split: every image of the LFW fold-5 people.

    k-fold accuracy on the 600 listed pairs of fold 5 (stratified folds); TAR at FAR on *all* pairs
    of those images (1,872 genuine, 513,748 impostor with the full data), as ``evaluate_lfw.py``
    reports it, so FARs down to 1e-4 are supported. ``val.max_pairs`` does not apply.
    """
    from facerec.data.protocol import LFW_IMAGES, data_root, validation_pairs

    root = data_root(cfg.data_root)
    image_root = Path(cfg.path) if cfg.path else root / LFW_IMAGES
    files = lfw_fold_files(cfg)
    n = len(files)
    names = np.array([f.parent.name for f in files])
    first, second = np.triu_indices(n, k=1)
    same = names[first] == names[second]
    index = {f.with_suffix(""): i for i, f in enumerate(files)}
    listed = validation_pairs(root)
    a = np.array([index[pair.paths(image_root)[0].with_suffix("")] for pair in listed])
    b = np.array([index[pair.paths(image_root)[1].with_suffix("")] for pair in listed])
    i, j = np.minimum(a, b), np.maximum(a, b)
    position = i * n - i * (i + 1) // 2 + (j - i - 1)  # index of (i, j) in the triu_indices order
    if len(np.unique(position)) != len(position):
        raise ValueError("LFW fold 5 lists a pair twice")
    listed_same = np.array([pair.same for pair in listed])
    if not np.array_equal(same[position], listed_same):
        raise ValueError("LFW fold 5: a listed pair's label disagrees with the people's names")
    accuracy_mask = np.zeros(len(same), dtype=bool)
    accuracy_mask[position] = True
    folds = np.full(len(same), -1, dtype=np.int64)
    folds[position] = stratified_folds(listed_same, cfg.folds)
    return PairSet(_load(files, cfg.center_crop), first, second, same, folds, accuracy_mask)


def _bin_pairs(cfg) -> PairSet:
    from facerec.data.verification import load_bin

    blobs, same = load_bin(cfg.path)
    transform = EvalTransform()
    images = []
    for b in blobs:
        bgr = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
        images.append(transform(center_crop(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), cfg.center_crop)))
    n = len(same)
    return PairSet(torch.stack(images), np.arange(n) * 2, np.arange(n) * 2 + 1, same,
                   stratified_folds(same, cfg.folds))


def _all_pairs(labels: np.ndarray, max_pairs: int, seed: int = 0):
    """Every genuine pair, and impostor pairs (all, or a fixed random sample) up to ``max_pairs``."""
    pairs = np.array(list(itertools.combinations(range(len(labels)), 2)), dtype=np.int64)
    same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    genuine, impostor = pairs[same], pairs[~same]
    room = max(max_pairs - len(genuine), 1)
    if len(impostor) > room:
        pick = np.random.default_rng(seed).choice(len(impostor), room, replace=False)
        impostor = impostor[np.sort(pick)]
    chosen = np.concatenate([genuine, impostor])
    same = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]
    return chosen[:, 0], chosen[:, 1], same


def _balanced(same: np.ndarray, seed: int = 0) -> np.ndarray:
    mask = same.copy()
    impostors = np.nonzero(~same)[0]
    keep = np.random.default_rng(seed).choice(impostors, min(len(impostors), int(same.sum())), replace=False)
    mask[keep] = True
    return mask


def _with_folds(images, first, second, same, k) -> PairSet:
    mask = _balanced(same)
    folds = np.zeros(len(same), dtype=np.int64)
    folds[mask] = stratified_folds(same[mask], k)
    return PairSet(images, first, second, same, folds, mask)


def _folder_pairs(cfg) -> PairSet:
    samples = select_identities(folder_samples(cfg.path), cfg.identity_range, 2)
    labels = np.array([s.label for s in samples])
    first, second, same = _all_pairs(labels, cfg.max_pairs)
    images = _load([Path(cfg.path) / s.path for s in samples], cfg.center_crop)
    return _with_folds(images, first, second, same, cfg.folds)


def _synthetic_pairs(cfg, data_cfg, seed: int) -> PairSet:
    # Identities the model never trains on: class ids after the training ones.
    faces = SyntheticFaces(8, 4, data_cfg.noise, seed, class_offset=data_cfg.num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 12345)
        items = [faces[i] for i in range(len(faces))]
    labels = np.array([y for _, y in items])
    first, second, same = _all_pairs(labels, cfg.max_pairs)
    return _with_folds(torch.stack([x for x, _ in items]), first, second, same, cfg.folds)


def build_pairset(cfg, data_cfg, seed: int = 0) -> PairSet | None:
    builders = {"lfw_fold": _lfw_fold_pairs, "bin": _bin_pairs, "folder_pairs": _folder_pairs}
    if cfg.kind == "none":
        return None
    if cfg.kind == "synthetic":
        return _synthetic_pairs(cfg, data_cfg, seed)
    return builders[cfg.kind](cfg)


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
          flip: bool = True, autocast_dtype: torch.dtype | None = None,
          channels_last: bool = False) -> np.ndarray:
    """L2-normalised embeddings (float64 numpy); with ``flip`` the mirrored image's embedding is added."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                e = model(x).embedding.float()
                if flip:
                    e = e + model(x.flip(3)).embedding.float()
            out.append(torch.nn.functional.normalize(e, dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).double().numpy()


def pair_scores(emb: np.ndarray, first: np.ndarray, second: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Cosine of each pair, in chunks: all 515,620 pairs of LFW fold 5 at 512-d would otherwise hold
    several (pairs x D) float64 copies at once (about 10 GB)."""
    out = np.empty(len(first), dtype=np.float64)
    for start in range(0, len(first), chunk):
        end = start + chunk
        out[start:end] = cosine_scores(emb[first[start:end]], emb[second[start:end]])
    return out


def validate(model, pairs: PairSet, cfg, device, autocast_dtype=None, channels_last=False) -> VerificationResult:
    emb = embed(model, pairs.images, cfg.batch_size, device, cfg.flip, autocast_dtype, channels_last)
    scores = pair_scores(emb, pairs.first, pairs.second)
    mask = pairs.accuracy_mask if pairs.accuracy_mask is not None else np.ones(len(scores), bool)
    result = evaluate_pairs(scores[mask], pairs.same[mask], pairs.folds[mask], cfg.fars)
    result.tar = tar_at_far(scores[pairs.same], scores[~pairs.same], cfg.fars)
    result.num_genuine, result.num_impostors = int(pairs.same.sum()), int((~pairs.same).sum())
    return result
