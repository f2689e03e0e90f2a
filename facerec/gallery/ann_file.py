"""The approximate index of one gallery on disk, beside the SQLite file: ``<file>-ann-<gallery id>``.

A restart of a 1M-sample gallery then reads one file instead of rebuilding the graph (minutes).
The file is a cache of the database, never the truth: it records the gallery's generation when it
was written; a loader whose database has moved on reconciles it (samples added since are added,
samples gone are dropped) before using it.

Layout: 8 bytes magic, 8 bytes header length, the JSON header (padded to :data:`HEADER_BYTES`),
then the blocks the header locates: ``alive`` (1 byte per label), ``samples`` (16-byte sample id
per label), ``codes`` (int64 person code per label), ``persons`` (16-byte person id per code),
``vectors`` (float32, ``dim`` per label) and ``faiss`` (the serialised HNSW index, whose last
``labels x code_size`` bytes are its stored, quantised vectors).

Deletion: :func:`scrub` overwrites a deleted sample's float32 row and its quantised code with zeros
in place (and marks it dead), so its embedding leaves the file's bytes at once, as it leaves the
SQLite file (``secure_delete``). Writers (save, scrub) hold an exclusive lock on ``<file>.lock``;
a save replaces the file atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from facerec.gallery.ann import ApproxIndex
from facerec.gallery.ann_policy import IndexPolicy, require_faiss

MAGIC = b"FRANN001"
HEADER_BYTES = 16_384
_START = len(MAGIC) + 8 + HEADER_BYTES


def ann_path(db_path: str | Path, gallery_id: str) -> Path:
    db_path = Path(db_path)
    return db_path.with_name(f"{db_path.name}-ann-{gallery_id}")


@contextmanager
def locked(path: Path):
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ids(hex_ids: list[str]) -> np.ndarray:
    return np.frombuffer(bytes.fromhex("".join(hex_ids)), np.uint8).reshape(-1, 16)


def _hex(block: np.ndarray) -> list[str]:
    text = block.tobytes().hex()
    return [text[i : i + 32] for i in range(0, len(text), 32)]


def read_header(path: Path) -> dict | None:
    """The file's header, or None when there is no readable index file."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            size = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(size))
    except (OSError, ValueError):
        return None


def _write_header(f, header: dict) -> None:
    text = json.dumps(header).encode()
    if len(text) > HEADER_BYTES:
        raise ValueError("index file header too large")
    f.seek(0)
    f.write(MAGIC + len(text).to_bytes(8, "little") + text.ljust(HEADER_BYTES, b" "))


