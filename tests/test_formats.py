"""RecordIO, pairs/people lists, .bin files and the shared-data protocol."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from facerec.data import recordio as rio
from facerec.data.verification import (
    Pair,
    bin_from_pairs,
    lfw_image_path,
    load_bin,
    parse_pairs,
    parse_people,
    save_bin,
    write_pairs,
)

pytestmark = pytest.mark.timeout(300)

MAGIC_LE = bytes([0x0A, 0x23, 0xD7, 0xCE])  # 0xced7230a little-endian


def test_record_framing_bytes():
    framed = rio.frame_record(b"abcde")
    assert framed[:4] == MAGIC_LE
    assert struct.unpack("<I", framed[4:8])[0] == 5  # cflag 0, length 5
    assert framed[8:] == b"abcde\0\0\0" and len(framed) % 4 == 0


def test_irheader_bytes():
    payload = rio.pack(rio.IRHeader(0, 3.0, 7, 9), b"IMG")
    assert payload == struct.pack("<IfQQ", 0, 3.0, 7, 9) + b"IMG"
    assert len(struct.pack("<IfQQ", 0, 0, 0, 0)) == 24
    multi = rio.pack(rio.IRHeader(0, [5.0, 1.5, -2.0]), b"IMG")
    assert multi[:24] == struct.pack("<IfQQ", 3, 0.0, 0, 0)
    assert np.frombuffer(multi[24:36], np.float32).tolist() == [5.0, 1.5, -2.0]
    header, data = rio.unpack(multi)
    assert header.flag == 3 and header.label.tolist() == [5.0, 1.5, -2.0] and data == b"IMG"


def test_split_records_round_trip(tmp_path):
    # Magic words at aligned offsets 0 and 8 force a three-part record; one at offset 13
    # (unaligned) must stay in the data.
    payload = MAGIC_LE + b"abcd" + MAGIC_LE + b"x" + MAGIC_LE + b"tail"
    framed = rio.frame_record(payload)
    lrecs, pos = [], 0
    while pos < len(framed):
        assert framed[pos : pos + 4] == MAGIC_LE
        lrec = struct.unpack("<I", framed[pos + 4 : pos + 8])[0]
        lrecs.append((lrec >> 29, lrec & ((1 << 29) - 1)))
        pos += 8 + lrecs[-1][1] + (-lrecs[-1][1]) % 4
    assert lrecs == [(1, 0), (2, 4), (3, 9)]
    with rio.RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        w.write(0, b"first")
        w.write(1, payload)
        w.write(2, b"last")
    idx = (tmp_path / "a.idx").read_text().splitlines()
    assert idx[0] == "0\t0" and idx[1] == "1\t16"
    reader = rio.RecordReader(tmp_path / "a.rec")
    assert [reader.read(k) for k in (2, 1, 0)] == [b"last", payload, b"first"]


def colour_image(rgb: tuple[int, int, int], size: int = 112) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[:] = rgb
    image[:10, :10] = 255 - np.array(rgb, np.uint8)  # a corner, so images differ
    return image


def test_face_rec_round_trip_and_colour_order(tmp_path):
    colours = {0: (200, 30, 30), 1: (30, 200, 30), 2: (30, 30, 200)}
    items = [(colour_image(colours[c]), c) for c in (0, 0, 1, 2, 2, 2)]
    assert rio.write_face_rec(tmp_path, items) == 3
    assert (tmp_path / "property").read_text() == "3,112,112"

    # Record 0: flag 2, label [first identity record, end] = [7, 10].
    raw0 = rio.RecordReader(tmp_path / "train.rec").read(0)
    assert raw0[:24] == struct.pack("<IfQQ", 2, 0.0, 0, 0)
    assert np.frombuffer(raw0[24:32], np.float32).tolist() == [7.0, 10.0]

    reader = rio.FaceRecReader(tmp_path)
    assert len(reader) == 6 and reader.identity_keys == [7, 8, 9]
    assert reader.identity_ranges() == [(1, 3), (3, 4), (4, 7)]
    for i, (image, label) in enumerate(items):
        got, got_label = reader.read(i)
        assert got_label == label
        assert np.abs(got[20:, 20:].astype(int) - image[20:, 20:]).max() <= 3  # RGB back
        # insightface's convention: cv2.imdecode of the stored JPEG gives BGR.
        data, _ = reader.read_raw(i)
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert np.abs(bgr[50, 50].astype(int) - image[50, 50][::-1]).max() <= 3
        assert data[:2] == b"\xff\xd8"
    assert reader.num_classes() == 3


def test_face_rec_rejects_non_contiguous_classes(tmp_path):
    with pytest.raises(ValueError, match="contiguous"):
        rio.write_face_rec(tmp_path, [(b"a", 0), (b"b", 1), (b"c", 0)])


def test_rec_with_array_labels_and_split_images(tmp_path):
    """An older-style set: array labels on image records and a JPEG holding the magic word."""
    jpeg = rio.encode_image(colour_image((10, 120, 240)))
    evil = jpeg[:8] + MAGIC_LE + jpeg[8:]  # aligned magic inside the image bytes: split on disk
    with rio.RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, rio.pack(rio.IRHeader(0, [3.0, 4.0]), b""))
        w.write(1, rio.pack(rio.IRHeader(0, [5.0, 0.7]), jpeg))
        w.write(2, rio.pack(rio.IRHeader(0, [6.0, 0.1]), evil))
        w.write(3, rio.pack(rio.IRHeader(0, [0.0, 2.0]), b""))
    raw = (tmp_path / "train.rec").read_bytes()
    lrecs = [
        struct.unpack("<I", raw[i + 4 : i + 8])[0] >> 29
        for i in range(0, len(raw) - 7, 4)
        if raw[i : i + 4] == MAGIC_LE
    ]
    assert 1 in lrecs and 3 in lrecs
    reader = rio.FaceRecReader(tmp_path)
    assert reader.image_keys == [1, 2]
    assert reader.read(0)[1] == 5 and reader.read_raw(1) == (evil, 6)


def test_pairs_and_people(tmp_path):
    text = (
        "2\t2\nA\t1\t2\nB\t1\t3\nA\t1\tC\t2\nB\t2\tD\t1\nE\t1\t2\nE\t2\t3\nF\t1\tG\t1\nH\t3\tF\t1\n"
    )
    (tmp_path / "pairs.txt").write_text(text)
    pairs = parse_pairs(tmp_path / "pairs.txt")
    assert len(pairs) == 8
    assert pairs[0] == Pair("A", 1, "A", 2, 0) and pairs[0].same
    assert pairs[2] == Pair("A", 1, "C", 2, 0) and not pairs[2].same
    assert [p.fold for p in pairs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert pairs[7].paths("/r")[0] == Path("/r/H/H_0003.jpg")
    write_pairs(tmp_path / "again.txt", pairs, 2, 2)
    assert parse_pairs(tmp_path / "again.txt") == pairs
    (tmp_path / "bad.txt").write_text("1\t1\nA\t1\tB\t2\nA\t1\t2\n")  # diff before same
    with pytest.raises(ValueError):
        parse_pairs(tmp_path / "bad.txt")

    (tmp_path / "people.txt").write_text("2\n2\nA\t3\nB\t1\n1\nE\t4\n")
    assert parse_people(tmp_path / "people.txt") == [[("A", 3), ("B", 1)], [("E", 4)]]
    (tmp_path / "dev.txt").write_text("2\nA\t3\nB\t1\n")
    assert parse_people(tmp_path / "dev.txt") == [[("A", 3), ("B", 1)]]


def test_bin_round_trip_and_python2_pickles(tmp_path):
    images = [rio.encode_image(colour_image((i * 40, 10, 10))) for i in range(4)]
    save_bin(tmp_path / "v.bin", images, [True, False])
    got, issame = load_bin(tmp_path / "v.bin")
    assert got == images and issame.tolist() == [True, False]
    # insightface's .bin files are Python-2 pickles: str = bytes, stored as BINSTRING opcodes
    # that a default Python-3 load would try to decode as ASCII.
    blob = b"\x80\x02]q\x00(" + b"".join(b"T" + struct.pack("<I", len(b)) + b for b in images)
    blob += b"e]q\x01(\x88\x89e\x86q\x02."
    (tmp_path / "py2.bin").write_bytes(blob)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(blob)
    got, issame = load_bin(tmp_path / "py2.bin")
    assert got == images and issame.tolist() == [True, False]
    with pytest.raises(ValueError):
        save_bin(tmp_path / "x.bin", images[:3], [True, False])

    root = tmp_path / "aligned"
    for name, i, data in (
        ("A", 1, images[0]),
        ("A", 2, images[1]),
        ("B", 1, images[2]),
    ):
        lfw_image_path(root, name, i).parent.mkdir(parents=True, exist_ok=True)
        lfw_image_path(root, name, i).write_bytes(data)
    n = bin_from_pairs(tmp_path / "p.bin", [Pair("A", 1, "A", 2, 0), Pair("A", 2, "B", 1, 0)], root)
    got, issame = load_bin(tmp_path / "p.bin")
    assert n == 2 and got == [images[0], images[1], images[1], images[2]]
    assert issame.tolist() == [True, False]


# ----- the shared-data protocol (skipped without the data) -----


def _data_root() -> Path:
    return Path(
        os.environ.get("FACEREC_DATA") or Path(__file__).parents[1] / ".." / "shared" / "data"
    )


@pytest.fixture
def data_root() -> Path:
    root = _data_root()
    if not (root / "lfw" / "pairs.txt").exists():
        pytest.skip(f"shared face data not found at {root} (set FACEREC_DATA)")
    return root


@pytest.mark.data
def test_protocol_splits(data_root):
    from facerec.data import protocol

    val, h2 = protocol.validation_pairs(data_root), protocol.lfw_h2_pairs(data_root)
    assert len(val) == 600 and sum(p.same for p in val) == 300
    assert len(h2) == 3000 and {p.fold for p in h2} == {5, 6, 7, 8, 9}
    protocol.check_disjoint(data_root)
    pool = set(protocol.pool_people(data_root))
    assert not pool & set(protocol.validation_people(data_root))
    sample = Path(__file__).parent / "data" / "lfw_sample"
    assert {p.name for p in sample.iterdir() if p.is_dir()} <= pool  # the shipped sample is pool
    for p in val[:5] + h2[:5]:
        assert all(f.exists() for f in p.paths(data_root / protocol.LFW_IMAGES))


@pytest.mark.data
def test_protocol_pool_sources(data_root):
    from facerec.data import protocol

    expected = {"celeba": 299, "celeba10k": 5262, "yaleb": 38, "orl": 40, "yale": 15}
    for source, identities in expected.items():
        items = protocol.source_images(source, data_root)
        assert len({ident for _, ident in items}) == identities
        assert all(ident.startswith(source + "__") for _, ident in items)
    lfw = protocol.source_images("lfw", data_root)
    names = {ident.removeprefix("lfw__") for _, ident in lfw}
    assert names == set(protocol.pool_people(data_root))
    assert all(p.exists() for p, _ in lfw[:50])
