"""The inference engine behind the routes: the model folder, device policy, pipeline, batcher,
calibration (threshold, quality percentiles), quality measure, OOD detector, warm-up and admission
control.

Everything that can make the service unusable (no model, a GPU that cannot be used under the
strict device policy, an OOD detector fitted on another model) fails in ``Engine.load``, i.e. at
start, with a message saying why; nothing falls back silently.

The model folder (which file to run, its calibration, its OOD detector's file) is read through
:class:`facerec.bundle.ModelBundle`, the one owner of that folder, as every offline tool reads it;
what is the service's own here is the operator's threshold (``FACEREC_VERIFY_THRESHOLD``), which
replaces the calibrated one and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from facerec.bundle import BundleError, Calibration, ModelBundle
from facerec.runtime import (
    FacePipeline,
    FeatureListScorer,
    MicroBatcher,
    NoFaceError,
    Overloaded,
    load_backend,
    resolve_device,
)
from facerec.runtime.admission import ImageAdmission
from facerec.runtime.quality import HEAD_OUTPUT, QualityFallback
from service.detector import build_detector, plan_detector
from service.errors import from_exception
from service.settings import ModelNotFoundError, Settings

log = logging.getLogger("service")


def with_operator_threshold(cal: Calibration, settings: Settings) -> Calibration:
    """The operator's threshold (FACEREC_VERIFY_THRESHOLD) wins over the model's, and says so."""
    if settings.verify_threshold is None:
        return cal
    return dataclasses.replace(cal, threshold=settings.verify_threshold, far=None, source="setting",
                               calibrated_on="FACEREC_VERIFY_THRESHOLD")


def model_files(settings: Settings, cuda: bool) -> tuple[ModelBundle, Path, str]:
    """(the model folder, the file to run, backend name) for the settings."""
    model = ModelBundle(settings.model_path())
    try:
        path, backend = model.serving_file(settings.backend, settings.precision, cuda)
    except BundleError as err:
        raise ModelNotFoundError(f"{err} with FACEREC_MODEL") from None
    return model, path, backend


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
        s = self.settings
        self.device = resolve_device(s.device)
        self.bundle, path, backend_name = model_files(s, self.device.is_cuda)
        kw: dict = {}
        if backend_name == "torch":
            kw = {"compile": s.torch_compile}
            if s.precision == "fp16":
                kw["amp"] = "fp16"
        else:
            kw = {"max_batch_size": s.max_batch_size}
        self.backend = load_backend(path, backend=backend_name, device=self.device, **kw)
        # ContractMismatchError when the calibrated graph and the file run are different models.
        cal = self.bundle.calibration(self.backend.contract.contract_id)
        self.quality_fallback = self._load_quality_fallback()
        if self.quality_fallback is not None:  # its 0-100 mapping travels with the measure
            cal = dataclasses.replace(cal, quality_percentiles=self.quality_fallback.percentiles,
                                      quality_calibrated_on=self.quality_fallback.calibrated_on)
        self.calibration = with_operator_threshold(cal, s)
        self.ood = self._load_ood()
        if self.ood is not None and not (backend_name == "torch" and not self.device.is_cuda):
            _single_threaded_torch()
        self.detector_plan = plan_detector(s, self.device)
        detector = build_detector(self.detector_plan)
        scorer = FeatureListScorer(self.ood, self.detector_plan.name) if self.ood is not None else None
        self.executor = ThreadPoolExecutor(max_workers=s.decode_workers, thread_name_prefix="facerec-decode")
        self.batcher = MicroBatcher(
            self.backend, s.max_batch_size, s.max_wait_ms, s.max_pending,
            on_batch=self.metrics.on_batch if self.metrics is not None else None,
        )
        self.pipeline = FacePipeline(
            self.backend, detector=detector, batcher=self.batcher, ood_scorer=scorer,
            quality_fallback=self.quality_fallback, max_faces=s.max_faces,
            min_face_size=s.min_face_size, max_pixels=s.max_pixels, max_bytes=s.max_image_bytes,
            detect_max_side=s.detect_max_side, executor=self.executor,
        )
        self.images = ImageAdmission(self.executor, s.large_image_pixels, s.large_image_workers,
                                     s.max_queued_large_images)
        self.model_path = path
        self._loaded = True
        log.info("model %s (%s) on %s via %s", path, self.backend.contract.contract_id,
                 self.backend.device, self.backend.provider)

    @property
    def quality_method(self) -> str | None:
        """Where a face's quality comes from: the model's own output, the fallback measure chosen by
        ``facerec fit-quality``, or nowhere (None)."""
        if "quality" in self.backend.output_names:
            return HEAD_OUTPUT
        return None if self.quality_fallback is None else self.quality_fallback.method

    def _load_quality_fallback(self):
        path = self.bundle.quality_path
        if not path.exists():
            return None
        if "quality" in self.backend.output_names:
            log.warning("%s is ignored: the model has its own quality output", path.name)
            return None
        # ContractMismatchError when it was fitted on another model.
        return QualityFallback.load(path, self.backend.contract.contract_id)

    def _load_ood(self):
        setting = self.settings.ood
        if setting is not None and setting.lower() == "none":
            return None
        path = Path(setting) if setting else self.bundle.ood_path
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

    async def locate(self, data: bytes, all_faces: bool = False, index: int | None = None,
                     aligned: bool = False):
        """Decode, detect, align one image: large ones (header pixel count) in their own bounded
        lane, see ``admit``."""
        async with self.images.admit(data) as executor:
            return await self.pipeline.locate_async(data, all_faces, executor, index, aligned)

    async def process(self, data: bytes, all_faces: bool = False, index: int | None = None,
                      aligned: bool = False):
        """One image through the whole pipeline (``FacePipeline.locate`` says what the options do)."""
        located = await self.locate(data, all_faces, index, aligned)
        return (await self.pipeline.embed_async([located]))[0]

    async def process_many(self, images: dict[str, bytes], aligned: bool = False,
                           indexes: dict[str, int | None] | None = None) -> dict:
        """Several images concurrently; the first failure (in field order) is raised with its field."""
        names = list(images)
        indexes = indexes or {}
        results = await asyncio.gather(*(self.process(images[n], index=indexes.get(n), aligned=aligned)
                                         for n in names), return_exceptions=True)
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                raise from_exception(result, name) or result
        return dict(zip(names, results))

    async def process_batch(self, images: list, aligned: bool = False) -> list:
        """The largest face of each image, their crops through the model as one submission (the
        batcher runs them together, ``max_batch_size`` at a time). An entry is the image's result
        or the exception of its own input fault (``images`` may hold such an exception already, from
        reading the request); overload, shutdown and server faults fail the whole call."""
        async def one(data):
            return data if isinstance(data, BaseException) else await self.locate(data, aligned=aligned)

        located = await asyncio.gather(*(one(d) for d in images), return_exceptions=True)
        for entry in located:
            if isinstance(entry, BaseException) and not _input_fault(entry):
                raise entry
        good = [entry for entry in located if not isinstance(entry, BaseException)]
        results = iter(await self.pipeline.embed_async(good) if good else [])
        return [entry if isinstance(entry, BaseException) else next(results) for entry in located]


def _single_threaded_torch() -> None:
    """Torch's CPU ops in one thread, where torch on the CPU does only small work (the OOD detector's
    few (faces x 192) products per batch; the model runs in onnxruntime or on the GPU). With its
    default thread pool every such op wakes and synchronises OpenMP threads: measured on the 2-core
    machine under load, scoring 1-8 faces took 10-50 ms of CPU and 100-600 ms of wall time instead of
    0.2-0.4 ms and 0.6-9 ms, and the threads spun on the cores detection needs."""
    import torch

    torch.set_num_threads(1)


def _input_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is the caller's fault in one input (a 4xx other than overload)."""
    err = from_exception(exc)
    return err is not None and 400 <= err.status < 500 and err.status != 429
