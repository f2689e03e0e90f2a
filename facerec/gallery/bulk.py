"""Bulk import into a gallery: an embeddings file (with the contract id of the model that made it)
or a folder tree of photos (one folder per person, run through a model folder's pipeline).

The embeddings file is an ``.npz`` with ``embeddings`` (N x D float), ``names`` (N person names:
rows with the same name become one person with several samples, at most 64), ``contract_id`` (the
embedding contract of the model that computed them) and optionally ``model_name``. The gallery's
contract must be the file's: embeddings of different models are not comparable.

Rows go in through the store's ``import_persons`` in batches (one transaction each); the SQLite
store turns its cache up and sorts each batch's rows by key, so a batch appends to the B-trees
instead of scattering over them (``benchmarks/search_speed.py`` measures the rate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facerec.gallery.store import MAX_SAMPLES_PER_PERSON, NewSample

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class EmbeddingsFile:
    embeddings: np.ndarray  # (N, D) float32
    names: np.ndarray  # (N,) str
    contract_id: str
    model_name: str = "imported embeddings"


def write_embeddings(path: str | Path, embeddings, names, contract_id: str, model_name: str | None = None) -> Path:
    path = Path(path)
    extra = {} if model_name is None else {"model_name": np.asarray(model_name)}
    np.savez(path, embeddings=np.asarray(embeddings, np.float32), names=np.asarray(names, str),
             contract_id=np.asarray(contract_id), **extra)
    return path


def read_embeddings(path: str | Path) -> EmbeddingsFile:
    """The file's arrays, checked; ValueError says what is wrong with it."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not an embeddings .npz file ({err})") from None
    with z:
        missing = [k for k in ("embeddings", "names", "contract_id") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)} (an embeddings file holds embeddings, "
                             "names and the contract_id of the model that made them)")
        emb = np.asarray(z["embeddings"], np.float32)
        names = np.asarray(z["names"]).astype(str)
        out = EmbeddingsFile(emb, names, str(z["contract_id"]),
                             str(z["model_name"]) if "model_name" in z.files else "imported embeddings")
    if emb.ndim != 2 or len(emb) != len(names):
        raise ValueError(f"{path}: embeddings must be N x D with one name per row "
                         f"(got {emb.shape} and {len(names)} names)")
    norms = np.linalg.norm(emb, axis=1)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        bad = int(np.flatnonzero(~np.isfinite(norms) | (norms == 0))[0])
        raise ValueError(f"{path}: row {bad} ({names[bad]!r}) is not a finite non-zero embedding")
    return out


def persons_of(names: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(name, row indices) per person, in the order of first appearance."""
    uniq, first, inverse = np.unique(names, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1]
    groups = np.split(order, bounds)
    out = [(str(uniq[i]), groups[i]) for i in np.argsort(first)]
    too_many = next((n for n, rows in out if len(rows) > MAX_SAMPLES_PER_PERSON), None)
    if too_many is not None:
        raise ValueError(f"person {too_many!r} has more than {MAX_SAMPLES_PER_PERSON} samples")
    return out


def import_embeddings(store, gallery_id: str, embeddings: np.ndarray, names, infos: list[dict] | None = None,
                      batch_rows: int = 20_000, progress: bool = True) -> int:
    """Import rows as persons (grouped by name) in batches of about ``batch_rows`` rows; returns
    the persons created."""
    persons = persons_of(np.asarray(names).astype(str))
    made = 0
    with tqdm(total=len(embeddings), unit="row", desc="import", disable=not progress) as bar:
        pending, rows = [], 0
        for name, idx in persons:
            pending.append((name, {}, [NewSample(embeddings[i], infos[i] if infos else {}) for i in idx]))
            rows += len(idx)
            if rows >= batch_rows:
                made += len(store.import_persons(gallery_id, pending))
                bar.update(rows)
                pending, rows = [], 0
        if pending:
            made += len(store.import_persons(gallery_id, pending))
            bar.update(rows)
    return made


def photos_of(root: str | Path) -> list[tuple[Path, str]]:
    """(photo, person) for ``root/<person>/<photo>``, sorted."""
    root = Path(root)
    found = [(p, p.parent.name) for p in sorted(root.glob("*/*"))
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise ValueError(f"{root}: no photos in <person>/<photo> folders ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def measure_folder(model, root: str | Path, gate: bool = True, progress: bool = True):
    """Embeddings of a folder tree's photos through ``model``'s pipeline (an
    :class:`~facerec.gallery.measure.OfflineModel`); with ``gate``, photos the default enrollment
    policy refuses are left out. Returns (embeddings, names, infos, refused {reason: count})."""
    from facerec.gallery.measure import measure
    from facerec.gallery.policy import EnrollmentPolicy, assess

    photos = photos_of(root)
    m = measure(model, [p for p, _ in photos], [str(p) for p, _ in photos], progress=progress)
    policy, keep, infos, refused = EnrollmentPolicy(), [], [], {}
    for i in range(len(photos)):
        if not m.found[i]:
            refused[m.error[i] or "no_face"] = refused.get(m.error[i] or "no_face", 0) + 1
            continue
        ev = m.evidence(i, model.quality_score, model.ood_threshold)
        reasons = [r.reason.value for r in assess(policy, ev)] if gate else []
        for r in set(reasons):
            refused[r] = refused.get(r, 0) + 1
        if not reasons:
            keep.append(i)
            infos.append(ev.measurements())
    names = np.array([photos[i][1] for i in keep], str)
    return m.embedding[keep], names, infos, refused
