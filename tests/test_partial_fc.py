"""Partial FC: the full FC at sample rate 1, and the sampled variant's bookkeeping."""

import pytest
import torch
import torch.nn.functional as F

from facerec.heads import PartialFC, create_margin, shard_bounds
from facerec.losses import FaceRecognitionLoss

pytestmark = pytest.mark.timeout(120)


def test_shards_cover_every_class_once():
    for classes, world in [(10, 3), (7, 7), (93431, 8), (5, 2)]:
        bounds = [shard_bounds(classes, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [e - s for s, e in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_sample_rate_one_single_process_is_a_full_fc():
    torch.manual_seed(0)
    loss = FaceRecognitionLoss(20, 8, margin="arcface")
    embeddings = torch.randn(16, 8, requires_grad=True)
    labels = torch.randint(0, 20, (16,))
    loss(embeddings, labels).total.backward()

    weight = loss.centres.weight.detach().clone().requires_grad_()
    emb2 = embeddings.detach().clone().requires_grad_()
    logits = create_margin("arcface")(F.normalize(emb2) @ F.normalize(weight).t(), labels)
    F.cross_entropy(logits, labels).backward()
    torch.testing.assert_close(embeddings.grad, emb2.grad)
    torch.testing.assert_close(loss.centres.weight.grad, weight.grad)


def test_sampling_keeps_every_positive_and_scores_only_the_sample():
    torch.manual_seed(0)
    centres = PartialFC(1000, 8, sample_rate=0.1, seed=1)
    embeddings = torch.randn(32, 8)
    labels = torch.randint(0, 1000, (32,))
    out = centres(embeddings, labels)
    index = centres.last_sampled
    assert out.cosine.shape == (32, 100)
    assert set(labels.tolist()) <= set(index.tolist())
    assert torch.equal(index[out.local_labels], labels)  # labels remapped into the sample
    want = F.normalize(embeddings) @ F.normalize(centres.weight[index].detach()).t()
    torch.testing.assert_close(out.cosine, want)


def test_sampling_grows_to_hold_all_positives():
    centres = PartialFC(50, 4, sample_rate=0.1)
    labels = torch.arange(40)
    out = centres(torch.randn(40, 4), labels)
    assert out.cosine.shape[1] == 40


def test_sampled_gradients_only_reach_sampled_centres():
    centres = PartialFC(200, 4, sample_rate=0.2)
    loss = FaceRecognitionLoss(200, 4, sample_rate=0.2)
    out = loss(torch.randn(8, 4), torch.randint(0, 200, (8,)))
    out.total.backward()
    touched = loss.centres.weight.grad.abs().sum(dim=1) > 0
    assert set(touched.nonzero().flatten().tolist()) <= set(loss.centres.last_sampled.tolist())
    assert centres.num_local == 200


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(10, 4, sample_rate=0.0)
    with pytest.raises(ValueError, match="expected embeddings"):
        PartialFC(10, 4)(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))


def test_sampling_stream_survives_the_state_dict():
    centres = PartialFC(500, 4, sample_rate=0.1, seed=3)
    labels = torch.randint(0, 500, (8,))
    centres(torch.randn(8, 4), labels)
    state = centres.state_dict()
    centres(torch.randn(8, 4), labels)
    expected = centres.last_sampled
    resumed = PartialFC(500, 4, sample_rate=0.1, seed=99)
    resumed.load_state_dict(state)
    resumed(torch.randn(8, 4), labels)
    assert torch.equal(resumed.last_sampled, expected)
