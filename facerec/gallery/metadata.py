"""A person's ``metadata``: a small JSON object the client owns, checked before it is stored.

Whatever is stored is later returned in every listing, person and search answer, so a value that
cannot be encoded back to JSON would break all of them for as long as the row exists (a lone
surrogate, NaN, nesting deeper than the encoder's recursion limit), and an unbounded one makes every
listing that large. :func:`check_metadata` refuses such values with a :class:`MetadataError` that
names the offending path and the limit; it walks the value iteratively, so a hostile depth cannot
exhaust the stack.

Limits: the service passes its settings (``FACEREC_METADATA_MAX_*``); the stores check against
:data:`STORE_LIMITS`, the hard caps those settings may not exceed, so a library caller cannot store
what the service could not return. :func:`read_metadata` is the reading side: a row written before
these checks existed becomes ``({}, reason)`` instead of an exception.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MetadataLimits:
    max_bytes: int = 16 * 1024  # the object serialised as compact UTF-8 JSON
    # keys of one object (per object, so that the API schema can state it as maxProperties; the
    # total is bounded by max_bytes)
    max_keys: int = 64
    max_depth: int = 8  # nesting levels of objects and arrays; the metadata object itself is level 1
    max_string: int = 1024  # characters of one string (keys and values)


#: The defaults of the service's settings.
DEFAULT_LIMITS = MetadataLimits()
#: The hard caps: what a store accepts at most, and the highest values the settings allow.
STORE_LIMITS = MetadataLimits(max_bytes=1024 * 1024, max_keys=10_000, max_depth=32, max_string=64 * 1024)


class MetadataError(ValueError):
    """``metadata`` breaks a rule; ``path`` locates the value (``metadata.a[2].b``)."""

    code = "invalid_metadata"

    def __init__(self, message: str, path: str, rule: str, limit: int | None = None) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.rule = rule
        self.limit = limit

    def details(self) -> dict:
        out = {"field": self.path, "rule": self.rule}
        if self.limit is not None:
            out["limit"] = self.limit
        return out


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_string(text: str, path: str, limits: MetadataLimits, what: str) -> None:
    if len(text) > limits.max_string:
        raise MetadataError(
            f"{what} of {len(text)} characters is longer than the limit of {limits.max_string}",
            path, "max_string", limits.max_string,
        )
    if _has_surrogate(text):
        raise MetadataError(f"{what} holds a lone UTF-16 surrogate (not encodable as UTF-8)", path,
                            "utf8")
    if "\x00" in text:  # PostgreSQL's jsonb cannot hold U+0000: refused on every backend alike
        raise MetadataError(f"{what} holds the character U+0000", path, "nul")


def encode(value) -> bytes:
    """Compact UTF-8 JSON, refusing what JSON has no encoding for (NaN, Infinity, surrogates)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def check_metadata(value, limits: MetadataLimits = DEFAULT_LIMITS, field: str = "metadata") -> dict:
    """``value`` if it is a JSON object within ``limits``, else :class:`MetadataError`."""
    if not isinstance(value, dict):
        raise MetadataError(f"must be a JSON object, not {_kind(value)}", field, "type")
    # The size first, in C: a value of megabytes is refused before the walk below visits its items.
    # (What cannot be encoded is left to the walk, which says where and why.)
    try:
        size = len(encode(value))
    except (ValueError, RecursionError):
        size = None
    if size is not None and size > limits.max_bytes:
        raise _too_large(size, limits, field)
    stack = [(value, field, 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, (dict, list)) and depth > limits.max_depth:
            raise MetadataError(f"nested deeper than the limit of {limits.max_depth} levels", path,
                                "max_depth", limits.max_depth)
        if isinstance(item, dict):
            if len(item) > limits.max_keys:
                raise MetadataError(f"{len(item)} keys, more than the limit of {limits.max_keys} in "
                                    "one object", path, "max_keys", limits.max_keys)
            for k, v in item.items():
                if not isinstance(k, str):
                    raise MetadataError("object keys must be strings", path, "type")
                _check_string(k, f"{path}.{_printable(k)}", limits, "key")
                stack.append((v, f"{path}.{_printable(k)}", depth + 1))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))
        elif isinstance(item, str):
            _check_string(item, path, limits, "string")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise MetadataError(f"{item} is not a JSON number (NaN and Infinity are refused)", path,
                                    "finite")
        elif not (item is None or isinstance(item, (bool, int))):
            raise MetadataError(f"{_kind(item)} is not a JSON value", path, "type")
    return value


def _too_large(size: int, limits: MetadataLimits, field: str) -> MetadataError:
    return MetadataError(f"{size} bytes as JSON, more than the limit of {limits.max_bytes} bytes", field,
                         "max_bytes", limits.max_bytes)


def stored_json(value) -> str:
    """The JSON text a store writes for a person's metadata (None: ``{}``), checked against the caps."""
    return json.dumps(check_metadata({} if value is None else value, STORE_LIMITS))


def read_metadata(value) -> tuple[dict, str | None]:
    """A stored metadata value (JSON text or already decoded) as ``(metadata, None)``, or ``({}, reason)``
    when it cannot be returned (a row written before :func:`check_metadata` guarded the writes)."""
    try:
        if isinstance(value, (str, bytes, bytearray)):
            value = json.loads(value)
        return check_metadata(value, STORE_LIMITS), None
    except MetadataError as exc:
        return {}, str(exc)
    except (ValueError, RecursionError) as exc:  # not JSON, or nested beyond the decoder's limit
        return {}, f"metadata: stored value is not decodable JSON ({type(exc).__name__})"


def _printable(key: str) -> str:
    # Paths end up in error messages, which must themselves be encodable (and short).
    return key[:40].encode("utf-8", "backslashreplace").decode("utf-8")


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number" if isinstance(value, (int, float))
                                    else type(value).__name__)
