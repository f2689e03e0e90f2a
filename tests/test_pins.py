"""Pins as an extra training source: reserved and held-out people are provably absent, splits merge
per person, LFW pool people keep one identity, and `facerec align --prune` keeps the tree in step.

Runs on a synthetic data root (a 10-fold people.txt) and a synthetic Pins tree, so it needs neither
the shared data nor Pins itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from facerec.cli import align as align_cli
from facerec.data import protocol

pytestmark = pytest.mark.timeout(60)


def _people_txt(root: Path, folds: list[list[str]]) -> None:
    lines = [str(len(folds))]
    for fold in folds:
        lines.append(str(len(fold)))
        lines += [f"{name}\t1" for name in fold]
    (root / "lfw").mkdir(parents=True)
    (root / "lfw" / "people.txt").write_text("\n".join(lines) + "\n")
    (root / "lfw" / "pairs.txt").write_text("10 0\n")


def _img(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([value]) * 64)  # distinct bytes per value: exact-duplicate tests


@pytest.fixture()
def world(tmp_path, monkeypatch):
    root = tmp_path / "data"
    folds = [[f"Pool_{k}"] for k in range(4)] + [["Val_Person"]] + [[f"Test_{k}"] for k in range(5)]
    folds[0].append("Pool_Shared")
    _people_txt(root, folds)
    protocol._people.cache_clear()
    pins = tmp_path / "pins"
    value = 0
    layout = {
        "train": ["pins_Alice Example", "pins_bob  example", "pins_Barack Obama", "pins_val person",
                  "pins_Pool Shared"],
        "val": ["pins_Alice Example", "pins_test 3"],
        "test": ["pins_bob  example", "pins_Selena Gomez"],
    }
    for split, people in layout.items():
        for person in people:
            for i in range(2):
                value += 1
                _img(pins / split / person / f"{split}{i}.jpg", value)
    monkeypatch.delenv(protocol.PINS_ENV, raising=False)
    yield root, pins
    protocol._people.cache_clear()


def test_person_key_unifies_spellings():
    assert protocol.person_key("pins_leonardo  dicaprio") == "leonardo dicaprio"
    assert protocol.person_key("Leonardo_DiCaprio") == "leonardo dicaprio"
    assert protocol.person_key("Robert Downey Jr") == protocol.person_key("robert_downey_jr")


def test_reserved_list_is_the_readme_list():
    assert len(protocol.PINS_RESERVED) == 35
    assert len({protocol.person_key(n) for n in protocol.PINS_RESERVED}) == 35


def test_pins_selection_drops_reserved_and_held_out(world):
    root, pins = world
    sel = protocol.pins_selection(pins, root)
    idents = {i for _, i in sel.items}
    # splits merged per person (Alice: 2 train + 2 val; bob's odd spacing and case normalised)
    assert sorted(idents) == ["lfw__Pool_Shared", "pins__Alice_Example", "pins__Bob_Example"]
    assert sum(i == "pins__Alice_Example" for _, i in sel.items) == 4
    assert sum(i == "pins__Bob_Example" for _, i in sel.items) == 4
    assert sel.reserved == ["barack obama", "selena gomez"]
    assert sel.evaluation == ["test 3", "val person"]  # an LFW-H2 and a validation person
    assert sel.merged == ["pool shared"]  # one person, one class: the LFW pool identity
    protocol.check_identities_absent(sel.items, root)


def test_check_identities_absent_catches_each_kind(world):
    root, _ = world
    protocol.check_identities_absent([(Path("a"), "lfw__Pool_0"), (Path("b"), "celeba__7")], root)
    for ident, what in (("pins__Test_2", "LFW-H2 test"), ("lfw__Val_Person", "LFW validation"),
                        ("orl__val_person", "LFW validation"), ("pins__Emma_Watson", "reserved Pins")):
        with pytest.raises(AssertionError, match=what):
            protocol.check_identities_absent([(Path("x.jpg"), ident)], root)
    # the reservation is about Pins: an LFW pool person with a reserved name stays in the pool
    protocol.check_identities_absent([(Path("x.jpg"), "lfw__Barack_Obama")], root)


def test_pins_missing_folder_is_a_clear_error(world, tmp_path):
    root, _ = world
    with pytest.raises(FileNotFoundError, match="FACEREC_PINS"):
        protocol.pins_selection(tmp_path / "nowhere", root)
    with pytest.raises(FileNotFoundError, match="FACEREC_PINS"):
        protocol.pins_selection(None, root)


def test_pins_env_and_pool_images(world, monkeypatch):
    root, pins = world
    monkeypatch.setenv(protocol.PINS_ENV, str(pins))
    items = protocol.pool_images(root, ("pins",))
    assert len(items) == 10
    # a byte-identical file under two Pins people is dropped from both
    alice = [p for p, i in items if i == "pins__Alice_Example"][0]
    bob = [p for p, i in items if i == "pins__Bob_Example"][0]
    bob.write_bytes(alice.read_bytes())
    items = protocol.pool_images(root, ("pins",))
    assert len(items) == 8 and alice not in {p for p, _ in items}


class _StubDetector:
    """Always one face with the template landmarks scaled to the image: alignment is a resize."""

    def detect(self, image):
        from facerec.data.align import ARCFACE_TEMPLATE
        from facerec.data.detect import Detection

        h, w = image.shape[:2]
        lm = ARCFACE_TEMPLATE * np.array([w / 112.0, h / 112.0])
        return [Detection(np.array([0, 0, w, h], np.float32), 0.99, lm.astype(np.float32))]


def test_align_prune_removes_stale_files(world, tmp_path, monkeypatch):
    root, pins = world
    # real decodable images so alignment runs
    import cv2

    for f in pins.rglob("*.jpg"):
        rgb = np.random.default_rng(abs(hash(str(f))) % 2**32).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(f), rgb)
    out = tmp_path / "aligned"
    stale = out / "pins__Gone_Person" / "old.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    kept_extra = out / "align_report.json"
    kept_extra.write_text("{}")
    monkeypatch.setattr(align_cli, "make_detector", lambda *a, **k: _StubDetector())
    parser = argparse.ArgumentParser()
    align_cli.add_arguments(parser)
    args = parser.parse_args(["--preset", "pins", "--pins", str(pins), "--data", str(root), "--out", str(out),
                              "--prune", "--workers", "0", "--no-progress"])
    assert align_cli.run(args) == 0
    assert not stale.exists() and not stale.parent.exists()
    written = sorted(p.parent.name for p in out.rglob("*.jpg"))
    assert written.count("pins__Alice_Example") == 4 and "lfw__Pool_Shared" in written
    assert not any("Obama" in w or "Val_Person" in w for w in written)
    with pytest.raises(SystemExit, match="--limit"):
        align_cli.run(parser.parse_args(["--preset", "pins", "--pins", str(pins), "--data", str(root),
                                         "--out", str(out), "--prune", "--limit", "1"]))


def test_training_refuses_an_aligned_pool_with_a_held_out_person(world, tmp_path, monkeypatch):
    from facerec.data.folders import Sample
    from training.data import check_protocol_identities

    root, _ = world
    monkeypatch.setenv("FACEREC_DATA", str(root))
    ok = [Sample("a.jpg", 0, "lfw__Pool_0"), Sample("b.jpg", 1, "pins__Alice_Example")]
    assert check_protocol_identities(ok) is True
    with pytest.raises(AssertionError, match="LFW-H2 test"):
        check_protocol_identities(ok + [Sample("c.jpg", 2, "lfw__Test_4")])
    # a user's own tree (no source prefixes) is not the protocol pool: not checked
    assert check_protocol_identities([Sample("d.jpg", 0, "Test_4")]) is False
