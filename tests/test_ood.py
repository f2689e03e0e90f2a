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
from facerec.ood.attacks import (
    brightness,
    fgsm,
    gaussian_blur,
    gaussian_noise,
    occlude,
    pgd,
)
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
        np.testing.assert_allclose(layer.scores(probe).numpy(),
                                   _direct_scores(probe, means, layer.covariance),
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
    s_in = rng.normal(size=(200, 2))
    a, b = rng.normal(size=(50, 2)) - [2, 0], rng.normal(size=(50, 2)) - [0, 2]
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
    assert (back.variant, back.threshold, back.target_tpr, back.contract_id) == (
        "prototypes", det.threshold, 0.95, "c1")
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


def test_adaptive_pgd_on_a_model_without_feature_taps_reads_the_embedding(tiny_model):
    """An imported recognizer (model 2.1's dlib ResNet) has no feature taps: its detector is fitted on
    the raw embedding, and the adaptive attack's detector term must read that embedding too."""
    from facerec.models import FaceOutput

    class EmbeddingOnly(torch.nn.Module):
        def forward(self, x, return_features=False):
            out = tiny_model(x)
            return FaceOutput(out.embedding, None, [] if return_features else None)

    model = EmbeddingOnly()
    with torch.no_grad():
        det = MahalanobisFitter().fit([[model(_faces(48, seed=1)).embedding]]).finalize("global")
    x = _faces(4, seed=4)

    def detector_score(feats):
        assert len(feats) == 1 and feats[0].shape == (4, tiny_model.embedding_size)
        return det.layer_scores(feats)[:, 0]

    g = torch.Generator
    plain = pgd(model, x, 8 / 255, steps=8, generator=g().manual_seed(0))
    adaptive = pgd(model, x, 8 / 255, steps=8, generator=g().manual_seed(0), detector_score=detector_score,
                   detector_weight=1.0)
    with torch.no_grad():
        s_plain, s_adaptive = (det.layer_scores([model(a).embedding])[:, 0] for a in (plain, adaptive))
    assert s_adaptive.mean() > s_plain.mean()


# --- pixel statistics, one-sided layers, attacks through the alignment, service-path inputs -------


def _pixel_stats_direct(x: np.ndarray, block: int = 8, delta: float = 1e-6) -> np.ndarray:
    """The docstring of facerec/models/pixel_stats.py, written out in float64 numpy with loops."""
    out = []
    for img in x.astype(np.float64):
        r, g, b = img
        row = []
        chans = [(r + g + b) / 3, r - g, b - (r + g) / 2]
        for kind in ("box3", "dx", "dy"):
            for c in chans:
                if kind == "box3":
                    p = np.pad(c, 1, mode="edge")
                    h, w = c.shape
                    box = sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9
                    res = c - box
                elif kind == "dx":
                    res = c[:, 1:] - c[:, :-1]
                else:
                    res = c[1:, :] - c[:-1, :]
                nh, nw = res.shape[0] // block, res.shape[1] // block
                e = np.array([[np.mean(res[i * block : (i + 1) * block, j * block : (j + 1) * block] ** 2)
                               for j in range(nw)] for i in range(nh)]).ravel()
                le = np.log(e + delta)
                row += [le.mean(), le.std(), np.log(e.mean() + delta)]
        out.append(row)
    return np.array(out)


def test_pixel_stats_match_the_direct_formula():
    from facerec.models.pixel_stats import (
        PIXEL_STATS_DIM,
        pixel_stats,
        pixel_stats_names,
    )

    g = torch.Generator().manual_seed(0)
    x = (_faces(3, seed=5) + 0.05 * torch.randn(3, 3, 112, 112, generator=g)).clamp(-1, 1)
    x[2] = x[2].mean(0, keepdim=True)  # a grey image: chroma residuals are exactly 0
    got = pixel_stats(x).double().numpy()
    want = _pixel_stats_direct(x.numpy())
    assert got.shape == (3, PIXEL_STATS_DIM) == (3, len(pixel_stats_names()))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    grey = dict(zip(pixel_stats_names(), got[2]))
    assert grey["dx/R-G/log_mean"] == pytest.approx(np.log(1e-6), abs=1e-5)
    # Sign noise of 4 grey levels (what FGSM adds) raises every chroma statistic of a smooth image.
    smooth = _faces(1, seed=8)
    noisy = (smooth + (torch.randint(0, 2, smooth.shape, generator=g) * 2 - 1) * 8 / 255).clamp(-1, 1)
    up = pixel_stats(noisy)[0] - pixel_stats(smooth)[0]
    means = [i for i, n in enumerate(pixel_stats_names()) if "/Y/" not in n and not n.endswith("std_log")]
    assert torch.all(up[means] > 0.2), up


def test_vit_features_end_with_the_pixel_statistics():
    from facerec.models.pixel_stats import PIXEL_STATS_DIM, pixel_stats

    torch.manual_seed(0)
    model = create_model("vit_tiny_fiqa", depth=2).eval()
    x = _faces(2, seed=6)
    with torch.no_grad():
        feats = model(x, return_features=True).features
    assert model.feature_dims[-1] == PIXEL_STATS_DIM and len(feats) == len(model.feature_dims)
    torch.testing.assert_close(feats[-1], pixel_stats(x))
    plain = create_model("vit_tiny_fiqa", depth=2, pixel_stats=False)
    assert len(plain.feature_dims) == len(model.feature_dims) - 1
    # No weights: checkpoints saved without the pixel statistics still load strictly.
    assert not any(k.startswith("pixel_stats") for k in model.state_dict())


def test_one_sided_layer_equals_the_direct_formula():
    feats, labels = _labelled_data(n=400, n_classes=20)
    fitter = _stream(feats, labels, [64] * 6 + [16])
    det = fitter.finalize("global", shrinkage=0.02, one_sided=[1])
    two = fitter.finalize("global", shrinkage=0.02)
    assert det.layers[0].floor is None
    floor = feats[1].mean(0)
    np.testing.assert_allclose(det.layers[1].floor, floor, rtol=1e-10)
    rng = np.random.default_rng(2)
    probe = feats[1][:30] + rng.normal(0, 3, feats[1][:30].shape)
    want = _direct_scores(np.maximum(probe, floor), det.layers[1].means, det.layers[1].covariance)
    np.testing.assert_allclose(det.layers[1].scores(probe).numpy(), want, rtol=1e-9)
    # Anything at or below the floor in every coordinate is as typical as the mean itself...
    below = floor - np.abs(rng.normal(0, 5, (10, len(floor))))
    np.testing.assert_allclose(det.layers[1].scores(below).numpy(), 0.0, atol=1e-9)
    assert np.all(two.layers[1].scores(below).numpy() < -1.0)  # ...unlike the two-sided layer
    # ...and the untouched layer is unchanged; the floor survives save/load.
    np.testing.assert_array_equal(det.layers[0].scores(feats[0]).numpy(),
                                  two.layers[0].scores(feats[0]).numpy())
    with pytest.raises(ValueError, match="out of range"):
        fitter.finalize("global", one_sided=[5])


def test_save_load_keeps_the_one_sided_floor(tmp_path):
    feats, labels = _labelled_data(n=600, n_classes=60)
    det = _stream(feats, labels, [600]).finalize("prototypes", min_identities_per_prototype=5,
                                                 contract_id="c", one_sided=[0])
    save(det, tmp_path / "ood.npz")
    back = load(tmp_path / "ood.npz", "c")
    np.testing.assert_array_equal(back.layers[0].floor, det.layers[0].floor)
    assert back.layers[1].floor is None
    probe = [f[::3] - 5 for f in feats]
    np.testing.assert_array_equal(back.layer_scores(probe).numpy(), det.layer_scores(probe).numpy())


def test_alignment_warp_matches_norm_crop_and_passes_gradients():
    import cv2

    from facerec.data.align import ARCFACE_TEMPLATE, estimate_norm
    from facerec.ood.attacks import AlignmentWarp

    rng = np.random.default_rng(0)
    photo = cv2.GaussianBlur(rng.integers(0, 256, (150, 140, 3)).astype(np.uint8), (0, 0), 1.5)
    lms = [ARCFACE_TEMPLATE * 0.9 + [20, 15], ARCFACE_TEMPLATE * 1.1 - [30, 10] + rng.normal(0, 2, (5, 2))]
    mats = np.stack([estimate_norm(lm) for lm in lms])  # the second crop reaches outside the photo
    x = torch.from_numpy(np.stack([photo, photo])).permute(0, 3, 1, 2).double() / 127.5 - 1
    x.requires_grad_(True)
    crops = AlignmentWarp(mats, photo.shape[:2])(x)
    for i, m in enumerate(mats):
        want = cv2.warpAffine(photo, m, (112, 112), borderValue=0.0).astype(np.float64)
        got = (crops[i].detach().permute(1, 2, 0).numpy() + 1) * 127.5
        assert np.abs(got - want).max() <= 0.51  # cv2 rounds its output (and its weights to 1/32)
    assert (crops[1].detach() == -1).any()  # black outside the photo, as borderValue=0
    crops.sum().backward()
    assert x.grad.abs().sum() > 0 and torch.all(x.grad[0, :, :5, :5] == 0)  # a corner never sampled


def test_pgd_through_the_alignment_stays_in_the_photo_ball(tiny_model):
    from facerec.data.align import ARCFACE_TEMPLATE, estimate_norm
    from facerec.ood.attacks import AlignmentWarp

    photos = torch.nn.functional.interpolate(_faces(2, seed=7), size=150, mode="bilinear",
                                             align_corners=False)
    warp = AlignmentWarp(np.stack([estimate_norm(ARCFACE_TEMPLATE + 19)] * 2), (150, 150))
    eps = 8 / 255
    adv = pgd(tiny_model, photos, eps, steps=3, generator=torch.Generator().manual_seed(0),
              input_transform=warp)
    assert (adv - photos).abs().max() <= eps / 0.5 + 1e-6 and adv.abs().max() <= 1.0
    with torch.no_grad():
        moved = torch.nn.functional.cosine_similarity(tiny_model(warp(adv)).embedding,
                                                      tiny_model(warp(photos)).embedding)
    assert torch.all(moved < 0.999)
    # Dodging away from another image's embedding (a gallery entry): a real gradient at the start.
    with torch.no_grad():
        gallery = tiny_model(warp(photos.flip(3))).embedding
    one = fgsm(tiny_model, photos, eps, input_transform=warp, reference=gallery)
    changed = (one - photos).abs() > 1e-6
    assert changed[:, :, 40:110, 40:110].float().mean() > 0.9  # the face region is perturbed...
    assert not changed[:, :, :10, :10].any()  # ...pixels the crop never samples are not


def test_service_locator_and_corruptions():
    from facerec.contract import EmbeddingContract
    from facerec.data.align import norm_crop
    from facerec.data.datasets import read_rgb
    from facerec.eval.ood_study import families as ev

    sample = sorted((__import__("pathlib").Path(__file__).parent / "data" / "lfw_sample").glob("*/*.jpg"))[:2]
    photos = np.stack([read_rgb(p) for p in sample])
    loc = ev.ServiceLocator(EmbeddingContract("m", "1", 8))
    found = [loc.locate(p) for p in photos]
    assert all(f is not None for f in found)
    for p, (crop, lm, score) in zip(photos, found):
        np.testing.assert_array_equal(crop, norm_crop(p, lm))  # the service's crop of its largest face
        assert 0.9 < score <= 1.0  # MTCNN's confidence in a frontal LFW face
    assert loc.detector_name == "mtcnn"
    blank = np.full((100, 100, 3), 128, np.uint8)
    s = loc.crops([photos[0], blank, photos[1]])
    assert (s.offered, len(s.crops), s.rejected, s.source.tolist()) == (3, 2, 1, [0, 2])
    np.testing.assert_array_equal(s.det_score, [found[0][2], found[1][2]])  # one per kept crop
    # Occlusion: ~40% of the face square, random noise, nothing changed outside it.
    lms = np.stack([f[1] for f in found])
    occ = ev.occlude_boxes(photos, lms, 0.4, np.random.default_rng(0))
    for i, lm in enumerate(lms):
        changed = np.any(occ[i] != photos[i], axis=2)
        half = max(lm.max(0) - lm.min(0))
        ys, xs = np.nonzero(changed)
        c = lm.mean(0)
        assert xs.min() >= c[0] - half - 1 and xs.max() <= c[0] + half and ys.min() >= c[1] - half - 1
        assert 0.3 < changed.sum() / (2 * half) ** 2 < 0.45
    for name, imgs in ev.controls(photos, 0).items():
        assert len(imgs) == 2 and all(np.asarray(im).dtype == np.uint8 for im in imgs), name
    assert ev.controls(photos, 0)["ctl_grey"][0].std(axis=2).max() == 0
    np.testing.assert_array_equal(ev.to_uint8(ev.to_input(photos)), photos)


def test_combiner_ceiling_caps_every_layer_at_a_quantile_of_genuine_scores():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(size=(400, 3)), rng.normal(size=(300, 3)) - 2.0
    comb = fit_combiner(s_in, s_out, ceiling_quantile=0.5)
    np.testing.assert_allclose(comb.ceiling, np.median(s_in, axis=0))
    probe = rng.normal(size=(20, 3)) * 3
    want = ((np.minimum(probe, comb.ceiling) - comb.mean) / comb.std) @ comb.weights + comb.bias
    np.testing.assert_allclose(comb.decision(probe), want, rtol=1e-12)
    np.testing.assert_allclose(comb.decision(torch.from_numpy(probe)).numpy(), want, rtol=1e-12)
    # Raising a layer above its ceiling buys nothing; lowering any layer costs.
    up = probe.copy()
    up[:, 0] = comb.ceiling[0] + 50
    at = probe.copy()
    at[:, 0] = comb.ceiling[0]
    np.testing.assert_allclose(comb.decision(up), comb.decision(at))
    assert np.all(comb.decision(at - [1, 0, 0]) < comb.decision(at))
    with pytest.raises(ValueError, match="ceiling_quantile"):
        fit_combiner(s_in, s_out, ceiling_quantile=0.0)


def test_ceiling_stops_hyper_typical_layers_from_hiding_an_atypical_one(tmp_path):
    from facerec.ood import select_ceiling_quantile

    rng = np.random.default_rng(1)

    def split(n):
        faces = rng.normal(size=(n, 2))
        fams = {"a": np.c_[rng.normal(-4, 1, n), rng.normal(size=n)],
                "b": np.c_[rng.normal(size=n), rng.normal(-4, 1, n)],
                # c: hyper-typical in layer 0 (what an adaptive attack produces), atypical in layer 1
                "c": np.c_[rng.normal(4, 0.5, n), rng.normal(-3, 1, n)]}
        return faces, fams

    (val_in, val), (test_in, test) = split(300), split(300)
    plain = leave_one_family_out(val_in, val, test_in, test)
    capped = leave_one_family_out(val_in, val, test_in, test, ceiling_candidates=(None, 0.5))
    assert plain["c"]["auroc"] < 0.5, plain["c"]["auroc"]
    assert capped["c"]["auroc"] > 0.93, capped["c"]["auroc"]
    assert capped["c"]["ceiling_quantile"] == 0.5  # chosen on a and b's validation halves only
    best, table = select_ceiling_quantile(val_in, val, (None, 0.5))
    assert best == 0.5 and table[0.5] > table[None]
    # The ceiling survives save / load with the detector.
    feats, labels = _labelled_data(n=300, n_classes=30)
    det = _stream(feats, labels, [300]).finalize("prototypes", min_identities_per_prototype=5,
                                                 contract_id="c")
    s = det.layer_scores(feats).numpy()
    det.combiner = fit_combiner(s, s - 5, ceiling_quantile=0.25)
    det.threshold, det.target_tpr = calibrate_threshold(det.combine(s), 0.95), 0.95
    save(det, tmp_path / "ood.npz")
    back = load(tmp_path / "ood.npz", "c")
    np.testing.assert_array_equal(back.combiner.ceiling, det.combiner.ceiling)
    np.testing.assert_array_equal(back.score(feats), det.score(feats))
    # Nothing to hold out with one family left: the first candidate, no table.
    assert select_ceiling_quantile(val_in, {"a": val["a"]}, (0.25, None)) == (0.25, {})


def test_attack_plan_pairs_each_face_with_its_gallery_photo_and_another_person():
    from facerec.eval.ood_study.splits import attack_plan, family

    names = ["a", "b", "a", "c", "d", "d", "b", "e"]
    att, gal, tgt = attack_plan(names, 10)
    assert att.tolist() == [0, 1, 2, 4, 5, 6]  # c and e have one photo: no gallery entry, not attacked
    for i, g, t in zip(att, gal, tgt):
        assert names[g] == names[i] and g != i and names[t] != names[i] and t in att
    assert attack_plan(names, 3)[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="too few people"):
        attack_plan(["a", "a", "b"], 5)
    assert [family(n) for n in ("fgsm@4/photo", "adaptive@4/crop/w10", "cifar")] == ["fgsm", "adaptive", "cifar"]


def _with_detection_layer(det, feats, neutral=5.0):
    """Refit ``det``'s combiner with the face detector's confidence as a last column: genuine faces
    detected at ~0.999, the OOD sample at ~0.8 (as non-faces that pass MTCNN are)."""
    from facerec.ood import DetectionLayer

    rng = np.random.default_rng(1)
    det.detection = DetectionLayer("mtcnn", neutral)
    p_in = 1.0 - 10 ** rng.uniform(-5, -2.5, 200)
    p_out = rng.uniform(0.7, 0.9, 200)
    s_in = det.layer_scores([f[:200] for f in feats], p_in).numpy()
    s_out = det.layer_scores([f[:200] for f in feats], p_out).numpy()  # same features: only p differs
    det.combiner = fit_combiner(s_in, s_out, ceiling_quantile=0.25)
    det.threshold = calibrate_threshold(det.combine(s_in), 0.95)
    return det


def test_detection_layer_is_the_logit_of_the_detector_confidence_and_neutral_without_one():
    from facerec.ood import DetectionLayer

    layer = DetectionLayer("mtcnn", neutral=4.25)
    p = np.array([0.5, 0.9, 0.999, 1.0, 0.0, np.nan])
    col = layer.scores(p, 6).numpy()
    clip = np.clip(p[:5], 1e-6, 1 - 1e-6)
    np.testing.assert_allclose(col[:5], np.log(clip / (1 - clip)), rtol=1e-12)  # direct formula
    assert col[0] == 0.0 and col[3] == pytest.approx(np.log(1e6 - 1)) and col[5] == 4.25  # NaN: neutral
    np.testing.assert_array_equal(layer.scores(None, 3).numpy(), [4.25] * 3)
    with pytest.raises(ValueError, match="2 detector scores for 3 faces"):
        layer.scores([0.9, 0.9], 3)


def test_detection_layer_column_enters_the_combiner_and_survives_save_load(tmp_path):
    det, feats = _fitted()
    n_layers = len(det.layers)
    det = _with_detection_layer(det, feats)
    assert det.n_columns == n_layers + 1
    probe = [f[:40] for f in feats]
    cols = det.layer_scores(probe, np.full(40, 0.8)).numpy()
    assert cols.shape == (40, n_layers + 1)
    np.testing.assert_allclose(cols[:, :-1], np.stack([g.scores(f).numpy() for g, f in zip(det.layers, probe)], 1))
    np.testing.assert_allclose(cols[:, -1], np.log(0.8 / 0.2))
    # Same features: a borderline detection is flagged, a confident one and a missing one are not.
    low, high, missing = det.score(probe, np.full(40, 0.8)), det.score(probe, np.full(40, 0.9999)), det.score(probe)
    assert np.mean(det.is_ood(low)) > 0.9 and np.mean(det.is_ood(high)) < 0.2
    np.testing.assert_allclose(missing, det.score(probe, np.full(40, np.nan)))
    assert np.all(missing > low)
    # The ceiling makes the column one-sided: beyond typical confidence, more buys nothing.
    np.testing.assert_array_equal(det.score(probe, np.full(40, 1 - 1e-5)), det.score(probe, np.full(40, 1.0)))
    save(det, tmp_path / "ood.npz")
    back = load(tmp_path / "ood.npz", "c1")
    assert (back.detection.detector, back.detection.neutral) == ("mtcnn", 5.0)
    np.testing.assert_array_equal(back.score(probe, np.full(40, 0.8)), low)
    np.testing.assert_array_equal(back.score(probe), missing)


def test_load_refuses_a_combiner_that_reads_other_columns(tmp_path):
    det, feats = _fitted()
    det = _with_detection_layer(det, feats)
    det.detection = None  # a combiner fitted with the detection column, saved without the layer
    save(det, tmp_path / "ood.npz")
    with pytest.raises(ValueError, match="reads 3 columns, the detector has 2"):
        load(tmp_path / "ood.npz", "c1")


def test_service_scorer_reads_detector_scores_only_from_the_detector_it_was_calibrated_on(caplog):
    from facerec.runtime.pipeline import FeatureListScorer

    det, feats = _fitted()
    det = _with_detection_layer(det, feats)
    outputs = {f"feature_{i}": f[:30] for i, f in enumerate(feats)}
    outputs["det_score"] = np.full(30, 0.8)
    same = FeatureListScorer(det, "mtcnn")(outputs)
    np.testing.assert_array_equal(same, det.score([f[:30] for f in feats], np.full(30, 0.8)))
    with caplog.at_level("WARNING", logger="facerec.pipeline"):
        other = FeatureListScorer(det, "scrfd")
    assert "calibrated on 'mtcnn'" in caplog.text
    np.testing.assert_array_equal(other(outputs), det.score([f[:30] for f in feats]))  # neutral
    assert np.all(other(outputs) > same)
