"""Request and response bodies of the gallery routes, and the types of their path parameters.

The bodies are pydantic models with strict types and no unknown fields; the marks (``FPIR_MARK``,
``METADATA_MARK``) flag the schema parts that ``service.routes.gallery_openapi`` fills in at run
time from the settings and the model's calibration.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from facerec.gallery import EnrollmentPolicy, MetadataLimits, Reason
from facerec.gallery.metadata import DEFAULT_LIMITS
from facerec.gallery.policy import JsonInt
from facerec.gallery.store import ID_PATTERN, MAX_NAME, NAME_PATTERN
from service.inputs import B64_PATTERN
from service.schemas import CONTRACT_IN, EmbeddingIn, ImageReport

MAX_IMAGES_PER_REQUEST = 32
_B64 = "image file (JPEG, PNG, WebP, ...), base64 encoded; a data: URI prefix is accepted"


# Vendor extensions marking the schema parts that depend on the running service; ``openapi_for``
# replaces the defaults there with the settings and the model's calibration.
FPIR_MARK = {"x-facerec": "fpir"}
# A search names a threshold or an FPIR, not both (null counts as absent).
BOTH_THRESHOLD_AND_FPIR = {"required": ["threshold", "fpir"],
                           "properties": {"threshold": {"type": "number"}, "fpir": {"type": "number"}}}
METADATA_MARK = {"x-facerec": "metadata"}


# ============================================================================ schemas
class _Strict(BaseModel):
    # Unknown fields are an error, and types are strict: a JSON `true` is not the number 1, "0.5"
    # is not a number (the schema says so; multipart text is converted with strict=False).
    model_config = ConfigDict(extra="forbid", strict=True)


Name = Annotated[
    str,
    Field(min_length=1, max_length=MAX_NAME, json_schema_extra={"pattern": NAME_PATTERN},
          description="no control characters or line separators; surrounding spaces are dropped"),
]
Id = Annotated[str, Field(pattern=ID_PATTERN, description="32 hexadecimal digits")]
_LIMITS = DEFAULT_LIMITS


def metadata_text(limits: MetadataLimits) -> str:
    return (
        "a JSON object the client owns, returned as given. Limits (FACEREC_METADATA_MAX_*): "
        f"{limits.max_bytes} bytes as compact UTF-8 JSON, {limits.max_keys} keys per object, "
        f"{limits.max_depth} levels of nesting (the object itself is level 1), "
        f"{limits.max_string} characters per key or string, no NaN or Infinity; beyond them 422 "
        "`invalid_metadata`"
    )


Metadata = Annotated[
    dict[str, Any],
    Field(
        description=metadata_text(_LIMITS),
        json_schema_extra={"maxProperties": _LIMITS.max_keys,
                           "propertyNames": {"maxLength": _LIMITS.max_string}, **METADATA_MARK},
    ),
]
B64Image = Annotated[str, Field(description=_B64, json_schema_extra={"minLength": 1, "pattern": B64_PATTERN})]
Images = Annotated[list[B64Image], Field(min_length=1, max_length=MAX_IMAGES_PER_REQUEST)]


def _no_default(schema: dict) -> None:
    # Absent means unchanged; the None default is no value a client may send for a non-nullable field.
    schema.pop("default", None)


def _patch_of(model: type[BaseModel]) -> type[BaseModel]:
    """``model`` with every field optional (absent: unchanged), same types and bounds."""
    fields = {
        name: (Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation,
               Field(None, description=f.description, json_schema_extra=_no_default))
        for name, f in model.model_fields.items()
    }
    return create_model(f"{model.__name__}Patch", __base__=_Strict, **fields)


EnrollmentPolicyPatch = _patch_of(EnrollmentPolicy)


class GalleryCreate(_Strict):
    name: Name
    policy: EnrollmentPolicy | None = Field(
        None, description="enrollment gate (default: the standard policy)"
    )
    target_fpir: float | None = Field(
        None, gt=0, lt=1, description="FPIR of the match threshold (default: the calibration's, 0.01)",
        json_schema_extra=FPIR_MARK,
    )
    match_threshold: float | None = Field(None, ge=-1, le=1, description="fixed threshold instead")


class GalleryUpdate(_Strict):
    name: Name | None = None
    policy: EnrollmentPolicyPatch | None = Field(None, description="policy fields to change")
    target_fpir: float | None = Field(None, gt=0, lt=1, json_schema_extra=FPIR_MARK)
    match_threshold: float | None = Field(None, ge=-1, le=1, description="null: use the calibrated one")


class OperatingPointOut(BaseModel):
    threshold: float
    source: Literal["model", "gallery", "request"]
    fpir: float | None = Field(..., description="false-positive identification rate it was calibrated for")
    calibrated_on: str | None
    gallery_size: int = Field(..., description="samples in the gallery")
    calibrated_gallery_size: int | None = Field(..., description="gallery size of the calibration used")
    beyond_calibration: bool = Field(..., description="the gallery is larger than any calibrated size")
    calibration_method: Literal["searches", "pairs"] | None = Field(
        ..., description="validation searches at this size, or impostor pairs extrapolated to it"
    )


class IndexRecallOut(BaseModel):
    recall_at_1: float | None = Field(
        ..., description="share of the measuring searches whose best person is exact search's best person")
    searching: Literal["graph", "exact"] | None = Field(
        None, description="graph: searches go through the HNSW graph; exact: at the target recall the graph was "
        "measured slower than comparing every sample, so every sample is compared (recall 1)")
    graph_ms: float | None = Field(None, description="median time of one graph search at ef_search, when measured")
    exact_ms: float | None = Field(None, description="median time of one search comparing every sample")
    ef_search: int | None = Field(None, description="the ef_search it was measured at (the index's)")
    target: float | None = Field(None, description="the recall the index chose its ef_search for (null: a "
                                 "fixed ef_search)")
    by_ef_search: dict[str, float] | None = Field(None, description="recall@1 at each ef_search tried")
    queries: int = Field(..., description="searches measured")
    samples: int = Field(..., description="samples in the index when it was measured")
    how: str = Field(..., description="what the searches were")


class IndexOut(BaseModel):
    """How searches of the gallery run (docs/gallery.md, "Search at scale")."""

    model_config = ConfigDict(extra="ignore")

    kind: Literal["exact", "hnsw", "pgvector_hnsw"] = Field(
        ..., description="exact: every sample compared; hnsw: the in-process FAISS HNSW index (its candidates "
        "re-ranked exactly); pgvector_hnsw: PostgreSQL's HNSW index")
    loaded: bool | None = Field(None, description="the in-process index is in memory (false: read at the next "
                                "search)")
    building: bool | None = Field(None, description="an approximate index is being built (searches use the "
                                  "current one meanwhile)")
    samples: int | None = Field(None, description="samples the loaded index holds")
    m: int | None = Field(None, description="HNSW graph degree")
    ef_construction: int | None = Field(None, description="HNSW candidates explored per insertion at build")
    ef_search: int | None = Field(None, description="HNSW candidates explored per search")
    target_recall: float | None = Field(None, description="recall@1 the index tunes its ef_search to")
    pca_dims: int | None = Field(None, description="principal components the graph compares (null: all)")
    storage: str | None = Field(None, description="what the HNSW graph compares: sq8 (8-bit), fp16 or flat "
                                "(float32); results are re-ranked on the float32 embeddings")
    recall: IndexRecallOut | None = Field(None, description="recall@1 against exact search, measured when the "
                                          "index was built; null where not measured (see the docs)")


class GalleryOut(BaseModel):
    id: str
    name: str
    contract_id: str
    embedding_size: int
    model_name: str
    created_at: str
    persons: int
    samples: int
    policy: EnrollmentPolicy
    target_fpir: float
    match_threshold: float | None
    usable: bool = Field(..., description="false when the service runs another model than the gallery's")
    operating_point: OperatingPointOut | None = Field(..., description="the match threshold now in force")
    index: IndexOut | None = Field(None, description="how searches run and their measured recall@1 (in `GET` "
                                   "of one gallery; null in the other answers)")


class GalleryList(BaseModel):
    galleries: list[GalleryOut]


class SampleOut(BaseModel):
    id: str
    created_at: str
    info: dict = Field(..., description="measurements at enrollment (detector score, size, pose, quality)")


class PersonOut(BaseModel):
    id: str
    name: str
    metadata: dict
    created_at: str
    samples: int
    metadata_error: str | None = Field(
        None, description="why `metadata` is {}: the stored value cannot be returned (written by an "
        "older version without the metadata limits); replace it with PATCH")


class PersonDetail(PersonOut):
    sample_list: list[SampleOut]


class PersonList(BaseModel):
    persons: list[PersonOut]
    total: int
    limit: int
    offset: int


class PersonUpdate(_Strict):
    name: Name | None = None
    metadata: Metadata | None = Field(None, description="replaces the stored metadata")


class ReasonOut(BaseModel):
    code: Reason
    message: str


class ImageOutcome(BaseModel):
    index: int
    status: Literal["enrolled", "refused", "error"]
    reasons: list[ReasonOut] = Field(default_factory=list, description="why it was refused")
    sample_id: str | None = None
    measurements: dict | None = None
    duplicate_of: dict | None = None
    error: dict | None = Field(None, description="{code, message} when the image itself is unusable")


class EnrollResponse(BaseModel):
    person: PersonOut | None
    created: bool
    enrolled: int
    refused: int
    results: list[ImageOutcome]


class PersonEnrollJSON(_Strict):
    name: Name
    metadata: Metadata | None = None
    images: Images


class SamplesJSON(_Strict):
    images: Images


class BatchPerson(_Strict):
    # Exactly one of name (a new person) and person_id (an existing one): said in the schema too.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["name"], "properties": {"name": {"type": "string"}, "person_id": {"type": "null"}}},
        {"required": ["person_id"], "properties": {"person_id": {"type": "string"}, "name": {"type": "null"},
                                                   "metadata": {"type": "null"}}},
    ]})
    name: Name | None = Field(None, description="a new person")
    person_id: Id | None = Field(None, description="add to this person instead of creating one")
    metadata: Metadata | None = Field(None, description="a new person's metadata (with `name` only: "
                                      "PATCH an existing person to change its metadata)")
    images: Images


class BatchEnrollJSON(_Strict):
    persons: list[BatchPerson] = Field(
        ..., min_length=1, max_length=MAX_IMAGES_PER_REQUEST,
        description=f"at most {MAX_IMAGES_PER_REQUEST} images in all persons together")


class BatchEnrollResponse(BaseModel):
    persons: list[EnrollResponse]


class SearchJSON(_Strict):
    image: B64Image | None = None
    embedding: EmbeddingIn | None = Field(None, description="search with an embedding the client kept "
                                          "(from /v1/embed or /v1/detect) instead of an image; needs "
                                          "`contract_id`")
    contract_id: str | None = Field(None, max_length=64, description=CONTRACT_IN)
    model_config = ConfigDict(json_schema_extra={
        "not": BOTH_THRESHOLD_AND_FPIR,
        "oneOf": [{"required": ["image"]}, {"required": ["embedding"]}],
        "dependentRequired": {"embedding": ["contract_id"]},
    })

    @model_validator(mode="after")
    def _one_input(self) -> SearchJSON:
        if (self.image is None) == (self.embedding is None):
            raise ValueError("give `image` or `embedding` (exactly one)")
        if self.embedding is not None and self.contract_id is None:
            raise ValueError("`contract_id` is required with `embedding`")
        return self

    top_k: JsonInt = Field(5, ge=1, le=50)
    threshold: float | None = Field(None, ge=-1, le=1, description="cosine threshold for this request")
    fpir: float | None = Field(None, gt=0, lt=1, description="calibrated FPIR to use for this request",
                               json_schema_extra=FPIR_MARK)


class CandidateOut(BaseModel):
    person_id: str
    name: str
    similarity: float = Field(..., description="cosine of the person's best-matching sample, -1..1")
    sample_id: str


class SearchResponse(BaseModel):
    decision: Literal["match", "unknown"]
    person: PersonOut | None = Field(..., description="the matched person (decision match)")
    similarity: float | None = Field(..., description="best candidate's similarity (null: empty gallery)")
    threshold: float
    operating_point: OperatingPointOut
    candidates: list[CandidateOut] = Field(..., description="top-k persons, best first")
    contract_id: str
    image: ImageReport | None = Field(..., description="the searched face (null for a search by embedding)")


# ============================================================================ path parameters
def _path_id(what: str):
    return Annotated[str, PathParam(pattern=ID_PATTERN, description=f"the {what}'s id: 32 hexadecimal digits")]


# The schema states the id format, so a malformed id is refused by validation (422) like any other
# schema violation; an unknown well-formed id is the store's 404.
GalleryId, PersonId, SampleId = _path_id("gallery"), _path_id("person"), _path_id("sample")
