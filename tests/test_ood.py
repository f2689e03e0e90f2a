"""Mahalanobis OOD detector: streaming statistics against direct numpy formulas, metrics against
hand-computed cases, the combiner, calibration, persistence rules, pre-processing and attacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facerec.contract import ContractMismatchError, EmbeddingContract
from facerec.models import create_model
from facerec.ood import (
    IdentityMeansError,
    MahalanobisFitter,
    auroc,
    calibrate_threshold,
    detection_accuracy,
    fit_combiner,
    leave_one_family_out,
    load,
    save,
    select_by_validation,
    shrink,
    threshold_at_tpr,
    tnr_at_tpr,
)
from facerec.ood.attacks import brightness, fgsm, gaussian_blur, gaussian_noise, occlude, pgd
from facerec.ood.metrics import aupr_in, aupr_out

pytestmark = pytest.mark.timeout(300)

DIMS = (5, 7)


def _labelled_data(n=300, n_classes=6, seed=0, offset=100.0):
    """Two 'layers' of class-structured features with a large common offset (tests the shift)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    feats = []
    for d in DIMS:
        centres = rng.normal(0, 3, (n_classes, d))
        mix = rng.normal(0, 1, (d, d))
        feats.append(offset + centres[labels] + rng.normal(0, 1, (n, d)) @ mix)
    return feats, labels


def _stream(feats, labels, sizes):
    fitter, start = MahalanobisFitter(), 0
    for size in sizes:
        sl = slice(start, start + size)
        fitter.update([f[sl] for f in feats], None if labels is None else labels[sl])
        start += size
    assert start == len(feats[0])
    return fitter


def _direct_scores(f, means, cov):
    prec = np.linalg.inv(cov)
    d2 = np.stack([np.einsum("bi,ij,bj->b", f - m, prec, f - m) for m in means], axis=1)
    return -d2.min(axis=1)


def test_streaming_class_conditional_equals_direct_formula():
    feats, labels = _labelled_data()
    fitter = _stream(feats, labels, [37] * 8 + [4])
    det = fitter.finalize("class_conditional", shrinkage=0.05)
    rng = np.random.default_rng(1)
    classes = fitter.labels  # the order of the class means: sorted
    assert classes == sorted(set(labels.tolist()))
    for layer, f in zip(det.layers, feats):
        means = np.stack([f[labels == c].mean(0) for c in classes])
        centred = f - means[[classes.index(c) for c in labels]]
        cov = centred.T @ centred / len(f)  # the paper's tied Σ, 1/N
        np.testing.assert_allclose(layer.means, means, rtol=1e-10)
        np.testing.assert_allclose(layer.covariance, shrink(cov, 0.05), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(
            layer.covariance, cov + 0.05 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0]))
        probe = f[:20] + rng.normal(0, 2, f[:20].shape)
        np.testing.assert_allclose(layer.scores(probe).numpy(), _direct_scores(probe, means, layer.covariance),
                                   rtol=1e-8)


def test_streaming_global_and_prototypes_equal_direct_formulas():
    feats, labels = _labelled_data(n=600, n_classes=40)
    fitter = _stream(feats, labels, [100] * 6)
    glob = fitter.finalize("global", shrinkage=0.01)
    for layer, f in zip(glob.layers, feats):
        np.testing.assert_allclose(layer.means[0], f.mean(0), rtol=1e-12)
        np.testing.assert_allclose(layer.covariance, shrink(np.cov(f.T, bias=True), 0.01), rtol=1e-8)
    det = fitter.finalize("prototypes", n_prototypes=6, min_identities_per_prototype=5)
    for i, (layer, f) in enumerate(zip(det.layers, feats)):
        assign = fitter.assignments[i]  # identity -> prototype, kept in memory for inspection only
        assert layer.support.min() >= 5 and len(layer.means) <= 6
        ids = list(dict.fromkeys(labels.tolist()))
        id_means = {c: f[labels == c].mean(0) for c in ids}
        for k, proto in enumerate(layer.means):
            members = [c for c in ids if assign[c] == k]
            assert len(members) == layer.support[k]
            np.testing.assert_allclose(proto, np.mean([id_means[c] for c in members], axis=0), rtol=1e-10)
        centred = f - layer.means[[assign[c] for c in labels]]
        np.testing.assert_allclose(layer.covariance, shrink(centred.T @ centred / len(f), 0.01), rtol=1e-8)


def test_kmeans_merges_prototypes_of_too_few_people():
    from facerec.ood.mahalanobis import kmeans_min_support

    rng = np.random.default_rng(0)
    # 3 outlying people would make their own cluster: it must be merged into a larger one.
    z = np.vstack([rng.normal(size=(57, 4)), rng.normal(size=(3, 4)) + 100])
    assign = kmeans_min_support(z, 5, 10, rng)
    assert np.bincount(assign).min() >= 10 and assign.max() + 1 <= 5
    assert len(set(assign[-3:])) == 1 and np.sum(assign == assign[-1]) >= 10
    with pytest.raises(ValueError, match="distinct identities"):
        kmeans_min_support(z[:5], 2, 10, rng)


