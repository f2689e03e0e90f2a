"""The project's evaluation protocol on the shared data (``../shared/data/README.md``).

- training pool: LFW people of View-2 folds 1-4 + celeba + yaleb + orl + yale;
- validation: LFW people of fold 5 and the 600 pairs of ``pairs.txt`` fold 5;
- LFW-H2: the 3,000 pairs of folds 6-10 (final reports only).

Folds are 1-based here, as in the README. Identities are made unique across sources by a prefix
(``lfw__Name``, ``celeba__7201``, ``yaleb__yaleB11``, ``orl__s1``, ``yale__subject01``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from facerec.data.folders import IMAGE_EXTENSIONS
from facerec.data.verification import Pair, lfw_image_path, parse_pairs, parse_people

POOL_FOLDS = (1, 2, 3, 4)
VALIDATION_FOLD = 5
TEST_FOLDS = (6, 7, 8, 9, 10)
LFW_IMAGES = "lfw/lfw-deepfunneled"
OTHER_POOL_SOURCES = ("celeba", "yaleb", "orl", "yale")
SEP = "__"

# source -> folder under the data root whose sub-folders are that source's identities
_LAYOUTS = {
    "celeba": "celeba/images",  # celeba/images/<celeba_id>/NNNNNN.jpg
    "yaleb": "yaleb",  # yaleb/yaleBNN/*.jpg
    "orl": "orl",  # orl/sN/K.png
    "yale": "yale",  # yale/subjectNN/<condition>.png
}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$FACEREC_DATA``, else ``../shared/data`` beside the repository."""
    if root:
        return Path(root)
    if os.environ.get("FACEREC_DATA"):
        return Path(os.environ["FACEREC_DATA"])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def has_lfw(root: str | os.PathLike | None = None) -> bool:
    r = data_root(root)
    return (r / "lfw" / "people.txt").exists() and (r / "lfw" / "pairs.txt").exists()


@lru_cache(maxsize=4)
def _people(root: Path) -> tuple[tuple[tuple[str, int], ...], ...]:
    folds = parse_people(root / "lfw" / "people.txt")
    if len(folds) != 10:
        raise ValueError(f"{root}/lfw/people.txt: expected 10 folds, found {len(folds)}")
    return tuple(tuple(f) for f in folds)


@lru_cache(maxsize=4)
def _pairs(root: Path) -> tuple[Pair, ...]:
    return tuple(parse_pairs(root / "lfw" / "pairs.txt"))


def people_of_folds(folds: tuple[int, ...], root: str | os.PathLike | None = None) -> list[str]:
    """Names of the people in the given 1-based View-2 folds, sorted."""
    table = _people(data_root(root))
    return sorted(name for k in folds for name, _ in table[k - 1])


def pool_people(root=None) -> list[str]:
    return people_of_folds(POOL_FOLDS, root)


def validation_people(root=None) -> list[str]:
    return people_of_folds((VALIDATION_FOLD,), root)


def test_people(root=None) -> list[str]:
    return people_of_folds(TEST_FOLDS, root)


def pairs_of_folds(folds: tuple[int, ...], root: str | os.PathLike | None = None) -> list[Pair]:
    """Pairs of ``pairs.txt`` in the given 1-based folds (``Pair.fold`` stays 0-based)."""
    wanted = {k - 1 for k in folds}
    return [p for p in _pairs(data_root(root)) if p.fold in wanted]


def validation_pairs(root=None) -> list[Pair]:
    return pairs_of_folds((VALIDATION_FOLD,), root)


def lfw_h2_pairs(root=None) -> list[Pair]:
    """The 3,000 test pairs; ``Pair.fold`` - 5 gives the 0..4 fold for the 5-fold accuracy rule."""
    return pairs_of_folds(TEST_FOLDS, root)


def lfw_images_of(people: list[str], root=None) -> list[tuple[Path, str]]:
    """(path, bare LFW name) for every image of these people, using people.txt's counts."""
    r = data_root(root)
    counts = {name: n for fold in _people(r) for name, n in fold}
    return [
        (lfw_image_path(r / LFW_IMAGES, name, i), name)
        for name in people
        for i in range(1, counts[name] + 1)
    ]


def _identity_folder_images(folder: Path) -> list[tuple[Path, str]]:
    out = []
    for ident in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(ident.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                out.append((f, ident.name))
    return out


def source_images(source: str, root=None) -> list[tuple[Path, str]]:
    """(path, prefixed identity) of one pool source: 'lfw' (folds 1-4 only) or another."""
    r = data_root(root)
    if source == "lfw":
        return [(p, f"lfw{SEP}{n}") for p, n in lfw_images_of(pool_people(r), r)]
    if source not in _LAYOUTS:
        raise ValueError(f"unknown source {source!r}; use 'lfw' or one of {OTHER_POOL_SOURCES}")
    folder = r / _LAYOUTS[source]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing (see the shared data README)")
    return [(p, f"{source}{SEP}{n}") for p, n in _identity_folder_images(folder)]


def exact_duplicates(items: list[tuple[Path, str]]) -> list[list[tuple[Path, str]]]:
    """Groups (2 or more) of byte-identical files among (path, identity) items, in item order."""
    import hashlib

    groups: dict[str, list[tuple[Path, str]]] = {}
    for path, identity in items:
        digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()
        groups.setdefault(digest, []).append((path, identity))
    return [g for g in groups.values() if len(g) > 1]


def drop_exact_duplicates(items: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """Keep one copy of a file repeated within one identity; drop every copy of a file that stands
    under several identities (its label is ambiguous: it would teach the model two answers)."""
    drop: set[Path] = set()
    for group in exact_duplicates(items):
        if len({identity for _, identity in group}) > 1:
            drop.update(Path(p) for p, _ in group)
        else:
            drop.update(Path(p) for p, _ in group[1:])
    return [(p, i) for p, i in items if Path(p) not in drop]


def pool_images(
    root=None, sources: tuple[str, ...] = ("lfw",) + OTHER_POOL_SOURCES, deduplicate: bool = True
):
    """The training pool as (path, unique identity) over all sources, in a stable order, with
    exact duplicates removed (``drop_exact_duplicates``) unless ``deduplicate=False``."""
    items = [item for s in sources for item in source_images(s, root)]
    return drop_exact_duplicates(items) if deduplicate else items


def check_disjoint(root=None) -> None:
    """Raises if a pool, validation and test person coincide, or a pair leaves its fold's people."""
    pool, val, test = (
        set(pool_people(root)),
        set(validation_people(root)),
        set(test_people(root)),
    )
    if pool & val or pool & test or val & test:
        raise AssertionError("LFW folds of people.txt overlap")
    for pairs, people in ((validation_pairs(root), val), (lfw_h2_pairs(root), test)):
        for p in pairs:
            if p.name1 not in people or p.name2 not in people:
                raise AssertionError(f"pair {p} uses a person outside its folds")
