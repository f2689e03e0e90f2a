"""Accuracy through HTTP equals the offline evaluation: LFW validation pairs (fold 5, never LFW-H2)
sent to /v1/verify give the offline pipeline's accuracy within 0.5 points.

Needs a trained model (``FACEREC_MODEL``: an export of a training checkpoint with a calibrated
threshold) and the shared data (``FACEREC_DATA`` with ``lfw/``); skipped otherwise, saying which is
missing. ``FACEREC_ACCURACY_PAIRS`` (default 600, at least 300) bounds the pairs used.
``FACEREC_ACCURACY_REPORT=FILE.json`` also writes the measured figures there (the model card cites
such a file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.data

MIN_PAIRS = 300


def _trained_model() -> Path:
    value = os.environ.get("FACEREC_MODEL")
    if not value:
        pytest.skip("FACEREC_MODEL is not set: the accuracy check needs a trained, exported model")
    path = Path(value)
    folder = path if path.is_dir() else path.parent
    report = folder / "export_report.json"
    if not report.exists():
        pytest.skip(f"{folder} has no export_report.json: not a `facerec export` folder")
    version = json.loads(report.read_text()).get("contract", {}).get("model_version")
    if json.loads(report.read_text()).get("origin") == "random-init" or version == "random-init":
        pytest.skip(f"{folder} holds a random-init model, not a trained one")
    return path


def _lfw() -> Path:
    from facerec.data.protocol import data_root, has_lfw

    if not os.environ.get("FACEREC_DATA") or not has_lfw():
        pytest.skip("FACEREC_DATA with lfw/ (people.txt, pairs.txt, lfw-deepfunneled) is absent")
    return data_root() / "lfw" / "lfw-deepfunneled"


@pytest.mark.timeout(1800)
def test_http_accuracy_matches_offline_on_validation_pairs():
    model = _trained_model()
    images = _lfw()
    from fastapi.testclient import TestClient

    from facerec.data.protocol import validation_pairs
    from facerec.eval.verification import kfold_accuracy
    from facerec.runtime import FacePipeline, PipelineError
    from service.app import create_app
    from service.settings import Settings
    from service.testing import wait_ready

    n = max(MIN_PAIRS, int(os.environ.get("FACEREC_ACCURACY_PAIRS", "600")))
    # Fold 5 lists its 300 genuine pairs first: take a balanced subset, half of each.
    fold = validation_pairs()
    pairs = [p for p in fold if p.same][: n // 2] + [p for p in fold if not p.same][: n - n // 2]
    assert len(pairs) >= MIN_PAIRS, f"only {len(pairs)} validation pairs"
    key = "accuracy-key-0123456789abcdef"
    app = create_app(Settings(model=model, api_keys=[key]), announce_key=False)
    engine = app.state.engine
    offline = FacePipeline(engine.backend, max_faces=engine.settings.max_faces)  # no HTTP, no batcher
    threshold = engine.calibration.threshold
    assert threshold is not None and engine.calibration.source == "model", "the model has no calibrated threshold"

    cache: dict[Path, np.ndarray | None] = {}

    def embed(path: Path):
        if path not in cache:
            try:
                cache[path] = offline.process(path).faces[0].embedding
            except PipelineError:
                cache[path] = None
        return cache[path]

    labels, offline_scores, http_scores, http_match = [], [], [], []
    with TestClient(app) as client:
        wait_ready(client.get, timeout_s=300)
        for pair in pairs:
            pa, pb = pair.paths(images)
            ea, eb = embed(pa), embed(pb)
            r = client.post("/v1/verify", files={"image_a": pa.read_bytes(), "image_b": pb.read_bytes()},
                            headers={"X-API-Key": key})
            if ea is None or eb is None:  # no face offline: the service must refuse it too
                assert r.status_code == 422, r.text
                continue
            assert r.status_code == 200, r.text
            body = r.json()
            labels.append(pair.same)
            offline_scores.append(float(ea @ eb))
            http_scores.append(body["similarity"])
            http_match.append(body["match"])
    labels = np.array(labels)
    assert len(labels) >= MIN_PAIRS, f"only {len(labels)} pairs had a face in both images"
    offline_scores, http_scores = np.array(offline_scores), np.array(http_scores)
    acc_offline = 100 * np.mean((offline_scores >= threshold) == labels)
    acc_http = 100 * np.mean(np.array(http_match) == labels)
    print(f"\n{len(labels)} validation pairs at threshold {threshold:.4f}: HTTP {acc_http:.2f}%, "
          f"offline {acc_offline:.2f}%")
    assert abs(acc_http - acc_offline) <= 0.5, (acc_http, acc_offline)
    # Threshold-free too: the k-fold accuracy of the similarities.
    kf_offline = 100 * kfold_accuracy(offline_scores, labels, 10).mean
    kf_http = 100 * kfold_accuracy(http_scores, labels, 10).mean
    print(f"10-fold accuracy: HTTP {kf_http:.2f}%, offline {kf_offline:.2f}%")
    assert abs(kf_http - kf_offline) <= 0.5, (kf_http, kf_offline)
    if os.environ.get("FACEREC_ACCURACY_REPORT"):
        out = Path(os.environ["FACEREC_ACCURACY_REPORT"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "model": str(model), "model_version": engine.backend.contract.model_version,
            "contract_id": engine.backend.contract.contract_id,
            "pairs": int(len(labels)), "genuine": int(labels.sum()), "threshold": threshold,
            "accuracy_at_threshold": {"http": acc_http, "offline": acc_offline},
            "kfold10_accuracy": {"http": kf_http, "offline": kf_offline},
            "command": f"FACEREC_MODEL={model} FACEREC_DATA=... FACEREC_ACCURACY_REPORT={out} "
                       "pytest -s tests/test_service_accuracy.py",
        }, indent=2) + "\n")
