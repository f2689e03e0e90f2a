"""Mahalanobis OOD detector (Lee et al., NeurIPS 2018), fitted in one streaming pass.

Per feature layer l (spatially pooled, (B, C_l)) the detector keeps a set of means and one tied,
shrunk covariance Σ_l, and scores an input by M_l(x) = max_k -(f - μ_k)ᵀ Σ_l⁻¹ (f - μ_k) (the
paper's form, without the code's ½; the combiner's weights absorb the scale). Higher = more
face-like.

Three variants share one pass over the data (``MahalanobisFitter``):

- ``class_conditional``: the paper's per-class means with Σ = 1/N Σ_c Σ_i (f - μ_c)(f - μ_c)ᵀ.
  In face recognition the classes are people: these means are biometric templates, so this
  variant is for research comparisons only and ``facerec.ood.io.save`` refuses it by default.
- ``global``: one Gaussian per layer (mean over everybody).
- ``prototypes``: k-means over the *identity means* (whitened by the within-identity covariance),
  each prototype the unweighted average of at least ``min_identities_per_prototype`` people, so no
  single person contributes more than 1/m of a shipped vector. Σ is the scatter of the samples
  around their identity's prototype. This is the variant that ships.

One-sided layers (``finalize(one_sided=...)``) clamp the features from below at the layer's mean
before the distance: f ↦ max(f, floor). Only deviations *above* the genuine faces' typical values
count. The pixel high-frequency statistics (``facerec/models/pixel_stats.py``) are such a layer:
adversarial noise raises them, while grey photos (no chroma) and small upsampled faces (little
detail) lower them and must not be flagged for it.

An optional last column, ``DetectionLayer``, is the face detector's own confidence (its logit):
non-faces that the detector lets through (animal faces, face-like textures) pass its threshold by
a small margin, while genuine faces sit far above it. It is not a network feature, so it is kept
out of the Mahalanobis statistics and only enters the combiner (whose ceiling makes it one-sided:
a very confident detection cannot vouch for an otherwise atypical input).

Only O(L·d²) statistics plus one d-vector per identity are held while fitting, never the features.
Sums are shifted by the first batch's mean before accumulating, which keeps the float64
"scatter minus n·mean·meanᵀ" subtraction well conditioned.

The module stays whole (about 450 lines) on purpose: the fitter, the per-layer Gaussian and the
detector share one set of statistics and one scoring formula, and are read together when checking
the detector against the paper.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from facerec.ood.combiner import LogisticCombiner

VARIANTS = ("class_conditional", "global", "prototypes")
# Ridge of λ·tr(Σ)/d: 1% of the average variance. Enough to make a rank-deficient Σ (n < d, dead
# channels after PReLU/ReLU) invertible with a condition number ≤ ~100·d, small enough to leave
# a well-estimated Σ (n >> d) nearly untouched.
DEFAULT_SHRINKAGE = 0.01
PIXEL_STD = 0.5  # model input is (x/255 - 0.5)/0.5: one pixel unit of [0, 1] is 1/0.5 in input units


def _numpy64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def shrink(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """Σ + λ·tr(Σ)/d·I: a ridge proportional to the average variance, so λ is scale-free."""
    d = cov.shape[0]
    scale = np.trace(cov) / d
    scale = scale if scale > 0 else 1.0  # all samples identical: any positive ridge will do
    return cov + shrinkage * scale * np.eye(d)


@dataclass
class LayerGaussian:
    """One layer's means (K, d), shrunk tied covariance (d, d) and, per mean, how many distinct
    identities were averaged into it (1 = a personal template; -1 = unknown, unlabelled data).
    ``floor`` (d,), when set, makes the layer one-sided: features are clamped to >= floor first."""

    means: np.ndarray
    covariance: np.ndarray
    support: np.ndarray
    floor: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.means = np.atleast_2d(np.asarray(self.means, dtype=np.float64))
        self.covariance = np.asarray(self.covariance, dtype=np.float64)
        self.support = np.asarray(self.support, dtype=np.int64).reshape(-1)
        if self.floor is not None:
            self.floor = np.asarray(self.floor, dtype=np.float64).reshape(-1)
            if self.floor.shape != (self.means.shape[1],):
                raise ValueError(f"floor of shape {self.floor.shape} for {self.means.shape[1]}-d features")
        self._floor = None if self.floor is None else torch.from_numpy(self.floor)
        # Σ⁻¹ = WᵀW with W = Λ^-½ Vᵀ from the eigendecomposition in float64: a symmetric,
        # well-defined square root even where Cholesky would struggle with a near-singular Σ.
        w, v = np.linalg.eigh(self.covariance)
        if w.min() <= 0:
            raise ValueError("covariance is not positive definite: fit it with shrinkage > 0")
        self.whitener = (v / np.sqrt(w)).T
        # Centring on the means' average before the expansion ‖z‖² - 2 z·m + ‖m‖² limits cancellation.
        self.center = self.means.mean(axis=0)
        self._w = torch.from_numpy(self.whitener)
        self._c = torch.from_numpy(self.center)
        self._zm = torch.from_numpy((self.means - self.center) @ self.whitener.T)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def precision(self) -> np.ndarray:
        return self.whitener.T @ self.whitener

    def distances(self, features) -> torch.Tensor:
        """(B, K) squared Mahalanobis distances in float64; differentiable w.r.t. ``features``."""
        f = torch.as_tensor(features).to(torch.float64)
        if self._floor is not None:
            f = torch.maximum(f, self._floor)  # one-sided: values below the floor count as typical
        z = (f - self._c) @ self._w.T
        b, k, d = z.shape[0], self._zm.shape[0], z.shape[1]
        if b * k * d <= 1 << 22:  # direct differences: exact, and cheap at this size
            return ((z[:, None, :] - self._zm[None]) ** 2).sum(-1)
        d2 = (z**2).sum(1, keepdim=True) - 2 * z @ self._zm.T + (self._zm**2).sum(1)[None]
        return d2.clamp_min(0.0)

    def scores(self, features) -> torch.Tensor:
        """(B,) max_k -(f - μ_k)ᵀ Σ⁻¹ (f - μ_k)."""
        return -self.distances(features).min(dim=1).values


class _LayerSums:
    """Shifted count, sum and scatter of one layer, plus per-label counts and sums."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self.shift: np.ndarray | None = None
        self.total = np.zeros(dim)
        self.scatter = np.zeros((dim, dim))
        self.label_counts: list[int] = []
        self.label_sums: list[np.ndarray] = []

    def update(self, f: np.ndarray, label_slots: np.ndarray | None, inverse, n_new_slots: int) -> None:
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {f.shape}")
        if self.shift is None:
            self.shift = f.mean(axis=0)
        g = f - self.shift
        self.n += len(g)
        self.total += g.sum(axis=0)
        self.scatter += g.T @ g
        if label_slots is None:
            return
        for _ in range(n_new_slots):
            self.label_counts.append(0)
            self.label_sums.append(np.zeros(self.dim))
        batch_sums = np.zeros((len(label_slots), self.dim))
        np.add.at(batch_sums, inverse, g)
        batch_counts = np.bincount(inverse, minlength=len(label_slots))
        for j, slot in enumerate(label_slots):
            self.label_counts[slot] += int(batch_counts[j])
            self.label_sums[slot] += batch_sums[j]


