"""Choosing a quality measure on validation by EDC: ``facerec fit-quality``'s rule.

Every candidate (an array of per-image qualities of the same validation images) is scored on the
all-pairs protocol of those images with the conventions of :mod:`facerec.eval.quality`: a pair's
quality is the lower of its two images', the threshold is fixed once at 0% discard for the FMR over
all impostors, and discarding the lowest-quality genuine pairs should lower the FNMR fastest. The
score is the partial area under the EDC for discard 0..``upper``, normalised (the mean FNMR over that
range): lower is better; a tie goes to the candidate listed first.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def validation_pairs(embeddings: np.ndarray, names) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(genuine scores, image a, image b, impostor scores) of the all-pairs protocol on L2-normalised
    ``embeddings`` of images of identities ``names``."""
    from facerec.eval.allpairs import genuine_pairs, identity_ids, impostor_scores

    ids = identity_ids(names)
    a, b = genuine_pairs(ids)
    e = np.asarray(embeddings, dtype=np.float32)
    genuine = np.sum(e[a] * e[b], axis=1, dtype=np.float64)
    return genuine, a, b, impostor_scores(e, ids).scores


def choose_measure(embeddings: np.ndarray, names, measures: Mapping[str, np.ndarray], fmr: float = 1e-3,
                   upper: float = 0.3) -> tuple[str, dict[str, dict]]:
    """(the best measure's name, a row per candidate: ``pauc``, ``fnmr_at_0``, ``fnmr_at_upper`` and
    the EDC). ``embeddings``: L2-normalised, one row per image, as ``measures``' arrays."""
    from facerec.eval.quality import edc_curve, pair_quality, partial_auc

    if not measures:
        raise ValueError("no quality measure to choose from")
    genuine, a, b, impostor = validation_pairs(embeddings, names)
    if genuine.size == 0:
        raise ValueError("the validation images hold no genuine pair (every identity needs 2 or more images)")
    table: dict[str, dict] = {}
    for name, q in measures.items():
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (len(embeddings),) or not np.all(np.isfinite(q)):
            raise ValueError(f"quality measure {name!r} needs one finite value per image")
        curve = edc_curve(genuine, impostor, pair_quality(q[a], q[b]), fmr=fmr)
        if not curve.supported:
            raise ValueError(curve.note)
        i_upper = int(np.argmin(np.abs(curve.discard - upper)))
        table[name] = {"pauc": partial_auc(curve.discard, curve.fnmr, upper, normalise=True),
                       "fnmr_at_0": float(curve.fnmr[0]), "fnmr_at_upper": float(curve.fnmr[i_upper]),
                       "edc": curve.as_dict()}
    best = min(table, key=lambda n: table[n]["pauc"])  # min keeps the first of equal values
    return best, table
