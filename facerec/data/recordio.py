"""insightface / MXNet RecordIO: ``train.rec`` + ``train.idx`` + ``property``, without MXNet.

Framing (dmlc ``recordio.h``): each record is uint32 magic 0xced7230a, uint32 ``lrec`` (upper 3
bits: cflag, lower 29: payload length), the payload, zero padding to a multiple of 4. When a
payload holds the magic word at a 4-byte-aligned offset, the writer cuts the record there and
drops the magic (cflag 1 = first part, 2 = middle, 3 = last); the reader re-inserts it. Without
that, a reader scanning for magic words would resynchronise in the middle of a JPEG.

Payload: ``IRHeader`` packed little-endian ``'IfQQ'`` (flag, label, id, id2; 24 bytes). flag > 0
means ``flag`` float32 labels follow and the scalar label is 0. Then the encoded image.

Colour order: insightface encodes with cv2 from **BGR** (so the JPEG itself has the right
colours); :func:`decode_image` returns **RGB**, like ``mx.image.imdecode``.

insightface layout: record 0 has label ``[first_identity_record, end]``; records 1 ..
first_identity_record-1 are images with a scalar class label; records first_identity_record ..
end-1 are identity records with label ``[first_image, end_image)``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
JPEG_QUALITY = 95


@dataclass
class IRHeader:
    flag: int
    label: float | np.ndarray
    id: int = 0
    id2: int = 0


def pack(header: IRHeader, data: bytes) -> bytes:
    """IRHeader + bytes, the payload of one record. An array label sets flag to its length."""
    label = np.asarray(header.label, dtype=np.float32)
    if label.ndim == 0:
        return _HEADER.pack(0, float(label), header.id, header.id2) + data
    label = label.ravel()
    return _HEADER.pack(label.size, 0.0, header.id, header.id2) + label.tobytes() + data


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    flag, label, id_, id2 = _HEADER.unpack_from(payload, 0)
    rest = payload[_HEADER.size :]
    if flag > 0:
        labels = np.frombuffer(rest, dtype=np.float32, count=flag).copy()
        return IRHeader(flag, labels, id_, id2), rest[flag * 4 :]
    return IRHeader(flag, label, id_, id2), rest


def _frame(cflag: int, part: bytes) -> bytes:
    pad = (-len(part)) % 4
    return _MAGIC_BYTES + struct.pack("<I", (cflag << 29) | len(part)) + part + b"\0" * pad


def frame_record(payload: bytes) -> bytes:
    """The on-disk bytes of one record, split at every aligned magic word as dmlc does."""
    if len(payload) > _LENGTH_MASK:
        raise ValueError("record longer than 2^29 - 1 bytes")
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i : i + 4] == _MAGIC_BYTES]
    if not cuts:
        return _frame(0, payload)
    out, start = [], 0
    for n, cut in enumerate(cuts):
        out.append(_frame(1 if n == 0 else 2, payload[start:cut]))
        start = cut + 4
    out.append(_frame(3, payload[start:]))
    return b"".join(out)


class RecordWriter:
    """Appends records to ``.rec`` and ``key\\toffset`` lines to ``.idx``."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self._rec = open(rec_path, "wb")  # noqa: SIM115 - closed by close()/__exit__
        self._idx = open(idx_path, "w")  # noqa: SIM115

    def write(self, key: int, payload: bytes) -> int:
        offset = self._rec.tell()
        self._rec.write(frame_record(payload))
        self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RecordReader:
    """Random access by key through the ``.idx``; safe to use from DataLoader workers.

    The file is opened lazily and re-opened after a fork, so one reader object can be handed to
    worker processes (a file position shared across processes would interleave reads).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        self.offsets: dict[int, int] = {}
        with open(idx_path) as f:
            for line in f:
                if line.strip():
                    key, offset = line.split("\t")
                    self.offsets[int(key)] = int(offset)
        self._file = None
        self._pid = -1

    @property
    def keys(self) -> list[int]:
        return list(self.offsets)

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb")  # noqa: SIM115 - kept open for reads
            self._pid = os.getpid()
        return self._file

    def read(self, key: int) -> bytes:
        f = self._handle()
        f.seek(self.offsets[key])
        parts = []
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise EOFError(f"truncated record {key} in {self.rec_path}")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise ValueError(f"bad magic {magic:#x} at record {key} of {self.rec_path}")
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            data = f.read(length)
            f.read((-length) % 4)
            parts.append(data)
            if cflag in (0, 3):
                break
        # The writer removed a magic word at every cut.
        return _MAGIC_BYTES.join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, -1
        return state


def encode_image(image_rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB (or grey) image, encoded from BGR as insightface does."""
    image = image_rgb if image_rgb.ndim == 2 else cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> RGB uint8 (H, W, 3); grey images are replicated to three channels."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("could not decode image bytes")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class FaceRecWriter:
    """Writes an insightface training set: images grouped by class, then identity records.

    Images of one class must arrive together (classes 0..C-1 in any order, each contiguous),
    because identity records describe each class as one [start, end) range.
    """

    def __init__(self, out_dir: str | os.PathLike, image_size: int = 112):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.image_size = image_size
        self._writer = RecordWriter(self.out_dir / "train.rec", self.out_dir / "train.idx")
        # Record 0 has a fixed size, so a placeholder is written now and overwritten at close.
        self._writer.write(0, pack(IRHeader(2, np.zeros(2, np.float32)), b""))
        self._next = 1
        self._ranges: dict[int, list[int]] = {}
        self._current: int | None = None
        self._classes: int | None = None  # set by close(); closing twice is harmless

    def add(self, image: np.ndarray | bytes, label: int) -> None:
        """``image``: RGB uint8 array (encoded here) or already-encoded JPEG/PNG bytes."""
        label = int(label)
        if label != self._current:
            if label in self._ranges:
                raise ValueError(f"class {label} is not contiguous; sort the images by class")
            self._ranges[label] = [self._next, self._next]
            self._current = label
        data = image if isinstance(image, bytes) else encode_image(image)
        self._writer.write(self._next, pack(IRHeader(0, float(label)), data))
        self._next += 1
        self._ranges[label][1] = self._next

    def close(self) -> int:
        """Writes identity records, the header and ``property``; returns the number of classes."""
        if self._classes is not None:
            return self._classes
        first_identity = self._next
        classes = sorted(self._ranges)
        if classes != list(range(len(classes))):
            raise ValueError("class labels must be 0..C-1 without gaps")
        for label in classes:
            start, end = self._ranges[label]
            self._writer.write(
                self._next, pack(IRHeader(2, np.array([start, end], np.float32)), b"")
            )
            self._next += 1
        header = pack(IRHeader(2, np.array([first_identity, self._next], np.float32)), b"")
        self._writer._rec.seek(0)
        self._writer._rec.write(frame_record(header))
        self._writer.close()
        s = self.image_size
        (self.out_dir / "property").write_text(f"{len(classes)},{s},{s}")
        self._classes = len(classes)
        return self._classes

    def __enter__(self) -> FaceRecWriter:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.close()


