"""Identity folders + manifest, torch datasets (folder and .rec), transforms, the DataLoader."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facerec.data.datasets import (
    EvalTransform,
    FolderDataset,
    RecDataset,
    TrainTransform,
    create_dataloader,
    denormalize,
    open_dataset,
    to_tensor,
)
from facerec.data.folders import (
    MANIFEST_NAME,
    load_or_build_manifest,
    read_manifest,
    verify_sha1,
)
from facerec.data.recordio import write_face_rec

pytestmark = pytest.mark.timeout(300)


def make_image(label: int, k: int) -> np.ndarray:
    """A 112x112 RGB image: red left half, a label-dependent green, blue varying with k."""
    image = np.zeros((112, 112, 3), np.uint8)
    image[:, :56, 0] = 220
    image[:, :, 1] = 40 + 50 * label
    image[:, :, 2] = 10 + 20 * k
    return image


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "faces"
    for label, name in enumerate(["alice", "bob", "carol"]):
        (root / name).mkdir(parents=True)
        for k in range(3):
            bgr = cv2.cvtColor(make_image(label, k), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(root / name / f"{k}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    (root / "notes.txt").write_text("not an identity")
    return root


def test_manifest_written_once_and_reused(tree):
    samples = load_or_build_manifest(tree, with_sha1=True)
    assert [s.identity for s in samples] == ["alice"] * 3 + ["bob"] * 3 + ["carol"] * 3
    assert [s.label for s in samples] == [0] * 3 + [1] * 3 + [2] * 3
    assert samples[0].path == "alice/0.jpg" and len(samples[0].sha1) == 40
    header = (tree / MANIFEST_NAME).read_text().splitlines()[0]
    assert header == "path,label,identity,sha1"
    assert read_manifest(tree / MANIFEST_NAME) == samples

    (tree / "dave").mkdir()
    cv2.imwrite(str(tree / "dave" / "0.png"), np.zeros((8, 8, 3), np.uint8))
    assert load_or_build_manifest(tree) == samples  # reused, not rescanned
    assert len(load_or_build_manifest(tree, rebuild=True)) == 10
    assert verify_sha1(tree, samples) == []
    (tree / "bob" / "1.jpg").write_bytes(b"changed")
    assert verify_sha1(tree, samples) == ["bob/1.jpg"]


def test_normalisation_and_colour_order():
    image = np.zeros((112, 112, 3), np.uint8)
    image[..., 0] = 255  # pure red
    x = to_tensor(image)
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    assert x[0].eq(1).all() and x[1].eq(-1).all() and x[2].eq(-1).all()
    assert torch.allclose(denormalize(x)[0], torch.full((112, 112), 255.0))
    half = to_tensor(np.full((4, 4, 3), 127, np.uint8))
    assert torch.allclose(half, torch.full_like(half, (127 / 255 - 0.5) / 0.5))


def test_transforms():
    image = make_image(1, 2)
    flipped = TrainTransform(flip_p=1.0)(image)
    assert torch.equal(flipped, to_tensor(image[:, ::-1]))
    assert torch.equal(TrainTransform(flip_p=0.0)(image), EvalTransform()(image))
    torch.manual_seed(0)
    jittered = torch.stack([TrainTransform(flip_p=0, photometric=0.3)(image) for _ in range(4)])
    assert jittered.min() >= -1 and jittered.max() <= 1
    assert not torch.equal(jittered[0], jittered[1])
    assert (jittered - EvalTransform()(image)).abs().mean() < 0.3  # light, not destructive
    grey_big = np.full((200, 160), 90, np.uint8)
    assert EvalTransform()(grey_big).shape == (3, 112, 112)


def test_folder_and_rec_datasets_agree(tree, tmp_path):
    folder = FolderDataset(tree)
    assert len(folder) == 9 and folder.num_classes == 3
    items = [((tree / s.path).read_bytes(), s.label) for s in folder.samples]
    write_face_rec(tmp_path / "rec", items)
    rec = RecDataset(tmp_path / "rec")
    assert len(rec) == 9 and rec.num_classes == 3
    for i in range(9):
        (a, la), (b, lb) = folder[i], rec[i]
        assert la == lb and torch.equal(a, b)  # same JPEG bytes -> same tensor
    x, label = rec[4]
    assert label == 1
    assert x[0, :, :40].mean() > 0.6 and x[0, :, 70:].mean() < -0.6  # red on the left: RGB
    assert isinstance(open_dataset(tmp_path / "rec"), RecDataset)
    assert isinstance(open_dataset(tmp_path / "rec" / "train.rec"), RecDataset)
    assert isinstance(open_dataset(tree), FolderDataset)


def test_dataloader_workers_and_distributed(tree, tmp_path):
    rec_items = [(make_image(i // 3, i % 3), i // 3) for i in range(9)]
    write_face_rec(tmp_path / "rec", rec_items)
    dataset = RecDataset(tmp_path / "rec", TrainTransform())
    loader = create_dataloader(dataset, batch_size=4, workers=2, pin_memory=False)
    assert loader.persistent_workers
    for _ in range(2):  # two epochs over the same persistent workers
        batches = list(loader)
        assert len(batches) == 2 and batches[0][0].shape == (4, 3, 112, 112)

    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        loader = create_dataloader(FolderDataset(tree), batch_size=2, workers=0, distributed=True)
        assert type(loader.sampler).__name__ == "DistributedSampler"
        loader.sampler.set_epoch(1)
        assert len(list(loader)) == 4
    finally:
        dist.destroy_process_group()


def test_exact_duplicates_are_removed_and_ambiguous_labels_dropped(tmp_path):
    from facerec.data.protocol import drop_exact_duplicates, exact_duplicates

    def write(name: str, content: bytes) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    items = [
        (write("a/1.jpg", b"alpha"), "a"),
        (write("a/2.jpg", b"alpha"), "a"),  # same file twice in one identity: keep one
        (write("a/3.jpg", b"gamma"), "a"),
        (write("b/1.jpg", b"gamma"), "b"),  # same file under two identities: drop both
        (write("b/2.jpg", b"delta"), "b"),
    ]
    assert len(exact_duplicates(items)) == 2
    kept = drop_exact_duplicates(items)
    assert [(p.relative_to(tmp_path).as_posix(), i) for p, i in kept] == [("a/1.jpg", "a"), ("b/2.jpg", "b")]


@pytest.mark.data
def test_the_shared_pool_has_no_exact_duplicates_left():
    from facerec.data import protocol

    if not protocol.has_lfw():
        pytest.skip("shared data (FACEREC_DATA) is absent")
    raw = protocol.pool_images(deduplicate=False)
    kept = protocol.pool_images()
    assert len(kept) < len(raw)
    assert protocol.exact_duplicates(kept) == []
