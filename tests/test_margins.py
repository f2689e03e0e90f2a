"""Margins against a direct float64 re-derivation, ElasticFace statistics and "+" ranks."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from facerec.heads import create_margin, list_margins, margin_is_elastic
from facerec.heads.margins import arc_target_logit
from facerec.rng import SeededRNG

pytestmark = pytest.mark.timeout(120)

ARC = ["arcface", "elastic_arcface", "elastic_arcface_plus"]
OFFICIAL_DEFAULTS = {
    "arcface": dict(s=64.0, m=0.5),
    "cosface": dict(s=64.0, m=0.35),
    "elastic_arcface": dict(s=64.0, m=0.5, sigma=0.05),
    "elastic_cosface": dict(s=64.0, m=0.35, sigma=0.05),
    "elastic_arcface_plus": dict(s=64.0, m=0.5, sigma=0.0175),
    "elastic_cosface_plus": dict(s=64.0, m=0.35, sigma=0.02),
}


def reference_logits(cos: np.ndarray, labels: np.ndarray, margins: np.ndarray, s: float, kind: str):
    """Straight from the papers, one row at a time, in float64."""
    out = s * cos.copy()
    for i, y in enumerate(labels):
        if y < 0:
            continue
        c, m = cos[i, y], margins[i]
        if kind == "cos":
            out[i, y] = s * (c - m)
        else:
            theta = math.acos(c)
            out[i, y] = s * (math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m))
    return out


def test_registry_has_every_margin_with_official_defaults():
    assert list_margins() == sorted(OFFICIAL_DEFAULTS)
    for name, defaults in OFFICIAL_DEFAULTS.items():
        margin = create_margin(name)
        for key, value in defaults.items():
            assert getattr(margin, key) == pytest.approx(value), (name, key)
    with pytest.raises(ValueError, match="unknown margin 'nope'"):
        create_margin("nope")


@pytest.mark.parametrize("name", list_margins())
def test_the_registry_says_which_margins_are_elastic(name):
    """The loss asks the registry, not the name's spelling, whether a margin takes the run's seed:
    the answer must be what the built margin is (a seeded ElasticFace margin or not)."""
    elastic = isinstance(create_margin(name), SeededRNG)
    assert margin_is_elastic(name) is elastic
    if elastic:
        assert create_margin(name, seed=7).seed == 7


def test_the_loss_seeds_elastic_margins_only():
    from facerec.losses.face_loss import FaceRecognitionLoss

    assert FaceRecognitionLoss(10, 8, margin="elastic_cosface", seed=5).margin.seed == 5
    assert not isinstance(FaceRecognitionLoss(10, 8, margin="cosface", seed=5).margin, SeededRNG)
    with pytest.raises(ValueError, match="unknown margin 'elastic_nope'"):
        FaceRecognitionLoss(10, 8, margin="elastic_nope")


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_fixed_margins_match_the_formula(name):
    g = torch.Generator().manual_seed(1)
    cos = torch.rand(64, 11, generator=g, dtype=torch.float64) * 1.98 - 0.99
    cos[0, 3] = -0.99  # theta + m > pi: the fallback branch
    labels = torch.randint(0, 11, (64,), generator=g)
    labels[0], labels[5] = 3, -1
    margin = create_margin(name, s=30.0)
    got = margin(cos, labels).numpy()
    kind = "cos" if name == "cosface" else "arc"
    want = reference_logits(cos.numpy(), labels.numpy(), np.full(64, margin.m), 30.0, kind)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["elastic_arcface", "elastic_cosface", "elastic_arcface_plus",
                                  "elastic_cosface_plus"])
def test_elastic_margins_match_the_formula_with_the_drawn_margins(name):
    g = torch.Generator().manual_seed(2)
    cos = torch.rand(128, 7, generator=g, dtype=torch.float64) * 1.9 - 0.95
    labels = torch.randint(0, 7, (128,), generator=g)
    margin = create_margin(name, s=64.0, sigma=0.1, seed=5).train()
    twin = create_margin(name, s=64.0, sigma=0.1, seed=5).train()
    got = margin(cos, labels)
    rows = torch.arange(128)
    drawn = twin.margins(cos[rows, labels], labels >= 0).double().numpy()
    kind = "cos" if "cosface" in name else "arc"
    want = reference_logits(cos.numpy(), labels.numpy(), drawn, 64.0, kind)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(OFFICIAL_DEFAULTS))
def test_gradients_are_finite_at_cos_plus_minus_one(name):
    cos = torch.tensor([[1.0, 0.2], [-1.0, 0.3], [0.5, 1.0], [0.1, -1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    create_margin(name).train()(cos, labels).sum().backward()
    assert torch.isfinite(cos.grad).all()


@pytest.mark.parametrize("name", ["arcface", "cosface", "elastic_arcface_plus"])
def test_gradcheck(name):
    torch.manual_seed(0)
    cos = (torch.rand(6, 5, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    labels = torch.tensor([0, 1, 2, -1, 4, 3])
    margin = create_margin(name, s=8.0).eval()  # eval: elastic margins fixed, so f is a function
    assert torch.autograd.gradcheck(lambda c: margin(c, labels), (cos,))


@pytest.mark.parametrize("name", ARC)
def test_target_logit_is_non_increasing_in_theta_up_to_m_plus_4_sigma(name):
    margin = create_margin(name)
    sigma = getattr(margin, "sigma", 0.0)
    theta = torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)
    for m in np.linspace(0.0, margin.m + 4 * sigma, 9):
        logit = arc_target_logit(torch.cos(theta), torch.full_like(theta, m))
        steps = logit[1:] - logit[:-1]
        assert (steps <= 1e-12).all(), f"{name}: increases at m={m:.3f}"


def test_elastic_draws_fresh_per_sample_per_step_with_the_right_statistics():
    margin = create_margin("elastic_arcface", m=0.5, sigma=0.05, seed=3).train()
    cos_t = torch.zeros(200_000)
    first = margin.margins(cos_t, torch.ones_like(cos_t, dtype=torch.bool))
    second = margin.margins(cos_t, torch.ones_like(cos_t, dtype=torch.bool))
    assert first.mean().item() == pytest.approx(0.5, abs=1e-3)
    assert first.std().item() == pytest.approx(0.05, rel=0.02)
    assert not torch.equal(first, second)  # fresh every step
    assert first[:1000].unique().numel() == 1000  # per sample
    margin.eval()
    assert torch.all(margin.margins(cos_t[:10], torch.ones(10, dtype=torch.bool)) == 0.5)


@pytest.mark.parametrize("name", ["elastic_arcface_plus", "elastic_cosface_plus"])
def test_plus_is_rank_consistent_and_only_reorders_the_draws(name):
    margin = create_margin(name, sigma=0.05, seed=11).train()
    twin = create_margin(name, sigma=0.05, seed=11).train()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        cos_t = torch.rand(64, generator=g) * 2 - 1
        valid = torch.ones(64, dtype=torch.bool)
        assigned = margin.margins(cos_t, valid)
        drawn = twin.draw(64, cos_t.device)
        rho = spearmanr(cos_t.numpy(), assigned.numpy()).statistic
        assert rho == pytest.approx(-1.0, abs=1e-12)
        torch.testing.assert_close(assigned.sort().values, drawn.sort().values)


def test_plus_ranks_only_valid_rows():
    margin = create_margin("elastic_arcface_plus", sigma=0.05).train()
    cos_t = torch.rand(40) * 2 - 1
    valid = torch.arange(40) % 3 != 0
    assigned = margin.margins(cos_t, valid)
    rho = spearmanr(cos_t[valid].numpy(), assigned[valid].numpy()).statistic
    assert rho == pytest.approx(-1.0, abs=1e-12)


def test_official_plus_assignment_is_not_rank_consistent():
    """The published code indexes with the permutation instead of its inverse (methods.md §1.1)."""
    margin = create_margin("elastic_arcface_plus", official_plus_bug=True).train()
    g = torch.Generator().manual_seed(0)
    rhos = []
    for _ in range(300):
        cos_t = torch.rand(64, generator=g) * 2 - 1
        rhos.append(spearmanr(cos_t.numpy(), margin.margins(cos_t, torch.ones(64, dtype=torch.bool)).numpy()).statistic)
    assert abs(float(np.mean(rhos))) < 0.1


def test_generator_state_survives_the_state_dict():
    margin = create_margin("elastic_cosface", seed=9).train()
    margin.draw(100, torch.device("cpu"))
    state = margin.state_dict()
    expected = margin.draw(10, torch.device("cpu"))
    fresh = create_margin("elastic_cosface", seed=123).train()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.draw(10, torch.device("cpu")), expected)


def test_half_precision_inputs_compute_in_float32():
    cos = (torch.rand(4, 6) * 2 - 1).half()
    out = create_margin("arcface")(cos, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="expected cosine"):
        create_margin("arcface")(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