class MahalanobisFitter:
    """Accumulates the sufficient statistics of every variant in a single pass over batches."""

    def __init__(self) -> None:
        self.layers: list[_LayerSums] | None = None
        self.label_slot: dict = {}
        self.labelled: bool | None = None
        # After finalize("prototypes"): per layer, label -> prototype index. In memory only, for
        # inspection and tests; never saved (it would tie people to prototypes).
        self.assignments: list[dict] = []

    def update(self, features: Sequence, labels=None) -> None:
        feats = [_numpy64(f) for f in features]
        if self.layers is None:
            self.layers = [_LayerSums(f.shape[1]) for f in feats]
        if len(feats) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} feature layers, got {len(feats)}")
        if self.labelled is None:
            self.labelled = labels is not None
        if self.labelled != (labels is not None):
            raise ValueError("either every batch has labels or none does")
        slots = inverse = None
        n_new = 0
        if labels is not None:
            lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
            if lab.shape != (len(feats[0]),):
                raise ValueError(f"labels of shape {lab.shape} for a batch of {len(feats[0])}")
            uniq, inverse = np.unique(lab, return_inverse=True)
            before = len(self.label_slot)
            slots = np.array([self.label_slot.setdefault(u.item(), len(self.label_slot)) for u in uniq])
            n_new = len(self.label_slot) - before
        for acc, f in zip(self.layers, feats):
            acc.update(f, slots, inverse, n_new)

    def fit(self, batches: Iterable) -> MahalanobisFitter:
        """Consume an iterable of ``(features, labels)`` (labels may be None) or of bare feature
        lists (one (B, C_l) array per layer)."""
        for item in batches:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (list, tuple)):
                self.update(*item)
            else:
                self.update(item)
        return self

    @property
    def n_identities(self) -> int:
        return len(self.label_slot)

    @property
    def labels(self) -> list:
        """Labels in sorted order (first-seen order if they do not sort): the order of the class
        means, independent of how the data was split into batches."""
        try:
            return sorted(self.label_slot)
        except TypeError:
            return list(self.label_slot)

    def finalize(
        self,
        variant: str = "prototypes",
        shrinkage: float = DEFAULT_SHRINKAGE,
        n_prototypes: int = 16,
        min_identities_per_prototype: int = 20,
        contract_id: str = "",
        seed: int = 0,
        one_sided: Sequence[int] = (),
    ) -> MahalanobisDetector:
        """Build one variant from the accumulated statistics. ``one_sided``: indices of layers
        whose features are clamped from below at the layer's overall mean (see module doc)."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
        if self.layers is None or self.layers[0].n == 0:
            raise ValueError("no features were seen")
        if shrinkage <= 0:
            raise ValueError("shrinkage must be > 0 (a singular Σ has no inverse)")
        if variant != "global" and not self.labelled:
            raise ValueError(f"variant {variant!r} needs identity labels")
        bad = [i for i in one_sided if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"one_sided layers {bad} out of range for {len(self.layers)} layers")
        rng = np.random.default_rng(seed)
        self.assignments = []
        layers = [self._finalize_layer(a, variant, shrinkage, n_prototypes,
                                       min_identities_per_prototype, rng) for a in self.layers]
        for i in sorted(set(one_sided)):
            a = self.layers[i]
            layers[i] = replace(layers[i], floor=a.total / a.n + a.shift)
        return MahalanobisDetector(
            layers=layers, variant=variant, contract_id=contract_id, shrinkage=shrinkage,
            min_identities_per_prototype=(min_identities_per_prototype if variant != "class_conditional"
                                          else 1),
            meta={"n_samples": self.layers[0].n, "n_identities": self.n_identities},
        )

    def _finalize_layer(self, a: _LayerSums, variant, shrinkage, n_prototypes, min_ids, rng) -> LayerGaussian:
        n, s = a.n, a.shift
        if variant == "global":
            m = a.total / n
            cov = (a.scatter - n * np.outer(m, m)) / n
            support = [self.n_identities if self.labelled else -1]
            return LayerGaussian(m[None] + s, shrink(cov, shrinkage), support)
        order = [self.label_slot[label] for label in self.labels]
        counts = np.asarray(a.label_counts, dtype=np.float64)[order]
        sums = np.stack(a.label_sums)[order]
        id_means = sums / counts[:, None]  # shifted
        # Within-identity scatter: Σ_i g gᵀ - Σ_c n_c m_c m_cᵀ (= Σ_c Σ_i (f - μ_c)(f - μ_c)ᵀ).
        within = (a.scatter - (sums.T / counts) @ sums) / n
        if variant == "class_conditional":
            return LayerGaussian(id_means + s, shrink(within, shrinkage), np.ones(len(counts)))
        whitener = LayerGaussian(np.zeros((1, a.dim)), shrink(within, shrinkage), [0]).whitener
        assign = kmeans_min_support(id_means @ whitener.T, n_prototypes, min_ids, rng)
        self.assignments.append({label: int(k) for label, k in zip(self.labels, assign)})
        k = assign.max() + 1
        support = np.bincount(assign, minlength=k)
        # Each prototype weighs its identities equally (a person with many photos gets no more say).
        protos = np.zeros((k, a.dim))
        np.add.at(protos, assign, id_means)
        protos /= support[:, None]
        # Scatter about the prototype p_k of the N_k samples with sample mean m_k:
        # S_k - N_k m_k m_kᵀ + N_k (m_k - p_k)(m_k - p_k)ᵀ, all from per-identity sums.
        cluster_n = np.bincount(assign, weights=counts, minlength=k)
        cluster_sum = np.zeros((k, a.dim))
        np.add.at(cluster_sum, assign, sums)
        cluster_mean = cluster_sum / cluster_n[:, None]
        delta = cluster_mean - protos
        scatter = a.scatter - (cluster_sum.T / cluster_n) @ cluster_sum + (delta.T * cluster_n) @ delta
        return LayerGaussian(protos + s, shrink(scatter / n, shrinkage), support)


def kmeans_min_support(z: np.ndarray, k: int, min_support: int, rng: np.random.Generator,
                       iters: int = 50) -> np.ndarray:
    """Cluster rows of ``z`` (one per identity) into at most ``k`` groups of >= ``min_support``
    rows each; returns the cluster index of every row (0..K-1, contiguous).

    Lloyd's algorithm from a k-means++ start, then clusters below the minimum are dropped one at a
    time (smallest first) and their members reassigned to the nearest remaining centre.
    """
    n = len(z)
    if n < min_support:
        raise ValueError(
            f"{n} identities cannot make a prototype of >= {min_support} distinct identities; "
            "fit on more people or lower min_identities_per_prototype"
        )
    k = max(1, min(k, n // max(min_support, 1)))
    z_sq = (z**2).sum(1)

    def sq_dist(c: np.ndarray) -> np.ndarray:  # (n, K) without an (n, K, d) temporary
        return np.maximum(z_sq[:, None] - 2 * z @ c.T + (c**2).sum(1)[None], 0.0)

    c = z[rng.integers(n)][None]
    for _ in range(k - 1):  # k-means++ seeding
        d2 = sq_dist(c).min(1)
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        c = np.vstack([c, z[rng.choice(n, p=probs)]])

    def assign(c: np.ndarray) -> np.ndarray:
        return sq_dist(c).argmin(1)

    def update(a: np.ndarray) -> np.ndarray:
        used = np.unique(a)  # empty clusters vanish here
        return np.stack([z[a == j].mean(0) for j in used])

    labels = assign(c)
    for _ in range(iters):
        c = update(labels)
        new = assign(c)
        if np.array_equal(new, labels):
            break
        labels = new
    while True:
        sizes = np.bincount(labels, minlength=len(c))
        if sizes.min() >= min_support:
            break
        c = np.delete(c, sizes.argmin(), axis=0)
        labels = assign(c)
        c = update(labels)
        labels = assign(c)
    _, labels = np.unique(labels, return_inverse=True)
    return labels


LOGIT_CLIP = 1e-6  # detector confidences are clipped to [1e-6, 1 - 1e-6] before the logit


@dataclass
class DetectionLayer:
    """The face detector's confidence as one more score column: ``logit(clip(p))``.

    ``detector``: the family of detector whose scores it was calibrated on (``detector_name``);
    ``neutral``: the column's value when no score of that detector is available (an aligned crop,
    another detector), the median of the validation faces: absent evidence counts as typical."""

    detector: str
    neutral: float

    @staticmethod
    def logit(det_scores) -> np.ndarray:
        p = np.clip(np.asarray(det_scores, dtype=np.float64), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
        return np.log(p) - np.log1p(-p)

    def scores(self, det_scores, n: int) -> torch.Tensor:
        """(n,) float64 column; ``det_scores`` None (or NaN entries) = not available."""
        if det_scores is None:
            return torch.full((n,), float(self.neutral), dtype=torch.float64)
        p = np.asarray(det_scores, dtype=np.float64).reshape(-1)
        if p.shape != (n,):
            raise ValueError(f"{p.shape[0]} detector scores for {n} faces")
        col = np.where(np.isnan(p), self.neutral, self.logit(np.nan_to_num(p, nan=0.5)))
        return torch.from_numpy(col)


@dataclass
class MahalanobisDetector:
    layers: list[LayerGaussian]
    variant: str
    contract_id: str
    shrinkage: float = DEFAULT_SHRINKAGE
    min_identities_per_prototype: int = 1
    combiner: LogisticCombiner | None = None
    threshold: float | None = None  # on the combined score; below it = OOD
    target_tpr: float | None = None  # the TPR on validation faces the threshold was set for
    epsilon: float = 0.0  # input pre-processing step in [0, 1] pixel units (0 = off)
    meta: dict = field(default_factory=dict)
    detection: DetectionLayer | None = None  # the face detector's confidence as a last column

    @property
    def n_columns(self) -> int:
        """Score columns the combiner reads: one per feature layer, plus the detection layer."""
        return len(self.layers) + (self.detection is not None)

    def layer_scores(self, features: Sequence, det_scores=None) -> torch.Tensor:
        """(B, n_columns) per-layer scores in float64 from a model's pooled features, and, when the
        detector has a detection layer, the face detector's confidence of each face (None = not
        available: the layer's neutral value)."""
        if len(features) != len(self.layers):
            raise ValueError(f"detector has {len(self.layers)} layers, got {len(features)} features")
        cols = [g.scores(f) for g, f in zip(self.layers, features)]
        if self.detection is not None:
            cols.append(self.detection.scores(det_scores, cols[0].shape[0]).to(cols[0].device))
        return torch.stack(cols, dim=1)

    def combine(self, layer_scores) -> np.ndarray:
        if self.combiner is None:
            raise RuntimeError("no combiner fitted: call facerec.ood.combiner.fit_combiner first")
        return self.combiner.decision(layer_scores)

    def score(self, features: Sequence, det_scores=None) -> np.ndarray:
        """(B,) combined in-distribution score (higher = more like a genuine face)."""
        return self.combine(self.layer_scores(features, det_scores).detach().numpy())

    def is_ood(self, scores) -> np.ndarray:
        if self.threshold is None:
            raise RuntimeError("no threshold calibrated")
        return np.asarray(scores) < self.threshold

    def preprocess(self, model, x: torch.Tensor, epsilon: float) -> list[torch.Tensor]:
        """The paper's input pre-processing: for every layer l, x̃_l = x + ε·sign(∇ₓ M_l(x)), i.e.
        x - ε·sign(∇ₓ distance), a step that raises the confidence score. In-distribution inputs
        gain more from it than OOD ones, which widens the gap. ``epsilon`` is in [0, 1] pixel units
        and is divided by the input std (0.5) to become a step in model-input units."""
        model.eval()
        xg = x.detach().clone().requires_grad_(True)
        feats = model(xg, return_features=True).features
        step = epsilon / PIXEL_STD
        out = []
        for i, (g, f) in enumerate(zip(self.layers, feats)):
            (grad,) = torch.autograd.grad(g.scores(f).sum(), xg, retain_graph=i < len(feats) - 1)
            out.append((xg + step * grad.sign()).clamp(-1.0, 1.0).detach())
        return out

    def input_layer_scores(
        self, model, x: torch.Tensor, epsilon: float | None = None, det_scores=None
    ) -> torch.Tensor:
        """(B, n_columns) layer scores of images, with pre-processing when ε > 0 (torch models only;
        the detection column, if any, is not pre-processed: it is not a function of the crop)."""
        eps = self.epsilon if epsilon is None else epsilon
        model.eval()
        if eps == 0:
            with torch.no_grad():
                return self.layer_scores(model(x, return_features=True).features, det_scores)
        cols = []
        for i, xt in enumerate(self.preprocess(model, x, eps)):
            with torch.no_grad():
                cols.append(self.layers[i].scores(model(xt, return_features=True).features[i]))
        if self.detection is not None:
            cols.append(self.detection.scores(det_scores, len(x)).to(cols[0].device))
        return torch.stack(cols, dim=1)

    def score_inputs(self, model, x: torch.Tensor, epsilon: float | None = None, det_scores=None) -> np.ndarray:
        return self.combine(self.input_layer_scores(model, x, epsilon, det_scores).numpy())


def extract_features(model, batches: Iterable, device: str | torch.device = "cpu") -> Iterator:
    """Yield ``(features as float64 numpy, labels)`` from ``(images, labels)`` batches."""
    model.eval()
    for x, labels in batches:
        with torch.no_grad():
            feats = model(x.to(device), return_features=True).features
        yield [f.to("cpu", torch.float64).numpy() for f in feats], labels
