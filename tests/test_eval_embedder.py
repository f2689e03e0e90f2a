"""Embedding helper (flip augmentation, cache) and the detection-metadata cache, with fake models."""

from __future__ import annotations

import numpy as np
import pytest

from facerec.eval.embedder import Embedder, embed_cached, embed_set, normalise_images
from facerec.eval.face_meta import FaceMeta

pytestmark = pytest.mark.timeout(60)


def _fake(calls: list) -> Embedder:
    """Embedding = mean of each image column band (depends on left/right), quality = mean pixel."""

    def run(x):
        calls.append(len(x))
        bands = x.mean(axis=(1, 2)).reshape(len(x), 4, -1).mean(axis=2)  # (N, 4) column bands
        return bands + np.arange(1, 5), x.mean(axis=(1, 2, 3))

    return Embedder(run, "fake", "f1", True)


def test_flip_embeds_the_mirror_and_normalises_the_sum(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    es = embed_set(_fake([]), images, flip=True, batch=2, progress=False)
    x = normalise_images(images)
    mirror = x[:, :, :, ::-1]
    bands = mirror.mean(axis=(1, 2)).reshape(5, 4, -1).mean(axis=2) + np.arange(1, 5)
    np.testing.assert_allclose(es.embedding_flip, bands, rtol=1e-5)
    assert not np.allclose(es.embedding, es.embedding_flip)  # the bands do see left and right

    def l2(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    np.testing.assert_allclose(es.normalised(True), l2(l2(es.embedding) + l2(es.embedding_flip)), rtol=1e-6)
    np.testing.assert_allclose(es.normalised(False), l2(es.embedding), rtol=1e-6)
    np.testing.assert_allclose(es.quality, x.mean(axis=(1, 2, 3)), rtol=1e-5)
    assert es.image_stats.shape == (5, 3)
    no_flip = embed_set(_fake([]), images, flip=False, progress=False)
    with pytest.raises(ValueError, match="without the mirrored"):
        no_flip.normalised(True)


def test_cache_is_reused_only_for_the_same_model_and_images(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    cache = tmp_path / "c.npz"
    calls: list = []
    first = embed_cached(_fake(calls), images, cache, flip=True, progress=False)
    n = len(calls)
    again = embed_cached(_fake(calls), images, cache, flip=False, progress=False)  # a flip cache serves
    assert len(calls) == n
    np.testing.assert_array_equal(again.embedding, first.embedding)
    other = images.copy()
    other[0, 0, 0, 0] ^= 1
    embed_cached(_fake(calls), other, cache, flip=True, progress=False)  # other images: recomputed
    assert len(calls) > n


def test_face_meta_select_save_load(tmp_path):
    n = 3
    boxes = np.array([[0, 0, 10, 20], [np.nan] * 4, [5, 5, 45, 35]], float)
    meta = FaceMeta(["a/1.jpg", "a/2.jpg", "b/1.jpg"], np.array([True, False, True]),
                    np.array([0.9, np.nan, 0.99]), boxes, np.zeros((n, 5, 2)), np.full((n, 2), 250.0))
    path = meta.save(tmp_path / "m.npz")
    back = FaceMeta.load(path).select(["b/1.jpg", "a/1.jpg"])
    assert back.keys == ["b/1.jpg", "a/1.jpg"]
    np.testing.assert_allclose(back.face_size, [30.0, 10.0])  # the shorter side of the box
    with pytest.raises(KeyError, match="c/1.jpg"):
        FaceMeta.load(path).select(["c/1.jpg"])
    with pytest.raises(ValueError):
        FaceMeta(["x"], np.zeros(2, bool), np.zeros(1), np.zeros((1, 4)), np.zeros((1, 5, 2)),
                 np.zeros((1, 2)))
