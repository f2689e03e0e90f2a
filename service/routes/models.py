"""GET /v1/models: the model in use, its contract, device and providers, calibration and limits."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from service.auth import ApiKey
from service.routes.common import ERROR_RESPONSES
from service.schemas import ModelsResponse

router = APIRouter(prefix="/v1", tags=["models"])


def quality_info(engine) -> dict:
    cal, fallback = engine.calibration, engine.quality_fallback
    info = {"method": engine.quality_method, "head": "quality" in engine.backend.output_names,
            "percentile_mapping": cal.quality_percentiles is not None, "calibrated_on": cal.quality_calibrated_on}
    if fallback is not None:
        info["chosen_by"] = fallback.meta.get("chosen_by")
        info["candidates"] = fallback.meta.get("candidates")
    return info


@router.get("/models", response_model=ModelsResponse, responses={401: ERROR_RESPONSES[401]},
            summary="Model, contract, device and providers in use")
async def models(request: Request, _: ApiKey) -> ModelsResponse:
    engine = request.app.state.engine
    s = engine.settings
    info = engine.backend.describe()
    # Names, not server paths: a client has no use for the filesystem layout (the start-up log has it).
    path = Path(info.pop("path", None) or engine.model_path)
    info["folder"], info["file"] = (path.parent.name, path.name) if path.suffix else (path.name, None)
    cal = engine.calibration
    providers = info.get("providers") or [info["provider"]]
    ood = None
    if engine.ood is not None:
        d = engine.ood
        ood = {"method": "mahalanobis", "variant": d.variant, "layers": len(d.layers),
               # the model outputs its layers read: feature_k, or an imported graph's embedding
               "layer_outputs": d.meta.get("layer_outputs"),
               "threshold": d.threshold, "target_tpr": d.target_tpr, "contract_id": d.contract_id,
               # the face detector whose confidence is one more combiner column (None: features only)
               "detector_confidence": None if d.detection is None else d.detection.detector}
    return ModelsResponse(
        model=info,
        contract=info["contract"],
        contract_id=info["contract_id"],
        device={"requested": s.device, "active": engine.backend.device, "provider": engine.backend.provider,
                "gpu_probe": info["device_policy"]["gpu_probe"]},
        providers=providers,
        verification={"threshold": cal.threshold, "far": cal.far, "calibrated_on": cal.calibrated_on,
                      "source": cal.source},
        quality=quality_info(engine),
        ood=ood,
        detector={**engine.detector_plan.describe(), "max_side": s.detect_max_side},
        limits={"max_image_bytes": s.max_image_bytes, "max_request_bytes": s.max_request_bytes,
                "max_pixels": s.max_pixels, "max_faces": s.max_faces, "max_batch_size": s.max_batch_size,
                "max_wait_ms": s.max_wait_ms, "max_pending_faces": s.max_pending,
                "max_batch_images": min(s.max_batch_images, s.max_pending),
                "max_concurrent_requests": s.max_concurrent_requests},
    )
