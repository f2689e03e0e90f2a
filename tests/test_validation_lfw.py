"""The trainer's `lfw_fold` validation set is the protocol's: the 600 listed pairs for accuracy,
all cross-identity pairs of the fold-5 people for TAR at FAR (needs the shared data)."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(300)


def _data():
    from facerec.data.protocol import has_lfw

    if not os.environ.get("FACEREC_DATA") or not has_lfw():
        pytest.skip("FACEREC_DATA with lfw/ (people.txt, pairs.txt, lfw-deepfunneled) is absent")


def test_lfw_fold_validation_uses_every_pair_for_tar_and_the_listed_pairs_for_accuracy(monkeypatch):
    _data()
    from facerec.data.protocol import validation_pairs, validation_people
    from training import validation
    from training.config import ValidationConfig

    monkeypatch.setattr(validation, "_load", lambda files, crop: files)  # the pair logic, not the pixels
    cfg = ValidationConfig(kind="lfw_fold", center_crop=150)
    pairs = validation.build_pairset(cfg, None)
    files = pairs.images
    names = np.array([f.parent.name for f in files])
    assert set(names) == set(validation_people())
    n = len(files)
    assert len(pairs) == n * (n - 1) // 2
    # labels from the names, first < second, every pair once
    np.testing.assert_array_equal(pairs.same, names[pairs.first] == names[pairs.second])
    assert np.all(pairs.first < pairs.second)
    # the numbers evaluate_lfw.py reports for the validation split (full data)
    assert (n, int(pairs.same.sum()), int((~pairs.same).sum())) == (1016, 1872, 513_748)
    # accuracy: exactly the 600 listed pairs, stratified 30 + 30 per fold
    listed = validation_pairs()
    mask = pairs.accuracy_mask
    assert mask.sum() == len(listed) == 600
    got = {(files[a].stem, files[b].stem) for a, b in zip(pairs.first[mask], pairs.second[mask])}
    want = {tuple(sorted(p.paths(files[0].parents[1])[k].stem for k in (0, 1))) for p in listed}
    assert got == want
    for k in range(cfg.folds):
        in_fold = mask & (pairs.folds == k)
        assert pairs.same[in_fold].sum() == 30 and (~pairs.same[in_fold]).sum() == 30
    assert np.all(pairs.folds[~mask] == -1)


def test_lfw_fold_validate_matches_a_direct_computation():
    """validate() on the real split with a small random model: accuracy from the listed pairs'
    stratified folds, TAR at 1e-3 and 1e-4 supported by all impostor pairs."""
    _data()
    import torch

    from facerec.eval.verification import kfold_accuracy, stratified_folds, tar_at_far
    from facerec.models import create_model
    from training import validation
    from training.config import ValidationConfig

    torch.manual_seed(0)
    model = create_model("mobilefacenet", width=0.5, embedding_size=128, downsample=2)
    cfg = ValidationConfig(kind="lfw_fold", center_crop=150, fars=[1e-3, 1e-4], batch_size=256)
    pairs = validation.build_pairset(cfg, None)
    result = validation.validate(model, pairs, cfg, torch.device("cpu"))
    emb = validation.embed(model, pairs.images, 256, torch.device("cpu"), flip=True)
    scores = np.sum(emb[pairs.first] * emb[pairs.second], axis=1)
    # the listed pairs in pairs.txt order, folds stratified in that order (as evaluate_lfw.py does)
    from facerec.data.protocol import validation_pairs

    index = {f.stem: i for i, f in enumerate(validation.lfw_fold_files(cfg))}
    listed = validation_pairs()
    a = [index[p.paths(validation.Path("."))[0].stem] for p in listed]
    b = [index[p.paths(validation.Path("."))[1].stem] for p in listed]
    same = np.array([p.same for p in listed])
    direct = kfold_accuracy(np.sum(emb[a] * emb[b], axis=1), same, stratified_folds(same, 10))
    np.testing.assert_allclose(result.kfold.accuracies, direct.accuracies)
    assert all(t.supported for t in result.tar) and result.num_impostors == 513_748
    expected = tar_at_far(scores[pairs.same], scores[~pairs.same], [1e-3, 1e-4])
    assert [t.tar for t in result.tar] == pytest.approx([t.tar for t in expected])


def test_pair_scores_in_chunks_equal_the_direct_cosine():
    from facerec.eval.verification import cosine_scores
    from training.validation import pair_scores

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 16))
    first, second = np.triu_indices(50, k=1)
    np.testing.assert_allclose(pair_scores(emb, first, second, chunk=97),
                               cosine_scores(emb[first], emb[second]), rtol=0, atol=1e-12)