def save(index: ApproxIndex, path: Path, gallery_id: str, generation: int) -> None:
    """Write the whole index (call under :func:`locked`, with the index not being written to)."""
    faiss = require_faiss()
    state = index.state()
    n = len(state["samples"])
    blocks = {
        "alive": state["alive"].astype(np.uint8),
        "samples": _ids(state["samples"]),
        "codes": state["codes"],
        "persons": _ids(state["persons"]),
        "vectors": state["vectors"],
    }
    # a dead label's sample id stays (it is no embedding) but its vectors are zero already
    offsets, at = {}, _START
    for name, block in blocks.items():
        offsets[name] = at
        at += block.nbytes
    offsets["faiss"] = at
    storage = faiss.downcast_index(index.hnsw().storage)
    header = {
        "gallery_id": gallery_id,
        "generation": int(generation),
        "dim": index.dim,
        "labels": n,
        "persons": len(state["persons"]),
        "code_size": int(storage.code_size),
        "policy": index.policy.params(),
        "recall": index.recall,
        "build": index.build,
        "trained_on": index.trained_on,
        "offsets": offsets,
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        _write_header(f, header)
        for block in blocks.values():
            f.write(np.ascontiguousarray(block).tobytes())
        writer = faiss.PyCallbackIOWriter(f.write)
        faiss.write_index(index.graph, writer)
        del writer
        header["faiss_bytes"] = f.tell() - offsets["faiss"]
        _write_header(f, header)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, policy: IndexPolicy) -> tuple[dict, ApproxIndex] | None:
    """(header, index) from the file, or None when there is none (or it is unreadable). The
    graph keeps its build's parameters; ``ef_search`` is ``policy``'s, or the one chosen when its
    recall was measured."""
    header = read_header(path)
    if header is None:
        return None
    faiss = require_faiss()
    n, dim, off = header["labels"], header["dim"], header["offsets"]
    with open(path, "rb") as f:

        def block(name: str, dtype, shape) -> np.ndarray:
            f.seek(off[name])
            count = int(np.prod(shape))
            return np.fromfile(f, dtype, count).reshape(shape)

        alive = block("alive", np.uint8, (n,)).astype(bool)
        samples = _hex(block("samples", np.uint8, (n, 16)))
        codes = block("codes", np.int64, (n,))
        persons = _hex(block("persons", np.uint8, (header["persons"], 16)))
        vectors = block("vectors", np.float32, (n, dim))
        f.seek(off["faiss"])
        reader = faiss.PyCallbackIOReader(f.read)
        graph = faiss.read_index(reader)
        del reader
    index = ApproxIndex(dim, policy, graph=graph, capacity=max(1024, n))
    index.restore(samples, codes, persons, vectors, alive)
    index.recall, index.build = header.get("recall"), header.get("build")
    if policy.ef_search is None and (index.recall or {}).get("ef_search"):
        index.ef_search = int(index.recall["ef_search"])  # as measured for this graph
        index.exact_fallback = index.recall.get("searching") == "exact"
    index.trained_on = int(header.get("trained_on", 0))
    return header, index


def scrub(path: Path, sample_ids=(), person_id: str | None = None, before: int | None = None) -> int:
    """Zero the vectors of these samples (or of this person's samples) in the file, in place, and
    mark them dead; when the file was at generation ``before``, it is at ``before + 1`` after.
    Returns how many labels were scrubbed (0 when there is no file). Call under :func:`locked`."""
    header = read_header(path)
    if header is None:
        return 0
    n, dim, off, size = header["labels"], header["dim"], header["offsets"], header["code_size"]
    with open(path, "r+b") as f:
        f.seek(off["samples"])
        ids = np.fromfile(f, np.uint8, n * 16).reshape(n, 16)
        hit = np.zeros(n, bool)
        for sid in sample_ids:
            hit |= (ids == np.frombuffer(bytes.fromhex(sid), np.uint8)).all(axis=1)
        if person_id is not None:
            f.seek(off["persons"])
            persons = np.fromfile(f, np.uint8, header["persons"] * 16).reshape(-1, 16)
            code = np.flatnonzero((persons == np.frombuffer(bytes.fromhex(person_id), np.uint8)).all(axis=1))
            if len(code):
                f.seek(off["codes"])
                hit |= np.fromfile(f, np.int64, n) == code[0]
        labels = np.flatnonzero(hit)
        codes_at = off["faiss"] + header["faiss_bytes"] - n * size  # FAISS writes the codes last
        for label in labels.tolist():
            f.seek(off["alive"] + label)
            f.write(b"\0")
            f.seek(off["vectors"] + label * dim * 4)
            f.write(bytes(dim * 4))
            f.seek(codes_at + label * size)
            f.write(bytes(size))
        if before is not None and header["generation"] == before:
            header["generation"] = before + 1
            _write_header(f, header)
        f.flush()
        os.fsync(f.fileno())
    return len(labels)


def remove(path: Path) -> None:
    """Delete the file, its vectors overwritten first (a deleted gallery leaves no embeddings in
    blocks the file held, as far as the file system reuses them in place)."""
    header = read_header(path)
    if header is not None:
        with open(path, "r+b") as f:
            f.seek(_START)
            left = os.path.getsize(path) - _START
            while left > 0:
                step = min(left, 1 << 24)
                f.write(bytes(step))
                left -= step
            f.flush()
            os.fsync(f.fileno())
    for p in (path, path.with_name(path.name + ".tmp"), path.with_name(path.name + ".lock")):
        p.unlink(missing_ok=True)
