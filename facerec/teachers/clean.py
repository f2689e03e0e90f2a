"""Teacher-based cleaning: find training images that show someone other than their identity.

Scraped sets carry wrong-person images (Pins has some). A teacher trained on millions of faces
sees them: such an image looks less like the rest of its folder than strangers usually look like
each other. The rule, fixed before it is applied to any dataset (issue 17):

    An image is flagged when (1) its identity has at least ``min_images`` (3) images with a
    teacher embedding (two images cannot tell which one is wrong), and (2) the cosine between its
    teacher embedding and the normalised mean of the OTHER images of its identity is below tau,
    where tau is the (1 - far) quantile (far = 1e-3) of the teacher's cosines of ``pairs``
    (200,000) random pairs of images of different identities of the same dataset (seeded).

In words: the image is less like its own person than all but one in a thousand pairs of strangers
are like each other. The threshold comes from the dataset and the teacher themselves, so it
follows the teacher's scale (dlib's cosines sit in a narrow band near 0.8-0.95, a margin-trained
model's near 0-0.9). Images without a teacher embedding (no face found) are never flagged:
unknown is not wrong. Flagged images are left out of training with ``data.exclude`` (the list
``facerec clean`` writes); nothing is deleted.

The threshold assumes wrong-person pairs are rarer than ``far`` among the different-identity
pairs: a wrong image of person B filed under A makes "different-identity" pairs with B's images
that are really same-person pairs, and if there are more such pairs than ``far`` of all, tau moves
up into the genuine range and good images get flagged. On a real dataset (thousands of people, or
Pins' 70 people with a few wrong images each) they are orders of magnitude rarer; on a toy set of
a handful of people they are not, so ``summary.json`` is worth a look before the list is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULE_TEXT = (
    "flag an image when its identity has >= {min_images} images with a teacher embedding and the "
    "cosine of its teacher embedding to the normalised mean of the other images of its identity is "
    "below tau = the (1 - {far:g}) quantile of the teacher cosines of {pairs:,} random different-identity "
    "pairs of this dataset (seed {seed})"
)


@dataclass(frozen=True)
class CleaningRule:
    far: float = 1e-3
    min_images: int = 3
    pairs: int = 200_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.far < 1:
            raise ValueError(f"far must be in (0, 1), got {self.far}")
        if self.min_images < 3:
            raise ValueError(f"min_images must be >= 3 (with two images neither can be blamed), got {self.min_images}")
        if self.pairs < 1 / self.far:
            raise ValueError(f"pairs ({self.pairs}) must be at least 1/far ({1 / self.far:g}) to estimate the quantile")

    def text(self) -> str:
        return RULE_TEXT.format(min_images=self.min_images, far=self.far, pairs=self.pairs, seed=self.seed)


@dataclass
class CleaningResult:
    threshold: float  # tau
    impostor_pairs: int  # random different-identity pairs the threshold was estimated on
    judged: np.ndarray  # (N,) bool: the rule could judge the image
    cos_own: np.ndarray  # (N,) cosine to its identity's leave-one-out mean; NaN where not judged
    flagged: np.ndarray  # (N,) bool
    nearest_other: np.ndarray  # (N,) label of the closest other identity mean (flagged rows; else -1)
    cos_other: np.ndarray  # (N,) cosine to that identity's mean (flagged rows; else NaN)


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def impostor_threshold(embeddings: np.ndarray, labels: np.ndarray, rule: CleaningRule) -> tuple[float, int]:
    """(tau, number of pairs): the (1 - far) quantile of random different-identity cosines."""
    ok = np.flatnonzero(np.isfinite(embeddings).all(axis=1) & (labels >= 0))
    if len(np.unique(labels[ok])) < 2:
        raise ValueError("the threshold needs images of at least two identities with a teacher embedding")
    rng = np.random.default_rng(rule.seed)
    scores: list[np.ndarray] = []
    found = 0
    for _ in range(20):  # draws with replacement; same-identity draws are thrown away
        a = rng.choice(ok, rule.pairs)
        b = rng.choice(ok, rule.pairs)
        keep = labels[a] != labels[b]
        s = np.einsum("ij,ij->i", embeddings[a[keep]], embeddings[b[keep]])
        scores.append(s)
        found += len(s)
        if found >= rule.pairs:
            break
    s = np.concatenate(scores)[: rule.pairs]
    if len(s) < 1 / rule.far:
        raise ValueError(f"only {len(s)} different-identity pairs could be drawn; need {1 / rule.far:g}")
    return float(np.quantile(s, 1.0 - rule.far)), len(s)


def find_wrong_person_images(embeddings: np.ndarray, labels: np.ndarray,
                             rule: CleaningRule | None = None) -> CleaningResult:
    """Apply the rule to unit teacher embeddings (N, D) (NaN rows: no embedding) with labels (N,)."""
    rule = rule or CleaningRule()
    e = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if e.ndim != 2 or labels.shape != (len(e),):
        raise ValueError(f"expected embeddings (N, D) and labels (N,), got {e.shape} and {labels.shape}")
    ok = np.isfinite(e).all(axis=1) & (labels >= 0)
    e = np.where(ok[:, None], _unit(np.nan_to_num(e)), 0.0)
    threshold, n_pairs = impostor_threshold(e, labels, rule)
    n = len(e)
    cos_own = np.full(n, np.nan)
    judged = np.zeros(n, bool)
    classes = np.unique(labels[ok])
    sums = {}
    for c in classes:
        members = np.flatnonzero(ok & (labels == c))
        total = e[members].sum(axis=0)
        sums[c] = total
        if len(members) >= rule.min_images:
            others = _unit(total[None, :] - e[members])  # leave-one-out means
            cos_own[members] = np.einsum("ij,ij->i", e[members], others)
            judged[members] = True
    flagged = judged & (cos_own < threshold)
    nearest = np.full(n, -1)
    cos_other = np.full(n, np.nan)
    rows = np.flatnonzero(flagged)
    if len(rows):
        means = _unit(np.stack([sums[c] for c in classes]))
        sims = e[rows] @ means.T
        sims[np.arange(len(rows)), np.searchsorted(classes, labels[rows])] = -np.inf  # not its own
        best = sims.argmax(axis=1)
        nearest[rows] = classes[best]
        cos_other[rows] = sims[np.arange(len(rows)), best]
    return CleaningResult(threshold, n_pairs, judged, cos_own, flagged, nearest, cos_other)


def contact_sheet(rows: list[tuple[np.ndarray, str, list[np.ndarray]]], tile: int = 112,
                  columns: int = 5) -> np.ndarray:
    """One row per flagged image: the image (red frame, its caption) then up to ``columns - 1``
    other images of its identity. ``rows``: (RGB image, caption, [RGB images of the identity])."""
    import cv2

    if not rows:
        raise ValueError("no rows for the contact sheet")
    caption_h = 18
    sheet = np.full((len(rows) * (tile + caption_h), columns * tile, 3), 255, np.uint8)
    for r, (image, caption, references) in enumerate(rows):
        y = r * (tile + caption_h)
        for c, img in enumerate([image, *references[: columns - 1]]):
            resized = cv2.resize(np.ascontiguousarray(img), (tile, tile), interpolation=cv2.INTER_AREA)
            sheet[y + caption_h : y + caption_h + tile, c * tile : (c + 1) * tile] = resized
        sheet[y + caption_h : y + caption_h + tile, :tile][[0, 1, -2, -1], :] = (220, 0, 0)
        sheet[y + caption_h : y + caption_h + tile, :tile][:, [0, 1, -2, -1]] = (220, 0, 0)
        cv2.putText(sheet, caption[:70], (3, y + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet
