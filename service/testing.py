"""A random-init model folder for tests, benchmarks and smoke runs (never served by default).

``make_random_model(out)`` exports an untrained ``vit_tiny_fiqa`` (it has the quality head and the
OOD feature outputs), then attaches what a real export carries after calibration, computed on the
shipped sample faces: a verification threshold with its operating point, the quality percentile
mapping, and a small Mahalanobis detector (global variant: it stores no per-person means) with a
combiner fitted against synthetic non-faces. The values are stand-ins that exercise every field of
the API; they say nothing about accuracy.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from facerec.bundle import Calibration, ModelBundle

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "tests" / "data" / "lfw_sample"
TEST_CALIBRATION = "lfw_sample (test stand-in, not a calibration)"


def sample_images(limit: int | None = None) -> list[Path]:
    paths = sorted(SAMPLES.glob("*/*.jpg"))
    return paths[:limit] if limit else paths


def make_random_model(out: str | Path, overrides: dict | None = None, ood: bool = True,
                      n_faces: int = 40, threshold: float = 0.3, torch_artifact: bool = False) -> Path:
    import torch

    from facerec.export import export_bundle
    from facerec.models import create_model
    from facerec.runtime import FacePipeline, OnnxRuntimeBackend

    out = Path(out)
    overrides = dict(overrides or {})
    torch.manual_seed(0)
    model = create_model("vit_tiny_fiqa", **overrides)
    export_bundle(model, out, model_name="vit_tiny_fiqa", overrides=overrides, version="random-init",
                  fp16=False, torch_artifact=torch_artifact, dynamo=False)
    model_dir = ModelBundle(out)
    backend = OnnxRuntimeBackend(model_dir.graph(), device="cpu")
    pipeline = FacePipeline(backend, keep_features=True)
    # Every 4th sample: faces of many people, fewer model calls.
    faces = [pipeline.process(p).faces[0] for p in sample_images()[::4][:n_faces]]
    quality = np.array([f.quality for f in faces])
    model_dir.write_calibration(Calibration(
        threshold=threshold, far=0.001, calibrated_on=TEST_CALIBRATION,
        quality_percentiles=np.percentile(quality, np.arange(101)), quality_calibrated_on=TEST_CALIBRATION,
    ))
    if ood:
        _fit_ood(backend, faces, model_dir.ood_path)
    return out


def _fit_ood(backend, faces, path: Path) -> None:
    from facerec import ood

    names = sorted((n for n in faces[0].features), key=lambda n: int(n.split("_")[1]))
    feats_in = [np.stack([f.features[n] for f in faces]) for n in names]
    det = ood.MahalanobisFitter().fit([feats_in]).finalize("global", contract_id=backend.contract.contract_id)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (16, 112, 112, 3), dtype=np.uint8)  # stand-in non-faces
    flat = np.repeat(rng.integers(0, 256, (16, 1, 1, 3), dtype=np.uint8), 112, 1).repeat(112, 2)
    out = backend.run(np.concatenate([noise, flat]))
    s_in = det.layer_scores(feats_in).numpy()
    s_out = det.layer_scores([out[n] for n in names]).numpy()
    det.combiner = ood.fit_combiner(s_in, s_out)
    det.threshold, det.target_tpr = ood.calibrate_threshold(det.combine(s_in), 0.95), 0.95
    ood.save(det, path)


def shared_model_dir(tmp_path_factory) -> Path:
    """One random-init model per pytest session, shared by every service test module (they run in
    one process, so the session's base temp folder is a safe cache)."""
    out = tmp_path_factory.getbasetemp() / "service_model"
    if not ModelBundle(out).ood_path.exists():
        make_random_model(out, {"depth": 2})
    return out


def wait_ready(get, timeout_s: float = 60.0, interval_s: float = 0.05, retry_on: tuple = (OSError,)) -> dict:
    """Poll ``get('/v1/health/ready')`` until it answers 200 (bounded); returns its JSON."""
    import time

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            r = get("/v1/health/ready")
            last = r
            if r.status_code == 200:
                return r.json()
        except retry_on:  # a real server's port is not open yet
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"not ready after {timeout_s} s: {getattr(last, 'text', None)}")


def free_port() -> int:
    """A TCP port on the loopback interface that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service_process(env: dict, log: Path, ready_timeout_s: float = 90.0, client_timeout_s: float = 60.0):
    """A real ``python -m service`` on a free loopback port, with ``os.environ`` plus ``env`` and its
    output in ``log``; yields ``(proc, client, base)`` (an httpx client on ``base``) once
    ``/v1/health/ready`` answers 200 (a server that exits first raises with its log). On exit the
    server is stopped if it still runs (terminate, then kill)."""
    import httpx

    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                                cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=client_timeout_s)
    try:
        def get(path):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{Path(log).read_text()}")
            return client.get(path)

        wait_ready(get, timeout_s=ready_timeout_s, interval_s=0.1, retry_on=(httpx.TransportError,))
        yield proc, client, base
    finally:
        client.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