def test_chunking_does_not_change_the_statistics():
    feats, labels = _labelled_data(n=240, n_classes=30)
    a = _stream(feats, labels, [240])
    b = _stream(feats, labels, [1, 7, 32, 100, 100])
    probe = [f[::5] + 0.3 for f in feats]
    for variant in ("class_conditional", "global", "prototypes"):
        kw = {"min_identities_per_prototype": 4, "n_prototypes": 4}
        da, db = a.finalize(variant, **kw), b.finalize(variant, **kw)
        for la, lb in zip(da.layers, db.layers):
            np.testing.assert_allclose(la.means, lb.means, rtol=1e-10)
            np.testing.assert_allclose(la.covariance, lb.covariance, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(da.layer_scores(probe).numpy(), db.layer_scores(probe).numpy(), rtol=1e-8)


def test_shifted_gaussian_scores_lower_and_auroc_matches_analytic():
    stats = pytest.importorskip("scipy.stats")
    integrate = pytest.importorskip("scipy.integrate")
    rng = np.random.default_rng(0)
    d, shift = 8, 2.0  # non-centrality λ = ‖δ‖² = 4
    train = rng.normal(size=(20000, d))
    det = _stream([train], None, [5000] * 4).finalize("global", shrinkage=1e-6)
    s_in = det.layers[0].scores(rng.normal(size=(4000, d))).numpy()
    s_out = det.layers[0].scores(rng.normal(size=(4000, d)) + shift * np.eye(d)[0]).numpy()
    assert s_out.mean() < s_in.mean() - 3
    # -score is χ²_d for inliers and non-central χ²_d(λ) for the shifted set: AUROC = P(out > in).
    analytic, _ = integrate.quad(lambda t: stats.chi2.cdf(t, d) * stats.ncx2.pdf(t, d, shift**2), 0, np.inf)
    assert abs(auroc(s_in, s_out) - analytic) < 0.02, (auroc(s_in, s_out), analytic)


def test_shrinkage_gives_finite_scores_when_fewer_samples_than_dimensions():
    rng = np.random.default_rng(0)
    d, n = 64, 20
    f = rng.normal(size=(n, d))
    labels = np.arange(n) % 4
    for variant in ("global", "class_conditional"):
        det = _stream([f], labels, [n]).finalize(variant)
        cov = det.layers[0].covariance
        assert np.linalg.matrix_rank(f - f.mean(0)) < d and np.linalg.eigvalsh(cov).min() > 0
        s_near = det.layers[0].scores(f).numpy()
        s_far = det.layers[0].scores(rng.normal(size=(n, d)) * 3).numpy()
        assert np.all(np.isfinite(s_near)) and np.all(np.isfinite(s_far))
        assert s_near.mean() > s_far.mean()


def test_metrics_on_hand_computed_cases():
    # pairs (in, out): 1 vs (0,1,2) -> 1 + ½ + 0; 2 vs -> 1 + 1 + ½; 3 vs -> 3: 7/9 with ties at ½.
    assert auroc([1, 2, 3], [0, 1, 2]) == pytest.approx(7 / 9)
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0, 1], [2, 3]) == 0.0
    assert auroc([1, 1], [1, 1, 1]) == 0.5
    # 20 inliers 1..20: 95% pass means 19 pass, threshold 2; outliers below 2 are caught.
    s_in = np.arange(1, 21, dtype=float)
    assert threshold_at_tpr(s_in, 0.95) == 2.0
    assert tnr_at_tpr(s_in, [0, 1.5, 1.99, 2, 3], 0.95) == pytest.approx(3 / 5)
    assert detection_accuracy([2, 3], [0, 1]) == 1.0
    assert detection_accuracy([1, 3], [2, 0]) == pytest.approx(0.75)
    # AP, positives {3, 1}, negative {2}: thresholds 3 (P 1, R ½), 2 (P ½, R ½), 1 (P ⅔, R 1).
    assert aupr_in([3, 1], [2]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert aupr_in([1], [1]) == pytest.approx(0.5)  # a tie enters at one threshold
    assert aupr_out([3, 1], [2]) == pytest.approx(0.5)  # outlier ranked second of three


def test_combiner_beats_best_single_layer_on_complementary_layers():
    rng = np.random.default_rng(0)

    def sample(n):
        s_in = rng.normal(size=(n, 3))
        s_out = rng.normal(size=(n, 3)) + np.array([-1.0, -1.0, 0.0])  # layers 0, 1: independent evidence
        s_out[:, 2] = rng.normal(size=n)  # layer 2: no information
        return s_in * np.array([1.0, 50.0, 3.0]), s_out * np.array([1.0, 50.0, 3.0])  # different scales

    (tr_in, tr_out), (te_in, te_out) = sample(3000), sample(3000)
    comb = fit_combiner(tr_in, tr_out)
    best_single = max(auroc(te_in[:, j], te_out[:, j]) for j in range(3))
    combined = auroc(comb.decision(te_in), comb.decision(te_out))
    assert combined > best_single + 0.04, (combined, best_single)  # ≈ Φ(1)=0.84 vs Φ(1/√2)=0.76
    assert abs(comb.weights[2]) < 0.2 * min(abs(comb.weights[:2]))
    # torch and numpy give the same decision (the torch path serves adaptive attacks).
    np.testing.assert_allclose(comb.decision(torch.from_numpy(te_in)).numpy(), comb.decision(te_in))


def test_combiner_weighs_ood_groups_equally():
    rng = np.random.default_rng(1)
    s_in, a, b = rng.normal(size=(200, 2)), rng.normal(size=(50, 2)) - [2, 0], rng.normal(size=(50, 2)) - [0, 2]
    once = fit_combiner(s_in, np.vstack([a, b]), out_groups=[0] * 50 + [1] * 50)
    # Five copies of group a (e.g. five attack strengths) must not pull the fit toward it.
    many = fit_combiner(s_in, np.vstack([a] * 5 + [b]), out_groups=[0] * 250 + [1] * 50)
    np.testing.assert_allclose(many.weights, once.weights, rtol=1e-6)
    unweighted = fit_combiner(s_in, np.vstack([a] * 5 + [b]))
    assert unweighted.weights[0] > 1.5 * unweighted.weights[1]


@pytest.mark.parametrize("tpr", [0.95, 0.9, 0.5])
def test_threshold_calibration_reaches_requested_tpr(tpr):
    s = np.random.default_rng(3).normal(size=137)
    realised = np.mean(s >= calibrate_threshold(s, tpr))
    assert tpr <= realised < tpr + 1 / len(s)


def test_select_by_validation_and_leave_one_family_out():
    rng = np.random.default_rng(0)
    val_in, test_in = rng.normal(size=(400, 2)), rng.normal(size=(400, 2))
    # Family a shows in layer 0 only, family b in layer 1 only.
    fam = {"a": np.array([-3.0, 0.0]), "b": np.array([0.0, -3.0])}
    val = {k: rng.normal(size=(400, 2)) + v for k, v in fam.items()}
    test = {k: rng.normal(size=(400, 2)) + v for k, v in fam.items()}
    report = leave_one_family_out(val_in, val, test_in, test)
    # Fitted without its own family, each held-out family is detected worse than the seen one.
    assert set(report) == {"a", "b"}
    assert report["a"]["auroc"] < 0.8 and report["b"]["auroc"] < 0.8
    assert abs(report["a"]["tpr_at_val_threshold"] - 0.95) < 0.05
    best, table = select_by_validation({0.0: (val_in, val_in + 0.01), 0.1: (val_in, val["a"])})
    assert best == 0.1 and table[0.1] > table[0.0]


def _fitted(variant="prototypes", contract="c1"):
    rng = np.random.default_rng(0)
    feats, labels = _labelled_data(n=600, n_classes=60)
    det = _stream(feats, labels, [150] * 4).finalize(variant, min_identities_per_prototype=5,
                                                      contract_id=contract)
    s_in = det.layer_scores([f[:200] for f in feats]).numpy()
    s_out = det.layer_scores([f[:200] + rng.normal(0, 4, f[:200].shape) for f in feats]).numpy()
    det.combiner = fit_combiner(s_in, s_out)
    det.threshold, det.target_tpr = calibrate_threshold(det.combine(s_in), 0.95), 0.95
    return det, feats


def test_save_load_round_trip(tmp_path):
    det, feats = _fitted()
    path = tmp_path / "ood.npz"
    save(det, path)
    back = load(path, "c1")
    assert (back.variant, back.threshold, back.target_tpr, back.contract_id) == ("prototypes", det.threshold, 0.95, "c1")
    probe = [f[::7] for f in feats]
    np.testing.assert_array_equal(back.score(probe), det.score(probe))
    np.testing.assert_array_equal(back.layers[1].support, det.layers[1].support)
    assert back.meta == det.meta


def test_load_refuses_another_models_contract(tmp_path):
    contract = EmbeddingContract("mobilefacenet", "1", 512)
    det, _ = _fitted(contract=contract.contract_id)
    save(det, tmp_path / "ood.npz")
    assert load(tmp_path / "ood.npz", contract).contract_id == contract.contract_id
    other = EmbeddingContract("mobilefacenet", "2", 512)
    with pytest.raises(ContractMismatchError, match=contract.contract_id):
        load(tmp_path / "ood.npz", other)


def test_save_refuses_per_identity_means(tmp_path):
    det, _ = _fitted("class_conditional")
    with pytest.raises(IdentityMeansError, match="biometric templates"):
        save(det, tmp_path / "cc.npz")
    assert not (tmp_path / "cc.npz").exists()
    save(det, tmp_path / "cc.npz", allow_identity_means=True)  # research use, explicit
    # A "global" mean over fewer people than the minimum is a template too.
    feats, labels = _labelled_data(n=60, n_classes=3)
    few = _stream(feats, labels, [60]).finalize("global", min_identities_per_prototype=5, contract_id="c")
    with pytest.raises(IdentityMeansError):
        save(few, tmp_path / "few.npz")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return create_model("mobilefacenet", width=0.25, embedding_size=64).eval()


def _faces(n=12, seed=0):
    """Smooth random images (a random-init net behaves alike on them and on faces)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 14, 14, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=112, mode="bilinear", align_corners=False)


def test_input_preprocessing_raises_the_mahalanobis_score(tiny_model):
    with torch.no_grad():
        fit_feats = tiny_model(_faces(48, seed=1), return_features=True).features
    det = MahalanobisFitter().fit([fit_feats]).finalize("global")
    x = _faces(6, seed=2)
    clean = det.input_layer_scores(tiny_model, x, epsilon=0.0)
    # Small enough for the first-order picture to hold through a random-init net's deep layers.
    eps = 0.0005
    raised = det.input_layer_scores(tiny_model, x, epsilon=eps)
    lowered = det.input_layer_scores(tiny_model, x, epsilon=-eps)  # the opposite sign
    assert torch.all(raised > clean), raised - clean
    assert torch.all(lowered < clean), lowered - clean
    # The step is ε in pixel units: ε/0.5 in input units (then clipped to the valid range).
    for xt in det.preprocess(tiny_model, x, eps):
        assert (xt - x).abs().max() <= eps / 0.5 + 1e-6 and xt.abs().max() <= 1.0


def test_attacks_move_the_embedding_within_the_ball(tiny_model):
    x = _faces(4, seed=3)
    with torch.no_grad():
        clean = tiny_model(x).embedding
    cos = torch.nn.functional.cosine_similarity
    for eps in (2 / 255, 8 / 255):
        for x_adv in (fgsm(tiny_model, x, eps), pgd(tiny_model, x, eps, steps=3,
                                                     generator=torch.Generator().manual_seed(0))):
            assert (x_adv - x).abs().max() <= eps / 0.5 + 1e-6 and x_adv.abs().max() <= 1.0
            with torch.no_grad():
                moved = cos(tiny_model(x_adv).embedding, clean)
            assert torch.all(moved < 0.999) and moved.mean() < 0.99
    # Impersonation pulls each face toward another's embedding.
    target = clean.roll(1, dims=0)
    x_imp = pgd(tiny_model, x, 8 / 255, steps=3, target=target)
    with torch.no_grad():
        gained = cos(tiny_model(x_imp).embedding, target) - cos(clean, target)
    assert torch.all(gained > 0)


def test_corruptions_keep_the_valid_range():
    x = _faces(3)
    g = torch.Generator().manual_seed(0)
    for out in (gaussian_blur(x), gaussian_noise(x, generator=g), occlude(x, generator=g),
                brightness(x, 3.0), brightness(x, 0.15)):
        assert out.shape == x.shape and out.abs().max() <= 1.0 + 1e-6 and not torch.equal(out, x)


def test_adaptive_pgd_also_raises_the_detector_score(tiny_model):
    with torch.no_grad():
        fit_feats = tiny_model(_faces(48, seed=1), return_features=True).features
    det = MahalanobisFitter().fit([fit_feats]).finalize("global")
    x = _faces(4, seed=4)

    def detector_score(feats):  # any differentiable in-distribution score of the features
        return det.layer_scores(feats)[:, :3].sum(1)

    g = torch.Generator
    # Enough steps for the sign steps to follow the (deep, curved) detector score at all.
    plain = pgd(tiny_model, x, 8 / 255, steps=8, generator=g().manual_seed(0))
    adaptive = pgd(tiny_model, x, 8 / 255, steps=8, generator=g().manual_seed(0),
                   detector_score=detector_score, detector_weight=1.0)
    assert (adaptive - x).abs().max() <= 8 / 255 / 0.5 + 1e-6
    with torch.no_grad():
        s_plain = detector_score(tiny_model(plain, return_features=True).features)
        s_adaptive = detector_score(tiny_model(adaptive, return_features=True).features)
    assert s_adaptive.mean() > s_plain.mean() + 0.2 * s_plain.abs().mean(), (s_adaptive, s_plain)
