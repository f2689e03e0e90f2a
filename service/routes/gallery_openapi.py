"""The OpenAPI side of the gallery routes: their error answers, the request bodies the routes read
themselves (both encodings), and what the schema states at run time (``openapi_for``: the metadata
limits of the settings, the FPIRs of the model's calibration; installed on the app by
``state_limits_in_openapi``)."""

from __future__ import annotations

from pydantic import BaseModel

from facerec.gallery import MetadataLimits
from facerec.gallery.store import MAX_NAME, NAME_PATTERN
from service.routes.common import ERROR_RESPONSES
from service.routes.gallery_io import metadata_limits
from service.routes.gallery_schemas import (
    FPIR_MARK,
    MAX_IMAGES_PER_REQUEST,
    BatchEnrollJSON,
    PersonEnrollJSON,
    SamplesJSON,
    SearchJSON,
    metadata_text,
)

# Documented error answers of every gallery route.
GALLERY_ERRORS = {s: ERROR_RESPONSES[s] for s in (401, 413, 415, 422, 429, 503)}
GALLERY_ERRORS.update(
    {
        404: {"model": ERROR_RESPONSES[401]["model"], "description": "no such gallery / person / sample"},
        409: {
            "model": ERROR_RESPONSES[401]["model"],
            "description": "name taken, or the gallery was built with another model (contract_mismatch)",
        },
    }
)


def inline_refs(schema: dict) -> dict:
    """A pydantic JSON schema with its ``$defs`` inlined: refs like ``#/$defs/X`` would resolve
    against the root of the OpenAPI document, where there is no ``$defs`` (the models here are not
    recursive, so inlining ends)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk({**defs[ref.rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def body_doc(json_model: type[BaseModel], props: dict | None = None, required: list[str] | None = None) -> dict:
    """``openapi_extra`` documenting both encodings of a route that reads its body itself (JSON only
    when no multipart ``props`` are given)."""
    content = {"application/json": {"schema": inline_refs(json_model.model_json_schema())}}
    if props is not None:
        content = {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": props, "required": required or [],
                           "additionalProperties": False}
            },
            **content,
        }
    return {"requestBody": {"required": True, "content": content}}


_FILE = {"type": "string", "format": "binary"}
_IMAGES = {"type": "array", "items": _FILE, "minItems": 1, "maxItems": MAX_IMAGES_PER_REQUEST}
# Multipart text fields are parts of at most 64 KiB (read_form's max_part_size).
_METADATA = {"type": "string", "contentMediaType": "application/json", "maxLength": 64 * 1024,
             "description": "a JSON object, as text; the limits of `metadata` in the JSON form apply"}
_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": NAME_PATTERN}
SEARCH_DOC = body_doc(
    SearchJSON,
    {
        "image": _FILE,
        "top_k": {"type": "integer", "minimum": 1, "maximum": 50},
        "threshold": {"type": "number", "minimum": -1, "maximum": 1},
        "fpir": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, **FPIR_MARK},
    },
    ["image"],
)
# (The multipart schema cannot say "not both" as the JSON one does: schemathesis's generator fails on
# `not` next to binary parts. The description says it.)
SEARCH_DOC["requestBody"]["content"]["multipart/form-data"]["schema"]["description"] = (
    "give `threshold` or `fpir`, not both")
PERSON_DOC = body_doc(PersonEnrollJSON, {"name": _NAME, "metadata": _METADATA, "images": _IMAGES},
                      ["name", "images"])
SAMPLES_DOC = body_doc(SamplesJSON, {"images": _IMAGES}, ["images"])
BATCH_DOC = body_doc(BatchEnrollJSON)


def state_limits_in_openapi(app, galleries) -> None:
    """The schema at /openapi.json states this service's metadata limits and its model's calibrated
    FPIRs (FastAPI's documented way to extend the schema: replace ``app.openapi``)."""
    build = app.openapi
    fpirs = galleries.calibration.fpirs if galleries.calibration is not None else None

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_for(build(), metadata_limits(galleries.settings), fpirs)
        return app.openapi_schema

    app.openapi_schema = None
    app.openapi = openapi


def openapi_for(schema: dict, limits: MetadataLimits, fpirs: list[float] | None) -> dict:
    """The OpenAPI document with what this service enforces at run time: the metadata limits of its
    settings, and the FPIRs its model is calibrated for (the only ones a request may name). A model
    without open-set calibration takes no FPIR at all, and a new gallery then needs its own
    ``match_threshold``."""
    marked = False

    def walk(node):
        nonlocal marked
        if isinstance(node, dict):
            mark = node.get("x-facerec")
            if mark == "metadata":
                node.update(_metadata_object(limits, 1))
                node["description"] = metadata_text(limits)
                marked = True
            elif mark == "fpir":
                nullable = any(alt.get("type") == "null" for alt in node.get("anyOf", []))
                if fpirs:
                    node["enum"] = list(fpirs) + ([None] if nullable else [])
                elif nullable:  # nothing to name: only "not given"
                    node.pop("anyOf", None)
                    node["type"] = "null"
                    node["description"] = ("this model has no open-set calibration (openset.json): no FPIR "
                                           "can be named; give the gallery a `match_threshold`")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    if not fpirs:  # no calibrated threshold to fall back on: a gallery's threshold is a number
        components = schema.get("components", {}).get("schemas", {})
        for name in ("GalleryCreate", "GalleryUpdate"):
            if name in components:
                prop = components[name]["properties"]["match_threshold"]
                prop.pop("anyOf", None)
                prop.update(type="number", minimum=-1, maximum=1)
        if "GalleryCreate" in components:
            create = components["GalleryCreate"]
            create["required"] = sorted(set(create.get("required", [])) | {"match_threshold"})
    if marked:
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_metadata_levels(limits))
    return schema


# The metadata's values, one component per nesting level (level 1 is the metadata object): a value
# at level k may be an array or object only while k <= max_depth, so the depth limit is in the
# schema without recursion. The total size and key count cannot be said in JSON Schema: the
# description says them.
def _level_ref(k: int) -> dict:
    return {"$ref": f"#/components/schemas/PersonMetadataLevel{k}"}


def _metadata_object(limits: MetadataLimits, level: int) -> dict:
    return {
        "type": "object",
        "maxProperties": limits.max_keys,
        "propertyNames": {"maxLength": limits.max_string, "pattern": _NO_NUL},
        "additionalProperties": _level_ref(level + 1),
    }


_NO_NUL = "^[^\\x00]*$"


def _metadata_levels(limits: MetadataLimits) -> dict:
    levels = {}
    for k in range(2, limits.max_depth + 2):
        options = [
            {"type": "string", "maxLength": limits.max_string, "pattern": _NO_NUL},
            {"type": "number"},
            {"type": "boolean"},
            {"type": "null"},
        ]
        if k <= limits.max_depth:
            options += [{"type": "array", "items": _level_ref(k + 1)}, _metadata_object(limits, k)]
        levels[f"PersonMetadataLevel{k}"] = {"anyOf": options}
    return levels
