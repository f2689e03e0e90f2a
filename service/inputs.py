"""Reading images out of a request: multipart files or base64 strings in a JSON object.

The routes parse the body themselves (rather than declaring ``File``/``Body`` parameters) because
one endpoint accepts both encodings; ``request_body_doc`` documents both in the OpenAPI schema.
Only bytes sent in the request are accepted: no URLs and no server paths, ever.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.errors import ApiError, json_error, validation_error

# Canonical base64 (padded), optionally after a data: URI prefix: what the schema states. The
# server also drops whitespace (line-wrapped base64) before it decodes strictly.
B64_PATTERN = (r"^(data:[\w.+/-]*(;[\w=.+-]+)*;base64,)?(?:[A-Za-z0-9+/]{4})*"
               r"(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")
_DATA_URI = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass
class ParsedImages:
    images: dict[str, bytes]  # the image fields sent (JSON may leave optional ones out)
    threshold: float | None = None
    body: BaseModel | None = None  # the request as the JSON model, validated: its options (aligned, ...)


def b64_image(field: str, text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image ``field`` (whitespace and a data: URI prefix dropped): 413 beyond
    ``max_bytes``, 422 when it is not canonical base64 or empty."""
    text = _WHITESPACE.sub("", _DATA_URI.sub("", text, count=1))
    if len(text) * 3 // 4 > max_bytes:
        raise image_too_large(field, max_bytes)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "invalid_base64", f"{field}: not valid base64 ({exc})", {"field": field}) from None
    if not data:
        raise ApiError(422, "empty_image", f"{field}: empty image", {"field": field})
    return data


def parse_json(data: bytes | str, what: str = "the body"):
    """``json.loads``, every failure a 422 ``invalid_json``: syntax, bytes that are not UTF-8, an
    integer of more digits than Python converts, nesting beyond the decoder's recursion limit (the
    C decoder raises RecursionError cleanly, without exhausting the stack)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise json_error(exc, what) from None


def image_too_large(field: str, limit: int) -> ApiError:
    return ApiError(413, "image_too_large", f"{field}: image larger than the limit of {limit} bytes",
                    {"field": field, "limit_bytes": limit})


def _threshold(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not -1.0 <= t <= 1.0:  # also refuses NaN
        raise ApiError(422, "validation_error", "threshold must be a number between -1 and 1",
                       {"field": "threshold"})
    return t


async def read_images(request: Request, fields: tuple[str, ...], model: type[BaseModel],
                      max_image_bytes: int, options: tuple[str, ...] = ()) -> ParsedImages:
    """The image ``fields`` and the request's options. JSON: ``model`` (strict) is the whole body.
    Multipart: every image field is a required file part; ``options`` names the text fields allowed
    beside them (fields of ``model``, converted from text: "true", "1", ...)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _multipart(request, fields, model, max_image_bytes, options)
    if content_type == "application/json" or content_type.endswith("+json"):
        return await _json(request, fields, model, max_image_bytes)
    raise ApiError(
        415, "unsupported_media_type",
        f"send multipart/form-data with file field(s) {', '.join(fields)}, or application/json with "
        f"base64 strings (got {content_type or 'no Content-Type'})",
    )


async def _json(request, fields, model, max_image_bytes) -> ParsedImages:
    body = await request.body()
    if not body.strip():
        raise ApiError(422, "validation_error", f"empty body: expected a JSON object with {', '.join(fields)}")
    payload = parse_json(body)
    try:
        parsed = model.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc, "the JSON body does not match the API schema") from None
    images = {f: b64_image(f, getattr(parsed, f), max_image_bytes) for f in fields
              if getattr(parsed, f) is not None}
    return ParsedImages(images, _threshold(getattr(parsed, "threshold", None)), parsed)


def form_text(form, field: str) -> str | None:
    """A multipart text field's value (None: not sent); a file part there is a 422."""
    value = form.get(field)
    if isinstance(value, UploadFile):
        raise ApiError(422, "validation_error", f"{field} must be a text field", {"field": field})
    return value


def form_options(form, images: dict, model: type[BaseModel], options: tuple[str, ...]) -> BaseModel:
    """The multipart request as ``model``: its text ``options`` converted (not strict: form values
    are text), ``images`` standing in for the image fields (their bytes are read separately)."""
    raw = {k: form_text(form, k) for k in options if k != "threshold"}
    try:
        return model.model_validate({**images, **{k: v for k, v in raw.items() if v not in (None, "")}},
                                    strict=False)
    except ValidationError as exc:
        raise validation_error(exc, "invalid form fields") from None


async def _multipart(request, fields, model, max_image_bytes, options) -> ParsedImages:
    allowed = set(fields) | set(options)
    try:
        form = await request.form(max_files=len(fields), max_fields=max(4, len(options)), max_part_size=64 * 1024)
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart/starlette parse errors: the client's fault
        raise ApiError(422, "invalid_multipart", f"malformed multipart body ({exc})") from None
    try:
        unknown = sorted(set(form.keys()) - allowed)
        if unknown:
            raise ApiError(422, "validation_error", f"unknown field(s) {', '.join(unknown)}; expected "
                           f"{', '.join(sorted(allowed))}", {"unknown": unknown})
        images: dict[str, bytes] = {}
        for name in fields:
            part = form.get(name)
            if part is None:
                raise ApiError(422, "validation_error", f"missing file field {name!r}", {"field": name})
            if not isinstance(part, UploadFile):
                raise ApiError(422, "validation_error", f"{name!r} must be a file part, not a text field",
                               {"field": name})
            data = await part.read(max_image_bytes + 1)
            if len(data) > max_image_bytes:
                raise image_too_large(name, max_image_bytes)
            if not data:
                raise ApiError(422, "empty_image", f"{name}: empty file", {"field": name})
            images[name] = data
        threshold = _threshold(form_text(form, "threshold")) if "threshold" in options else None
        return ParsedImages(images, threshold, form_options(form, dict.fromkeys(fields, ""), model, options))
    finally:
        await form.close()


def request_body_doc(json_model: type[BaseModel], fields: tuple[str, ...], options: tuple[str, ...] = ()) -> dict:
    """``openapi_extra`` documenting both encodings of an image endpoint; ``options``: the JSON
    model's fields that multipart takes as text fields too (documented as the JSON schema does)."""
    props = {f: {"type": "string", "format": "binary", "description": "image file"} for f in fields}
    schema = json_model.model_json_schema()
    for name in options:
        prop = dict(schema["properties"][name])
        # "anyOf [number, null]" in JSON is a field left out in a form: the form states the type alone.
        typed = [p for p in prop.pop("anyOf", []) if p.get("type") != "null"]
        prop.update(typed[0] if typed else {})
        prop.pop("default", None)
        props[name] = prop
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": props, "required": list(fields),
                               "additionalProperties": False}
                },
                "application/json": {"schema": schema},
            },
        }
    }
