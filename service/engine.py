"""The inference engine behind the routes: the model folder, device policy, pipeline, batcher,
calibration (threshold, quality percentiles), OOD detector, warm-up and admission control.

Everything that can make the service unusable (no model, a GPU that cannot be used under the
strict device policy, an OOD detector fitted on another model) fails in ``Engine.load``, i.e. at
start, with a message saying why; nothing falls back silently.

Calibration lives in the fp32 ONNX graph's metadata (``facerec.export.update_metadata``), beside the
embedding contract it belongs to:

- ``facerec.verification_threshold``, ``facerec.verification_far``, ``facerec.verification_calibrated_on``
- ``facerec.quality_percentiles``: JSON list of the raw quality at percentiles 0, 1, ..., 100 of the
  calibration faces; ``facerec.quality_calibrated_on``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facerec.runtime import (
    DEFAULT_FACE_DETECTOR,
    FacePipeline,
    FeatureListScorer,
    MicroBatcher,
    NoFaceError,
    Overloaded,
    load_backend,
    resolve_device,
)
from facerec.runtime.admission import ImageAdmission
from facerec.runtime.backends import METADATA_PREFIX
from service.errors import from_exception
from service.settings import ModelNotFoundError, Settings

log = logging.getLogger("service")

_NOT_GRAPHS = (".fp16.onnx", ".partial.onnx", ".parity-failed.onnx")


@dataclass
class Calibration:
    threshold: float | None = None
    far: float | None = None
    calibrated_on: str | None = None
    source: str | None = None  # model | setting
    quality_percentiles: np.ndarray | None = None
    quality_calibrated_on: str | None = None

    def quality_score(self, raw: float) -> float | None:
        """Percentile (0-100) of ``raw`` among the calibration faces, by linear interpolation."""
        p = self.quality_percentiles
        if p is None:
            return None
        return float(np.interp(raw, p, np.linspace(0.0, 100.0, len(p))))


def _float(meta: dict, key: str) -> float | None:
    value = meta.get(METADATA_PREFIX + key)
    return None if value in (None, "", "null", "None") else float(value)


def read_calibration(meta: dict[str, str], settings: Settings) -> Calibration:
    cal = Calibration()
    cal.threshold = _float(meta, "verification_threshold")
    if cal.threshold is not None:
        cal.far = _float(meta, "verification_far")
        cal.calibrated_on = meta.get(METADATA_PREFIX + "verification_calibrated_on")
        cal.source = "model"
    if settings.verify_threshold is not None:  # the operator's choice wins, and says so
        cal.threshold, cal.far, cal.source = settings.verify_threshold, None, "setting"
        cal.calibrated_on = "FACEREC_VERIFY_THRESHOLD"
    percentiles = meta.get(METADATA_PREFIX + "quality_percentiles")
    if percentiles:
        p = np.asarray(json.loads(percentiles), dtype=np.float64)
        if p.ndim != 1 or len(p) < 2 or np.any(np.diff(p) < 0):
            raise ValueError("facerec.quality_percentiles must be a non-decreasing list of raw qualities")
        cal.quality_percentiles = p
        cal.quality_calibrated_on = meta.get(METADATA_PREFIX + "quality_calibrated_on")
    return cal


def _single(found: list[Path], what: str, folder: Path) -> Path:
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ModelNotFoundError(f"{folder}: expected one {what}, found {names}; set FACEREC_MODEL to the file")
    return found[0]


def model_files(settings: Settings, cuda: bool) -> tuple[Path, str, Path | None]:
    """(file to run, backend name, fp32 graph holding the calibration metadata or None)."""
    path = settings.model_path()
    folder = path if path.is_dir() else path.parent
    graphs = sorted(p for p in folder.glob("*.onnx") if not p.name.endswith(_NOT_GRAPHS))
    fp32_graph = graphs[0] if len(graphs) == 1 else None
    if path.is_file():
        backend = "torch" if path.suffix in (".pt", ".pth") else "onnxruntime"
        if path.suffix == ".onnx" and not path.name.endswith(_NOT_GRAPHS):
            fp32_graph = path
        return path, backend, fp32_graph
    backend = settings.backend
    if backend == "auto":
        # The GPU is served through torch: it is the path tested on GPUs (see docs/export_runtime.md);
        # onnxruntime on the CPU, where it is ~2x faster than eager torch for these models.
        has_torch = any(folder.glob("*.pt"))
        backend = "torch" if (cuda and has_torch) or not graphs else "onnxruntime"
    if backend == "torch":
        return _single(sorted(folder.glob("*.pt")), "torch artefact (*.pt)", folder), backend, fp32_graph
    if settings.precision == "fp16":
        return _single(sorted(folder.glob("*.fp16.onnx")), "fp16 graph", folder), backend, fp32_graph
    return _single(graphs, "fp32 ONNX graph", folder), backend, fp32_graph


# How long a shutdown waits for a warm-up still running (a GPU warm-up with torch.compile can take
# a minute; a CPU one takes seconds).
WARMUP_JOIN_S = 120.0


class Engine:
    def __init__(self, settings: Settings, metrics=None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ready = False
        self.warmup_error: str | None = None
        self.inflight = 0
        self._loaded = False

    # ------------------------------------------------------------------ start / stop
    def load(self) -> None:
        """Build everything; raises (and the service does not start) on any problem."""
        from facerec.export import read_metadata

        s = self.settings
        self.device = resolve_device(s.device)
        path, backend_name, fp32_graph = model_files(s, self.device.is_cuda)
        kw: dict = {}
        if backend_name == "torch":
            kw = {"compile": s.torch_compile}
            if s.precision == "fp16":
                kw["amp"] = "fp16"
        else:
            kw = {"max_batch_size": s.max_batch_size}
        self.backend = load_backend(path, backend=backend_name, device=self.device, **kw)
        meta = read_metadata(fp32_graph) if fp32_graph is not None else {}
        if meta and meta.get(METADATA_PREFIX + "contract_id") != self.backend.contract.contract_id:
            raise ValueError(f"{fp32_graph} (calibration) and {path} are different models (contract ids differ)")
        self.calibration = read_calibration(meta, s)
        self.ood = self._load_ood(path)
        # The pipeline below is built without a detector: it locates faces with the default one.
        scorer = FeatureListScorer(self.ood, DEFAULT_FACE_DETECTOR) if self.ood is not None else None
        self.executor = ThreadPoolExecutor(max_workers=s.decode_workers, thread_name_prefix="facerec-decode")
        self.batcher = MicroBatcher(
            self.backend, s.max_batch_size, s.max_wait_ms, s.max_pending,
            on_batch=self.metrics.on_batch if self.metrics is not None else None,
        )
        self.pipeline = FacePipeline(
            self.backend, batcher=self.batcher, ood_scorer=scorer, max_faces=s.max_faces,
            min_face_size=s.min_face_size, max_pixels=s.max_pixels, max_bytes=s.max_image_bytes,
            executor=self.executor,
        )
        self.images = ImageAdmission(self.executor, s.large_image_pixels, s.large_image_workers,
                                     s.max_queued_large_images)
        self.model_path = path
        self._loaded = True
        log.info("model %s (%s) on %s via %s", path, self.backend.contract.contract_id,
                 self.backend.device, self.backend.provider)

    def _load_ood(self, model_path: Path):
        setting = self.settings.ood
        if setting is not None and setting.lower() == "none":
            return None
        folder = model_path if model_path.is_dir() else model_path.parent
        path = Path(setting) if setting else folder / "ood.npz"
        if not path.exists():
            if setting:  # asked for explicitly: missing is an error, not a silent "no OOD"
                raise FileNotFoundError(f"FACEREC_OOD={setting} does not exist")
            return None
        from facerec import ood

        detector = ood.load(path, self.backend.contract)  # ContractMismatchError for another model
        if detector.combiner is None:
            raise ValueError(f"{path}: the OOD detector has no fitted combiner")
        return detector

    def warm_up(self) -> None:
        """Kernels per batch shape and the detector's sessions, before the service reports ready."""
        try:
            sizes = sorted({1, min(8, self.settings.max_batch_size), self.settings.max_batch_size})
            if hasattr(self.backend, "warmup"):
                self.backend.warmup(tuple(sizes))
            blank = np.full((160, 160, 3), 128, np.uint8)
            with contextlib.suppress(NoFaceError):
                self.pipeline.locate(blank)
            self.ready = True
        except Exception as exc:  # reported by readiness; the service stays not-ready
            log.exception("warm-up failed")
            # Readiness is unauthenticated: it says what failed, the log says why (the exception
            # text can name server paths).
            self.warmup_error = f"warm-up failed ({type(exc).__name__}); the server log has the details"

    async def start(self) -> None:
        if self.settings.warmup:
            # In a thread: liveness answers while a GPU / torch.compile warm-up takes its time.
            self._warmup_thread = threading.Thread(target=self.warm_up, name="facerec-warmup", daemon=True)
            self._warmup_thread.start()
        else:
            self.ready = True

    async def close(self) -> None:
        self.ready = False
        warmup = getattr(self, "_warmup_thread", None)
        if warmup is not None and warmup.is_alive():
            # A shutdown during warm-up waits for it (bounded): a daemon thread still inside
            # onnxruntime when the interpreter exits aborts the process ("terminate called
            # without an active exception", exit 134) instead of a clean stop.
            await asyncio.to_thread(warmup.join, WARMUP_JOIN_S)
        if self._loaded:
            await self.batcher.close(drain=True)
            self.executor.shutdown(wait=False)
            self.images.shutdown()

    # ------------------------------------------------------------------ serving
    def provider_active(self) -> bool:
        """Re-checked on every readiness probe: the provider in use is the one the device needs."""
        if not self._loaded:
            return False
        session = getattr(self.backend, "session", None)
        if session is None:  # torch: the device is fixed at load and verified there
            return True
        active = session.get_providers()[0]
        return active != "CPUExecutionProvider" if self.device.is_cuda else True

    def checks(self) -> dict[str, bool]:
        return {
            "model_loaded": self._loaded,
            "provider_active": self.provider_active(),
            "warmup_done": self.ready,
            "accepting": self._loaded and not self.batcher._closed,
        }

    @contextlib.asynccontextmanager
    async def admit(self):
        """Bound the requests in decode/detect/model at once; beyond it answer 429 immediately,
        before any work, as the batcher does for faces. Within a request every image is admitted
        again by its size in ``process`` (``ImageAdmission``): a request of many large images
        counts once here, but cannot take the decode threads that small images need."""
        limit = self.settings.max_concurrent_requests
        if self.inflight >= limit:
            raise Overloaded(self.batcher.retry_after(), self.inflight, limit, what="too many concurrent requests",
                             unit="requests in progress, FACEREC_MAX_CONCURRENT_REQUESTS")
        self.inflight += 1
        if self.metrics is not None:
            self.metrics.inflight.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= 1
            if self.metrics is not None:
                self.metrics.inflight.set(self.inflight)
                self.metrics.pending.set(self.batcher.pending)

    async def process(self, data: bytes, all_faces: bool = False):
        """One image: large ones (header pixel count) in their own bounded lane, see ``admit``."""
        async with self.images.admit(data) as executor:
            return await self.pipeline.process_async(data, all_faces=all_faces, executor=executor)

    async def process_many(self, images: dict[str, bytes]) -> dict:
        """Several images concurrently; the first failure (in field order) is raised with its field."""
        names = list(images)
        results = await asyncio.gather(*(self.process(images[n]) for n in names), return_exceptions=True)
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                raise from_exception(result, name) or result
        return dict(zip(names, results))
