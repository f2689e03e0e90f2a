"""Verification pair lists: LFW ``pairs.txt`` / ``people.txt`` and insightface ``.bin`` files.

``pairs.txt`` (View 2): a header ``<folds> <n>`` and then, per fold, n same-person lines
``name i j`` followed by n different-person lines ``name1 i name2 j`` (image numbers start at 1).
``people.txt``: the number of folds, then per fold a count and that many ``name images`` lines.
A ``.bin`` is a pickle of ``(list of 2N encoded images, list of N bools)``; pair i is images
2i and 2i+1. insightface wrote them under Python 2, hence ``encoding='bytes'`` when loading.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Pair:
    name1: str
    index1: int
    name2: str
    index2: int
    fold: int  # 0-based

    @property
    def same(self) -> bool:
        return self.name1 == self.name2

    def paths(self, root: str | os.PathLike, ext: str = ".jpg") -> tuple[Path, Path]:
        return lfw_image_path(root, self.name1, self.index1, ext), lfw_image_path(
            root, self.name2, self.index2, ext
        )


def lfw_image_path(root: str | os.PathLike, name: str, index: int, ext: str = ".jpg") -> Path:
    """``root/Name/Name_0003.jpg`` for image 3 of Name (LFW numbers images from 1)."""
    return Path(root) / name / f"{name}_{index:04d}{ext}"


def _tokens(path: str | os.PathLike) -> list[list[str]]:
    with open(path) as f:
        return [line.split() for line in f if line.strip()]


def parse_pairs(path: str | os.PathLike) -> list[Pair]:
    """All pairs of a ``pairs.txt`` with their 0-based fold, in file order.

    Also reads single-fold files (View 1's ``pairsDevTrain.txt``: header ``n``).
    """
    lines = _tokens(path)
    header = [int(t) for t in lines[0]]
    folds, per_fold = (1, header[0]) if len(header) == 1 else (header[0], header[1])
    body = lines[1:]
    if len(body) != folds * 2 * per_fold:
        raise ValueError(f"{path}: expected {folds * 2 * per_fold} pairs, found {len(body)}")
    pairs = []
    for i, t in enumerate(body):
        fold, pos = divmod(i, 2 * per_fold)
        if len(t) == 3 and pos < per_fold:
            pairs.append(Pair(t[0], int(t[1]), t[0], int(t[2]), fold))
        elif len(t) == 4 and pos >= per_fold:
            pairs.append(Pair(t[0], int(t[1]), t[2], int(t[3]), fold))
        else:
            raise ValueError(f"{path}: line {i + 2} does not fit the fold structure: {t}")
    return pairs


def write_pairs(path: str | os.PathLike, pairs: Sequence[Pair], folds: int, per_fold: int) -> None:
    """Writes the View-2 layout; ``pairs`` in fold order, same pairs before different ones."""
    lines = [f"{folds}\t{per_fold}"]
    for p in pairs:
        if p.same:
            lines.append(f"{p.name1}\t{p.index1}\t{p.index2}")
        else:
            lines.append(f"{p.name1}\t{p.index1}\t{p.name2}\t{p.index2}")
    Path(path).write_text("\n".join(lines) + "\n")


def parse_people(path: str | os.PathLike) -> list[list[tuple[str, int]]]:
    """Folds of (name, number of images) from ``people.txt`` (or a single-fold ``peopleDev*``)."""
    lines = _tokens(path)
    if len(lines[1]) == 2:  # single fold: "n" then n people
        return [[(t[0], int(t[1])) for t in lines[1 : 1 + int(lines[0][0])]]]
    folds, out, i = int(lines[0][0]), [], 1
    for _ in range(folds):
        count = int(lines[i][0])
        out.append([(t[0], int(t[1])) for t in lines[i + 1 : i + 1 + count]])
        i += 1 + count
    if i != len(lines):
        raise ValueError(f"{path}: {len(lines) - i} lines after the last fold")
    return out


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """(2N encoded images, N bools) from an insightface verification ``.bin``.

    Only open .bin files you trust: this is a pickle.
    """
    with open(path, "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    images = [bytes(b) if not isinstance(b, bytes) else b for b in bins]
    issame = np.asarray(issame, dtype=bool)
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs")
    return images, issame


def save_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Writes a ``.bin`` insightface's ``load_bin`` reads (protocol 4, plain lists)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs")
    with open(path, "wb") as f:
        pickle.dump(([bytes(b) for b in images], [bool(s) for s in issame]), f, protocol=4)


def bin_from_pairs(
    path: str | os.PathLike,
    pairs: Sequence[Pair],
    image_root: str | os.PathLike,
    ext: str = ".jpg",
) -> int:
    """Packs the (already aligned) image files of ``pairs`` into a ``.bin``; returns N pairs."""
    images, issame = [], []
    for p in pairs:
        for file in p.paths(image_root, ext):
            images.append(Path(file).read_bytes())
        issame.append(p.same)
    save_bin(path, images, issame)
    return len(issame)
