"""CR-FIQA-style head on frozen embeddings, and the model-free image heuristics."""

from __future__ import annotations

import numpy as np
import pytest

from facerec.eval.crfiqa_head import (
    QualityHead,
    certainty_ratio_targets,
    spearman,
    train_head,
)
from facerec.eval.image_measures import (
    combined_heuristic,
    exposure,
    image_statistics,
    percentile_rank,
)

pytestmark = pytest.mark.timeout(90)


def test_certainty_ratio_by_hand():
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0], [-0.6, 0.8], [5.0, 5.0]])
    ids = ["a", "a", "b", "b", "c"]  # c has one image: no centre, no target
    target, used = certainty_ratio_targets(emb, ids)
    assert used.tolist() == [True, True, True, True, False] and np.isnan(target[4])
    # image 0: own centre without itself = image 1 -> CCS 0.6; centre of b = (-0.6, 1.8)/|.|
    cb = np.array([-0.6, 1.8]) / np.linalg.norm([-0.6, 1.8])
    assert target[0] == pytest.approx(0.6 / (cb[0] + 1 + 1e-9))
    # image 2 (0, 1): own centre = image 3 -> CCS 0.8; centre of a = (1.6, 0.8)/|.|
    ca = np.array([1.6, 0.8]) / np.linalg.norm([1.6, 0.8])
    assert target[2] == pytest.approx(0.8 / (ca[1] + 1 + 1e-9))
    with pytest.raises(ValueError):
        certainty_ratio_targets(emb[:3], ["a", "a", "b"])  # one eligible identity


def test_head_learns_a_known_target(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 2000, 32
    x = rng.normal(size=(n, d)) * np.linspace(0.5, 3, d)  # unequal scales: standardisation matters
    target = np.tanh(x[:, 0] / 0.5 - x[:, 1] / 3) + 0.3 * (x[:, 2] / 1.0) ** 2 / 4
    groups = np.arange(n) // 3
    head = train_head(x[:1600], target[:1600], groups=groups[:1600], hidden=64, epochs=25, seed=1)
    pred = head.predict(x[1600:])
    assert spearman(pred, target[1600:]) > 0.9
    assert head.info["val_spearman"] > 0.9 and head.info["train_images"] + head.info["val_images"] == 1600
    # a random target cannot be learned: validation correlation near zero
    noise = train_head(x[:1000], rng.normal(size=1000), hidden=16, epochs=5, seed=2)
    assert abs(noise.info["val_spearman"]) < 0.3
    path = head.save(tmp_path / "head.npz")
    np.testing.assert_allclose(QualityHead.load(path).predict(x[:10]), head.predict(x[:10]))


def test_image_statistics_by_hand():
    grey = np.full((1, 3, 6, 6), 100.0)
    grey[0, :, 2, 2] = 140.0  # one bright pixel
    x = (grey - 127.5) / 127.5
    sharp, contrast, mean = image_statistics(x)[0]
    # Laplacian of the 4x4 interior: -160 at the spike, +40 at its 4 neighbours, 0 elsewhere (16 px)
    lap = np.r_[-160.0, [40.0] * 4, [0.0] * 11]
    assert sharp == pytest.approx(lap.var())
    assert mean == pytest.approx(100 + 40 / 36)
    assert contrast == pytest.approx(np.r_[140.0, [100.0] * 35].std())
    np.testing.assert_allclose(exposure([127.5, 27.5, 227.5]), [0.0, -100.0, -100.0])


def test_percentile_rank_and_combination():
    np.testing.assert_allclose(percentile_rank([3.0, 1.0, 2.0, 2.0]), [1.0, 0.0, 0.5, 0.5])
    assert percentile_rank([np.nan, 0.0, 1.0])[0] == 0.0  # unknown ranks lowest
    np.testing.assert_allclose(combined_heuristic([np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])]),
                               [0.5, 0.5, 0.5])
