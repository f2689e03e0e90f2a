"""Identity-folder datasets (``<root>/<identity>/<image>``) and their manifest.

Listing a large tree is slow on network storage and its order is not guaranteed, so the tree is
scanned once into ``manifest.csv`` (path relative to the root, label, identity, optional sha1)
and every later run, and every DataLoader worker, reads the same file and so the same labels.
Labels are the index of the identity in sorted order.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".pgm",
    ".ppm",
    ".webp",
    ".tif",
    ".tiff",
)
MANIFEST_NAME = "manifest.csv"
FIELDS = ("path", "label", "identity", "sha1")


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the dataset root, '/'-separated
    label: int
    identity: str
    sha1: str = ""


def scan_identity_folders(
    root: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS
) -> list[tuple[str, str]]:
    """Sorted (relative path, identity) for every image one level below an identity folder."""
    root = Path(root)
    out = []
    for identity_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(identity_dir.iterdir()):
            if file.is_file() and file.suffix.lower() in extensions:
                out.append((f"{identity_dir.name}/{file.name}", identity_dir.name))
    return out


def sha1_of(path: str | os.PathLike) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_samples(root: str | os.PathLike, with_sha1: bool = False) -> list[Sample]:
    entries = scan_identity_folders(root)
    labels = {name: i for i, name in enumerate(sorted({ident for _, ident in entries}))}
    root = Path(root)
    return [
        Sample(rel, labels[ident], ident, sha1_of(root / rel) if with_sha1 else "")
        for rel, ident in entries
    ]


def write_manifest(path: str | os.PathLike, samples: list[Sample]) -> None:
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        for s in samples:
            writer.writerow((s.path, s.label, s.identity, s.sha1))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a manifest


def read_manifest(path: str | os.PathLike) -> list[Sample]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label", "identity"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
        return [
            Sample(r["path"], int(r["label"]), r["identity"], r.get("sha1") or "") for r in reader
        ]


def folder_samples(root: str | os.PathLike, manifest: str | os.PathLike | None = None) -> list[Sample]:
    """Samples of an identity-folder tree: from its manifest when there is one, else a fresh scan
    (never written into the data folder, which may be read-only or part of a checkout). The one
    listing the trainer, ``facerec teach`` and ``facerec clean`` share, so their paths agree."""
    path = Path(manifest) if manifest else Path(root) / MANIFEST_NAME
    return read_manifest(path) if path.exists() else build_samples(root)


def load_or_build_manifest(
    root: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    with_sha1: bool = False,
    rebuild: bool = False,
) -> list[Sample]:
    """The manifest's samples, scanning ``root`` and writing the manifest only the first time.

    After adding images to the tree, pass ``rebuild=True`` (labels may shift).
    """
    manifest = Path(manifest) if manifest else Path(root) / MANIFEST_NAME
    if manifest.exists() and not rebuild:
        return read_manifest(manifest)
    samples = build_samples(root, with_sha1)
    if not samples:
        raise FileNotFoundError(f"no images under {root}/<identity>/")
    write_manifest(manifest, samples)
    return samples


def verify_sha1(root: str | os.PathLike, samples: list[Sample]) -> list[str]:
    """Paths whose content no longer matches the recorded sha1 (or that are missing)."""
    bad = []
    for s in samples:
        file = Path(root) / s.path
        if s.sha1 and (not file.exists() or sha1_of(file) != s.sha1):
            bad.append(s.path)
    return bad
