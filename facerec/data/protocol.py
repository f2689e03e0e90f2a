"""The project's evaluation protocol on the shared data (``../shared/data/README.md``).

- training pool: LFW people of View-2 folds 1-4 + celeba + celeba10k + yaleb + orl + yale;
- validation: LFW people of fold 5 and the 600 pairs of ``pairs.txt`` fold 5;
- LFW-H2: the 3,000 pairs of folds 6-10 (final reports only);
- optionally Pins (kept outside the repository, ``$FACEREC_PINS``) without the 35 people the data
  README reserves for evaluation, and without anyone who is an LFW validation or test person.

Folds are 1-based here, as in the README. Identities are made unique across sources by a prefix
(``lfw__Name``, ``celeba__7201``, ``celeba10k__4012``, ``yaleb__yaleB11``, ``orl__s1``,
``yale__subject01``). ``celeba10k`` is CelebA's aligned release at half resolution; the data README
leaves out its people who are also in ``celeba``, so its identities are new people.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from facerec.data.folders import IMAGE_EXTENSIONS
from facerec.data.verification import Pair, lfw_image_path, parse_pairs, parse_people

POOL_FOLDS = (1, 2, 3, 4)
VALIDATION_FOLD = 5
TEST_FOLDS = (6, 7, 8, 9, 10)
LFW_IMAGES = "lfw/lfw-deepfunneled"
OTHER_POOL_SOURCES = ("celeba", "celeba10k", "yaleb", "orl", "yale")
# sources whose identities are numbers, not names: they cannot be checked against LFW by name
NUMERIC_SOURCES = ("celeba", "celeba10k")
SEP = "__"
PINS_ENV = "FACEREC_PINS"
PINS_SPLITS = ("train", "val", "test")
# ../shared/data/README.md: these Pins people are reserved for evaluation and never train.
PINS_RESERVED = (
    "Adriana Lima", "Amber Heard", "Anne Hathaway", "Avril Lavigne", "Barack Obama", "Ben Affleck",
    "Bill Gates", "Christian Bale", "Dominic Purcell", "Dwayne Johnson", "Emilia Clarke", "Emma Stone",
    "Emma Watson", "Gwyneth Paltrow", "Hugh Jackman", "Jennifer Lawrence", "Johnny Depp", "Keanu Reeves",
    "Leonardo DiCaprio", "Lionel Messi", "Maisie Williams", "Margot Robbie", "Mark Zuckerberg",
    "Megan Fox", "Miley Cyrus", "Morgan Freeman", "Natalie Portman", "Rihanna", "Robert De Niro",
    "Robert Downey Jr", "Scarlett Johansson", "Selena Gomez", "Taylor Swift", "Tom Cruise",
    "Wentworth Miller",
)

# source -> folder under the data root whose sub-folders are that source's identities
_LAYOUTS = {
    "celeba": "celeba/images",  # celeba/images/<celeba_id>/NNNNNN.jpg
    "celeba10k": "celeba10k/images",  # celeba10k/images/<celeba_id>/NNNNNN.jpg (89x109, aligned)
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


def source_images(source: str, root=None, pins=None) -> list[tuple[Path, str]]:
    """(path, prefixed identity) of one pool source: 'lfw' (folds 1-4 only), 'pins' (from
    ``pins`` or ``$FACEREC_PINS``, see :func:`pins_selection`) or another shared-data source."""
    r = data_root(root)
    if source == "pins":
        return pins_selection(pins, r).items
    if source == "lfw":
        return [(p, f"lfw{SEP}{n}") for p, n in lfw_images_of(pool_people(r), r)]
    if source not in _LAYOUTS:
        raise ValueError(
            f"unknown source {source!r}; use 'lfw', 'pins' or one of {OTHER_POOL_SOURCES}"
        )
    folder = r / _LAYOUTS[source]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing (see the shared data README)")
    return [(p, f"{source}{SEP}{n}") for p, n in _identity_folder_images(folder)]


def person_key(name: str) -> str:
    """One spelling per person across sources: 'pins_leonardo  dicaprio', 'Leonardo_DiCaprio' and
    'Leonardo DiCaprio' all become 'leonardo dicaprio'."""
    if name.lower().startswith("pins_"):
        name = name[5:]
    return " ".join(name.replace("_", " ").split()).lower()


def pins_root(path: str | os.PathLike | None = None) -> Path | None:
    """``path``, else ``$FACEREC_PINS``, else None (Pins is optional and never shipped)."""
    if path:
        return Path(path)
    env = os.environ.get(PINS_ENV)
    return Path(env) if env else None


@dataclass
class PinsSelection:
    items: list[tuple[Path, str]]  # (path, identity) kept for training
    reserved: list[str]  # people dropped because the data README reserves them
    evaluation: list[str]  # people dropped because they are LFW validation or LFW-H2 people
    merged: list[str]  # people who are also LFW pool people: labelled with their lfw__ identity


def pins_selection(pins: str | os.PathLike | None = None, root=None) -> PinsSelection:
    """Pins as training items: the train/val/test splits merged per person, the 35 reserved people
    and every LFW validation/test person dropped, LFW pool people given their LFW identity (one
    person must be one class). Identities are ``pins__<Title Case Name>``."""
    folder = pins_root(pins)
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(
            f"Pins folder {folder} not found: bring it in as ../shared/data/README.md says and pass "
            f"its path (or set {PINS_ENV})"
        )
    splits = [folder / s for s in PINS_SPLITS if (folder / s).is_dir()] or [folder]
    reserved = {person_key(n) for n in PINS_RESERVED}
    held_out = {person_key(n) for n in validation_people(root) + test_people(root)}
    lfw_pool = {person_key(n): n for n in pool_people(root)}
    by_person: dict[str, list[Path]] = {}
    for split in splits:
        for path, ident in _identity_folder_images(split):
            by_person.setdefault(person_key(ident), []).append(path)
    sel = PinsSelection([], [], [], [])
    for key in sorted(by_person):
        if key in reserved:
            sel.reserved.append(key)
        elif key in held_out:
            sel.evaluation.append(key)
        else:
            if key in lfw_pool:
                sel.merged.append(key)
                identity = f"lfw{SEP}{lfw_pool[key]}"
            else:
                identity = f"pins{SEP}{key.title().replace(' ', '_')}"
            sel.items.extend((p, identity) for p in sorted(by_person[key]))
    return sel


def check_identities_absent(items: list[tuple[Path, str]], root=None) -> None:
    """Raises if a training item belongs to an LFW validation/test person, or a Pins item to a
    reserved Pins person. Identities are compared by person (``person_key`` of the part after the
    source prefix). The reservation covers Pins only: eight reserved people (Adriana Lima, Bill
    Gates, ...) are also LFW fold 1-4 people, which the data README assigns to the pool."""
    held_out = {person_key(n): "LFW validation" for n in validation_people(root)}
    held_out.update({person_key(n): "LFW-H2 test" for n in test_people(root)})
    reserved = {person_key(n) for n in PINS_RESERVED}
    for path, identity in items:
        source, _, name = identity.partition(SEP)
        if source in NUMERIC_SOURCES:  # numeric identities carry no name
            continue
        key = person_key(name)
        what = held_out.get(key)
        if what is None and source == "pins" and key in reserved:
            what = "reserved Pins"
        if what:
            raise AssertionError(f"{path}: identity {identity} is a {what} person")


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
    root=None,
    sources: tuple[str, ...] = ("lfw",) + OTHER_POOL_SOURCES,
    deduplicate: bool = True,
    pins=None,
):
    """The training pool as (path, unique identity) over all sources, in a stable order, with
    exact duplicates removed (``drop_exact_duplicates``) unless ``deduplicate=False``. Add
    ``"pins"`` to ``sources`` (and give ``pins`` or ``$FACEREC_PINS``) for the larger pool.
    Every result is checked: no validation, test or reserved person can be in it."""
    items = [item for s in sources for item in source_images(s, root, pins)]
    items = drop_exact_duplicates(items) if deduplicate else items
    check_identities_absent(items, root)
    return items


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
