"""Service settings: one pydantic-settings class, read from ``FACEREC_*`` environment variables.

Values that would make the service unsafe or unbounded are refused at start (short or placeholder
API keys, limits above hard caps), so a typo in a deployment fails loudly instead of serving with
weak protection. There is deliberately no switch that turns authentication off: with no
``FACEREC_API_KEYS`` a random key is generated at start (see ``service.auth``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from facerec.runtime.device import DEVICE_ENV, parse_device_setting

# The repository's shipped model, used when FACEREC_MODEL is not set.
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "default"

MIN_KEY_LENGTH = 16
# Values people paste from examples; refused so an example key never guards a real deployment.
PLACEHOLDER_KEYS = {"changeme", "change-me", "secret", "password", "apikey", "api-key", "test", "example"}

MB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACEREC_", extra="ignore", validate_default=True)

    # ---- model and device
    model: Path | None = Field(
        None, description="folder made by `facerec export` (or one .onnx/.pt in it); default models/default"
    )
    ood: str | None = Field(
        None, description="OOD detector .npz; default <model folder>/ood.npz when present; 'none' disables"
    )
    device: str = Field("auto", description=f"{DEVICE_ENV}: auto | cuda | cuda:N | cpu (strict, see docs)")
    backend: Literal["auto", "onnxruntime", "torch"] = "auto"
    precision: Literal["fp32", "fp16"] = "fp32"
    torch_compile: bool = False
    verify_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="operator threshold; replaces the model's calibrated one"
    )

    # ---- face detector (service/detector.py)
    detector: Literal["mtcnn", "scrfd"] = Field(
        "mtcnn", description="mtcnn: the shipped MTCNN (onnxruntime on a CPU, torch on CUDA); scrfd: an "
        "insightface SCRFD model from FACEREC_DETECTOR_MODEL (facerec ships no SCRFD weights)")
    detector_model: Path | None = Field(
        None, description="scrfd: a folder holding det_*.onnx (e.g. insightface buffalo_l) or the file")
    # The longest side the detector sees: a larger image is detected on a shrunken copy, boxes and
    # landmarks mapped back (facerec.runtime.pipeline.DETECT_MAX_SIDE says what it costs and finds).
    detect_max_side: int = Field(1600, ge=160, le=8192)

    # ---- network
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    docs: bool = True  # /docs and /openapi.json
    demo_page: bool = True  # the static demo page at / (holds no key; calls the API with the typed one)

    # ---- limits (every one bounded: the service must not be made to allocate without limit)
    max_image_bytes: int = Field(10 * MB, ge=1024, le=100 * MB)
    max_request_bytes: int = Field(32 * MB, ge=2048, le=256 * MB)
    max_pixels: int = Field(40_000_000, ge=10_000, le=100_000_000)
    max_faces: int = Field(10, ge=1, le=100)
    min_face_size: float = Field(20.0, ge=8.0, le=1000.0)
    max_batch_size: int = Field(32, ge=1, le=256)
    # Images of one POST /v1/embed/batch; more: 413. Their faces are queued at once, so the limit in
    # force is the smaller of this and max_pending.
    max_batch_images: int = Field(32, ge=1, le=256)
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0)
    max_pending: int = Field(256, ge=1, le=10_000)  # faces queued for the model
    max_concurrent_requests: int = Field(64, ge=1, le=10_000)  # requests being decoded/detected/embedded
    decode_workers: int = Field(4, ge=1, le=64)
    # Images over large_image_pixels are decoded/detected in their own pool of large_image_workers
    # threads, so they never hold the decode_workers that small images need (facerec.runtime.admission);
    # at most max_queued_large_images wait for it, beyond: 429.
    large_image_pixels: int = Field(4_000_000, ge=100_000, le=100_000_000)
    large_image_workers: int = Field(2, ge=1, le=64)
    max_queued_large_images: int = Field(32, ge=0, le=10_000)
    warmup: bool = True

    # ---- connections (service/server.py): slow or idle clients cannot hold sockets for ever
    max_connections: int = Field(512, ge=1, le=100_000)  # open connections; requests beyond: 503
    header_timeout_s: float = Field(10.0, ge=0.5, le=300.0)  # request line + headers must be in by then
    body_timeout_s: float = Field(60.0, ge=0.5, le=3600.0)  # the whole body, from the end of the headers
    keepalive_timeout_s: float = Field(5.0, ge=0.5, le=300.0)  # an idle keep-alive connection is closed
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1 * MB)  # request line + headers (h11: 400 beyond)
    backlog: int = Field(2048, ge=1, le=65_535)  # connections the kernel queues before they are accepted

    # ---- galleries (1:N identification, docs/gallery.md)
    gallery_backend: Literal["sqlite", "pgvector"] = "sqlite"
    gallery_path: Path | None = Field(
        None, description="SQLite gallery file; default $XDG_DATA_HOME/facerec/galleries.sqlite3")
    gallery_dsn: str | None = Field(None, repr=False, description="PostgreSQL DSN (pgvector backend)")
    gallery_pg_purge: Literal["none", "vacuum", "full"] = "vacuum"  # after deletions (pgvector)
    # The SQLite backend's in-process index (docs/gallery.md, "Search at scale"): exact below
    # gallery_index_min_samples samples, approximate (faiss HNSW, exact re-ranking) from there on.
    gallery_index: Literal["auto", "exact", "approximate"] = Field(
        "auto", description="auto: approximate from gallery_index_min_samples on when faiss is installed; "
        "approximate: always (faiss required)")
    gallery_index_min_samples: int = Field(50_000, ge=0, le=10**9)
    # HNSW candidates explored per search; unset: the index chooses the smallest that reaches
    # gallery_index_recall (recall@1 against exact search, measured at build)
    gallery_index_ef_search: int | None = Field(None, ge=8, le=4096)
    gallery_index_recall: float = Field(0.99, ge=0.5, le=1.0)

    # ---- person metadata (docs/gallery.md): refused with 422 invalid_metadata above these limits.
    # The upper bounds are the stores' own hard caps (facerec.gallery.metadata.STORE_LIMITS).
    metadata_max_bytes: int = Field(16 * 1024, ge=256, le=1 * MB)  # serialised as compact UTF-8 JSON
    metadata_max_keys: int = Field(64, ge=1, le=10_000)  # keys of one object (each nested one too)
    metadata_max_depth: int = Field(8, ge=1, le=32)  # nesting levels; the metadata object is level 1
    metadata_max_string: int = Field(1024, ge=16, le=64 * 1024)  # characters of one key or string

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _strong_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(
                    f"FACEREC_API_KEYS: every key needs at least {MIN_KEY_LENGTH} characters "
                    "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
            if key.lower() in PLACEHOLDER_KEYS or len(set(key)) < 4:
                raise ValueError("FACEREC_API_KEYS: a placeholder or low-entropy key is not accepted")
            if any(c.isspace() or not c.isprintable() for c in key):
                raise ValueError("FACEREC_API_KEYS: keys cannot contain whitespace or control characters")
        return keys

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        parse_device_setting(value)  # ValueError names the accepted values
        return value.strip().lower()

    @field_validator("ood")
    @classmethod
    def _ood(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else value.strip()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_request_bytes < self.max_image_bytes:
            raise ValueError("max_request_bytes must be at least max_image_bytes")
        if self.torch_compile and self.backend == "onnxruntime":
            raise ValueError("torch_compile needs the torch backend")
        if self.detector == "scrfd" and self.detector_model is None:
            raise ValueError("FACEREC_DETECTOR=scrfd needs FACEREC_DETECTOR_MODEL: a folder with det_*.onnx "
                             "(e.g. insightface buffalo_l) or the file; facerec ships no SCRFD weights")
        if self.gallery_backend == "pgvector" and not self.gallery_dsn:
            raise ValueError("FACEREC_GALLERY_BACKEND=pgvector needs FACEREC_GALLERY_DSN (a PostgreSQL DSN)")
        if self.gallery_index == "approximate":
            from facerec.gallery.ann_policy import INSTALL_HINT, faiss_module

            if faiss_module() is None:
                raise ValueError(f"FACEREC_GALLERY_INDEX=approximate needs faiss, which is not installed: "
                                 f"{INSTALL_HINT}")
        return self

    def model_path(self) -> Path:
        """FACEREC_MODEL, else the shipped models/default; a clear error when neither exists."""
        path = self.model if self.model is not None else DEFAULT_MODEL_DIR
        if not path.exists():
            where = f"FACEREC_MODEL={self.model}" if self.model is not None else f"the default {path}"
            raise ModelNotFoundError(
                f"no model found ({where} does not exist). Export one with `facerec export "
                f"<checkpoint> --out {DEFAULT_MODEL_DIR}` (a training checkpoint), or "
                f"`facerec export --model vit_tiny_fiqa --random-init --out /tmp/m` for an untrained "
                f"smoke-test model, then set FACEREC_MODEL to that folder."
            )
        return path


# FACEREC_* variables that are not settings of the service but that other parts of the project
# read, so facerec-serve accepts them in its environment (a shell that trains and serves, the
# container, CI). tests/test_service_env.py fails when a FACEREC_* name appears in the repository
# that is neither a setting nor listed here.
OTHER_VARIABLES = {
    "FACEREC_DATA": "the shared data root (facerec.data.protocol, tests, benchmarks)",
    "FACEREC_PINS": "the Pins folder of the training pool (data.pins)",
    "FACEREC_CACHE": "where MTCNN's ONNX files are cached (facerec.data.mtcnn_onnx)",
    "FACEREC_API_KEYS_FILE": "a file of API keys, read by the container entrypoint",
    "FACEREC_REQUIRE_PGVECTOR": "tests: a PostgreSQL + pgvector server must start",
    "FACEREC_ACCURACY_REPORT": "tests: where the service accuracy check writes its figures",
    "FACEREC_ACCURACY_PAIRS": "tests: how many pairs the service accuracy check uses",
    "FACEREC_SCREENSHOT": "tests: where the demo-page test saves its screenshot",
    "FACEREC_GALLERY_SCREENSHOT": "tests: where the demo page's gallery-tab test saves its screenshot",
    "FACEREC_TEST_KILL_AT_STEP": "tests: the trainer kills itself after this step",
    "FACEREC_TEST_KILL_IN_CHECKPOINT_WRITE": "tests: a checkpoint write kills the process",
    "FACEREC_TEST_NODE": "tests: the name of a simulated training node",
    "FACEREC_TEST_PROBE_DIR": "tests: where training processes record their environment",
    # docker compose substitutes these into deploy/compose.yaml from the shell
    "FACEREC_IMAGE": "compose: the image", "FACEREC_MODELS_DIR": "compose: the models folder",
    "FACEREC_MODEL_NAME": "compose: the model folder's name", "FACEREC_BIND": "compose: the host address",
    "FACEREC_HOST_PORT": "compose: the host port", "FACEREC_API_KEYS_PATH": "compose: the API key file",
}


def setting_variables() -> set[str]:
    """The environment variable of every setting (FACEREC_ + the field name in capitals)."""
    return {f"FACEREC_{name.upper()}" for name in Settings.model_fields}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A message for each FACEREC_* variable of ``environ`` that nothing in facerec reads (a
    misspelt setting would otherwise be ignored without a word); empty when there is none."""
    from facerec.registry import did_you_mean

    settings = setting_variables()
    known = settings | set(OTHER_VARIABLES)
    return [f"{name} is not a facerec setting{did_you_mean(name.upper(), settings)}"
            for name in sorted(environ) if name.upper().startswith("FACEREC_") and name.upper() not in known]


class ModelNotFoundError(RuntimeError):
    """No exported model where the settings point."""
