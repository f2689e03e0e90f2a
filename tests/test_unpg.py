"""UNPG against a brute-force loop over pairs and against explicit logit concatenation."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from facerec.heads import create_margin
from facerec.losses import FaceRecognitionLoss, negatives_logsumexp, unpg_negatives

pytestmark = pytest.mark.timeout(120)


def brute_force_negatives(features, labels, whisker):
    normed = [f / f.norm() for f in features]
    sims = [
        float(normed[i] @ normed[j])
        for i, j in itertools.combinations(range(len(labels)), 2)
        if labels[i] != labels[j] and labels[i] >= 0 and labels[j] >= 0
    ]
    ordered = sorted(sims)
    k = len(ordered)
    q1, q3 = ordered[int(0.25 * k)], ordered[int(0.75 * k)]
    lo, hi = q1 - whisker * (q3 - q1), q3 + whisker * (q3 - q1)
    return sorted(s for s in sims if lo <= s <= hi)


@pytest.mark.parametrize("whisker", [0.0, 0.5, 1.5])
def test_negatives_equal_a_brute_force_loop(whisker):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 8, generator=g, dtype=torch.float64)
    features[:3] *= -1  # a few outliers
    labels = torch.randint(0, 6, (40,), generator=g)
    labels[7] = -1
    got = sorted(unpg_negatives(features, labels, whisker=whisker).tolist())
    want = brute_force_negatives(features, labels.tolist(), whisker)
    assert len(got) == len(want)
    assert got == pytest.approx(want, abs=1e-12)


def test_quartiles_are_order_statistics_not_interpolated():
    # 1-D features: cosines are +-1, so choose 2-D unit vectors at chosen angles instead.
    angles = torch.tensor([0.0, 0.1, 0.25, 0.7, 1.5, 3.0], dtype=torch.float64)
    features = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    labels = torch.arange(6)
    sims = sorted(
        float(torch.cos(angles[i] - angles[j])) for i, j in itertools.combinations(range(6), 2)
    )
    k = len(sims)  # 15: int(0.25*15) = 3, int(0.75*15) = 11
    q1, q3 = sims[3], sims[11]
    kept = unpg_negatives(features, labels, whisker=0.0)
    assert sorted(kept.tolist()) == pytest.approx([s for s in sims if q1 <= s <= q3], abs=1e-12)
    assert k == 15


def test_gradients_flow_to_both_features_of_every_pair():
    torch.manual_seed(0)
    features = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    assert torch.autograd.gradcheck(
        lambda f: negatives_logsumexp(unpg_negatives(f, labels, whisker=10.0), 4.0), (features,)
    )
    negatives_logsumexp(unpg_negatives(features, labels, whisker=10.0), 4.0).backward()
    assert (features.grad.abs().sum(dim=1) > 0).all()


def test_no_negatives_adds_nothing():
    features = torch.randn(4, 3)
    empty = unpg_negatives(features, torch.zeros(4, dtype=torch.long))
    assert empty.numel() == 0
    assert negatives_logsumexp(empty, 64.0).item() == float("-inf")


@pytest.mark.parametrize("margin_name", ["arcface", "cosface", "elastic_cosface_plus"])
def test_loss_equals_explicit_concatenation(margin_name):
    torch.manual_seed(3)
    b, c, d = 24, 13, 16
    loss = FaceRecognitionLoss(c, d, margin=margin_name, unpg=True, margin_kwargs={"s": 16.0}).double()
    twin_margin = create_margin(margin_name, s=16.0).double()
    twin_margin.load_state_dict(loss.margin.state_dict())
    embeddings = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, c, (b,))
    out = loss(embeddings, labels)
    out.total.backward()

    # Reference: the published formulation, K logits appended to every row.
    emb2 = embeddings.detach().clone().requires_grad_()
    weight = loss.centres.weight.detach().clone().requires_grad_()
    cosine = F.normalize(emb2, dim=1) @ F.normalize(weight, dim=1).t()
    logits = twin_margin(cosine, labels)
    sn = unpg_negatives(emb2, labels, whisker=1.5)
    full = torch.cat([logits, 16.0 * sn.unsqueeze(0).expand(b, -1)], dim=1)
    reference = F.cross_entropy(full, labels)
    reference.backward()
    assert int(out.num_negatives) == sn.numel() > 0
    torch.testing.assert_close(out.total, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(embeddings.grad, emb2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.centres.weight.grad, weight.grad, rtol=1e-10, atol=1e-12)
