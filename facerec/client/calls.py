"""What the sync and the async client share: one request described as data (``Call``), how its answer
is read (the result type, or ``FacerecError`` from the service's error envelope), when a refused
request is tried again (``RetryPolicy``: 429 honouring ``Retry-After``), and how images and
embeddings given by the caller become request parts.

Nothing here does I/O on the network: ``Client`` and ``AsyncClient`` send a ``Call`` with httpx and
hand the response back to it, so every rule is written once.
"""

from __future__ import annotations

import base64
import email.utils
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Sequence, Union

import httpx

from facerec.client.models import EmbedResult

#: An image: a path (str or Path), the file's bytes, or an open binary file.
ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes]]
#: An embedding: a sequence of floats (a list, a numpy array), or a result of ``embed``.
EmbeddingInput = Union[Sequence[float], EmbedResult]


class FacerecError(Exception):
    """The service refused the request: its status, the envelope's ``code`` and ``message`` (and
    ``details``, ``request_id`` to quote; ``retry_after`` in seconds when the service said when to
    try again)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 request_id: str | None = None, retry_after: float | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.request_id = request_id
        self.retry_after = retry_after
        rid = f" (request id {request_id})" if request_id else ""
        super().__init__(f"{status} {code}: {message}{rid}")

    @classmethod
    def from_response(cls, response: httpx.Response) -> FacerecError:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        try:
            body = response.json()
            error = body["error"]
            return cls(response.status_code, str(error["code"]), str(error["message"]), error.get("details"),
                       body.get("request_id") or response.headers.get("X-Request-ID"), retry_after)
        except (ValueError, KeyError, TypeError):  # not the service's envelope (a proxy's page, say)
            text = " ".join(response.text.split())[:200] or response.reason_phrase
            return cls(response.status_code, f"http_{response.status_code}", text,
                       request_id=response.headers.get("X-Request-ID"), retry_after=retry_after)


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date); None if absent
    or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - now()
    return max(0.0, seconds) if math.isfinite(seconds) else None


@dataclass(frozen=True)
class RetryPolicy:
    """When a refused request is sent again: at most ``attempts`` tries in all, only for ``statuses``
    (429: the service is overloaded and did no work), after the ``Retry-After`` the service sent
    (else ``backoff`` x 2^n seconds). A wait longer than ``max_wait`` is not waited for: the error is
    raised at once, carrying ``retry_after``. ``RetryPolicy(attempts=1)`` never retries."""

    attempts: int = 4
    statuses: tuple[int, ...] = (429,)
    max_wait: float = 60.0
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts: at least 1 (the first try)")

    def delay(self, response: httpx.Response, tries: int) -> float | None:
        """Seconds to wait before the next try after ``tries`` tries ended with ``response``, or None:
        do not retry."""
        if response.status_code not in self.statuses or tries >= self.attempts:
            return None
        wait = parse_retry_after(response.headers.get("Retry-After"))
        if wait is None:
            wait = self.backoff * 2 ** (tries - 1)
        return wait if wait <= self.max_wait else None


@dataclass
class Call:
    """One API request and how to read its answer (``parse``: the decoded JSON -> the result)."""

    method: str
    path: str
    parse: Callable[[Any], Any] | None = None  # None: the answer has no body (204)
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: dict[str, str] | None = None
    json: Any = None
    params: dict[str, Any] | None = None

    def request(self, base_url: str, headers: dict[str, str]) -> dict[str, Any]:
        """The keyword arguments of ``httpx.Client.request`` for this call."""
        kw: dict[str, Any] = {"method": self.method, "url": base_url + self.path, "headers": headers}
        for name in ("files", "data", "json", "params"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return kw

    def finish(self, response: httpx.Response) -> Any:
        """The result, or ``FacerecError`` raised from the service's error envelope."""
        if not response.is_success:
            raise FacerecError.from_response(response)
        if self.parse is None:
            return None
        try:
            body = response.json()
        except ValueError:
            raise FacerecError(response.status_code, "invalid_response",
                               f"{self.method} {self.path}: the answer is not JSON") from None
        return self.parse(body)


# ============================================================================ inputs
def image_bytes(image: ImageInput, field: str) -> tuple[str, bytes]:
    """A file name and the bytes of an image. Read now, so a retried request sends them again."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes()
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise TypeError(f"{field}: open the file in binary mode ('rb')")
        return Path(getattr(image, "name", "image") or "image").name, data
    raise TypeError(f"{field}: an image is a path, bytes or a binary file, not {type(image).__name__}")


def image_part(field: str, image: ImageInput) -> tuple[str, tuple[str, bytes, str]]:
    """A multipart file part."""
    name, data = image_bytes(image, field)
    return field, (name, data, "application/octet-stream")


def image_b64(image: ImageInput, field: str) -> str:
    """An image as the base64 text of the JSON bodies."""
    return base64.b64encode(image_bytes(image, field)[1]).decode("ascii")


def is_embedding(value: Any) -> bool:
    """Whether ``value`` is an embedding (numbers, or an ``embed`` result) rather than an image."""
    if isinstance(value, EmbedResult):
        return True
    if isinstance(value, (str, bytes, bytearray, memoryview, os.PathLike)) or hasattr(value, "read"):
        return False
    return hasattr(value, "__len__") and hasattr(value, "__iter__")


def embedding_values(value: EmbeddingInput, field: str) -> tuple[list[float], str | None]:
    """The floats of an embedding and, for an ``embed`` result, the contract id it carries."""
    if isinstance(value, EmbedResult):
        return list(value.embedding), value.contract_id
    try:
        return [float(v) for v in value], None
    except (TypeError, ValueError):
        raise TypeError(f"{field}: an embedding is a sequence of numbers") from None


def form_fields(**values: Any) -> dict[str, str]:
    """Multipart text fields: None is left out, booleans are ``true``/``false``."""
    out = {}
    for name, value in values.items():
        if value is None:
            continue
        out[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out
