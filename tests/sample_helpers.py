"""The bundled LFW sample, aligned as the service and ``facerec align`` align it, for tests that need
an aligned tree: detected once on the originals (``facerec.eval.face_meta``: the detection cache
``facerec eval --meta`` and ``facerec fit-quality --meta`` read), then cropped with those landmarks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2

SAMPLE = Path(__file__).resolve().parent / "data" / "lfw_sample"


def sample_people() -> list[str]:
    return sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())


def align_sample(tmp: Path, people: Sequence[str], alignment: str = "arcface-5pt-112-v1",
                 size: int = 112) -> tuple[Path, Path]:
    """(aligned tree ``tmp/aligned/<name>/<file>``, detection cache ``tmp/meta.npz``) of ``people``,
    cut to ``alignment`` at ``size`` (a model's contract: ``alignment``, ``input_size``)."""
    from facerec.data.align import norm_crop
    from facerec.data.datasets import read_rgb
    from facerec.eval import face_meta

    (tmp / "people.txt").write_text("\n".join(people))
    meta_path = tmp / "meta.npz"
    assert face_meta.main([str(SAMPLE), "--out", str(meta_path), "--people", str(tmp / "people.txt")]) == 0
    meta = face_meta.FaceMeta.load(meta_path)
    aligned = tmp / "aligned"
    for key, ok, lm in zip(meta.keys, meta.found, meta.landmarks, strict=True):
        assert ok, key
        crop = norm_crop(read_rgb(SAMPLE / key), lm, size, alignment)
        out = aligned / key
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    return aligned, meta_path


def write_sample_pairs(path: Path, people: Sequence[str]) -> list:
    """An LFW-style pairs.txt over 12 of the sample's people: 2 folds x (6 same + 6 different)."""
    from facerec.data.verification import Pair, write_pairs

    pairs = []
    for fold in range(2):
        group = list(people[fold * 6 : (fold + 1) * 6])
        pairs += [Pair(n, 1, n, 2, fold) for n in group]
        pairs += [Pair(group[i], 3, group[(i + 1) % 6], 4, fold) for i in range(6)]
    write_pairs(path, pairs, 2, 6)
    return pairs