def write_face_rec(
    out_dir: str | os.PathLike,
    items: Iterable[tuple[np.ndarray | bytes, int]],
    image_size: int = 112,
) -> int:
    """Writes (image, class) pairs (grouped by class) as train.rec/.idx/property; returns C."""
    with FaceRecWriter(out_dir, image_size) as writer:
        for image, label in items:
            writer.add(image, label)
        return writer.close()


class FaceRecReader:
    """Reads an insightface training directory (or a bare ``.rec`` with its ``.idx``)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        rec = path / "train.rec" if path.is_dir() else path
        self.records = RecordReader(rec)
        header, _ = unpack(self.records.read(0))
        if header.flag > 0:
            first_identity = int(header.label[0])
            self.image_keys = list(range(1, first_identity))
            self.identity_keys = list(range(first_identity, int(header.label[1])))
        else:  # a plain image list without the insightface header record
            self.image_keys = sorted(self.records.keys)
            self.identity_keys = []

    def __len__(self) -> int:
        return len(self.image_keys)

    def read_raw(self, index: int) -> tuple[bytes, int]:
        """(encoded bytes, class) of the index-th image; array labels use their first value."""
        header, data = unpack(self.records.read(self.image_keys[index]))
        label = header.label[0] if header.flag > 0 else header.label
        return data, int(label)

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """(RGB uint8 image, class) of the index-th image."""
        data, label = self.read_raw(index)
        return decode_image(data), label

    def identity_ranges(self) -> list[tuple[int, int]]:
        out = []
        for key in self.identity_keys:
            header, _ = unpack(self.records.read(key))
            out.append((int(header.label[0]), int(header.label[1])))
        return out

    def num_classes(self) -> int:
        if self.identity_keys:
            return len(self.identity_keys)
        return len({self.read_raw(i)[1] for i in range(len(self))})
