"""``Client`` (sync) and ``AsyncClient`` over httpx: every operation of the API once, in
``_Operations``, which describes the request (``Call``); the two clients only send it, retrying
on 429 as their ``RetryPolicy`` says, and read the answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable, Sequence

import httpx

from facerec.client.calls import (
    Call,
    EmbeddingInput,
    ImageInput,
    RetryPolicy,
    embedding_values,
    form_fields,
    image_b64,
    image_part,
    is_embedding,
)
from facerec.client.models import (
    DetectResult,
    EmbedBatchResult,
    EmbedResult,
    EnrollResult,
    Gallery,
    ImageReport,
    SearchResult,
    VerifyResult,
    parse,
)

DEFAULT_TIMEOUT = 60.0


def _as(cls):
    return lambda body: parse(cls, body)


def _flag(value: bool) -> bool | None:
    # A flag left at its default is not sent: the request stays valid for services that predate it.
    return True if value else None


class _Operations:
    """The API's operations; ``_run`` (sync or async) sends the ``Call`` each one builds."""

    def __init__(self, base_url: str, api_key: str | None, retry: RetryPolicy | None, sleep: Callable,
                 headers: dict[str, str] | None, http_client: Any, own: bool) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._headers = {"Accept": "application/json", **(headers or {}), **({"X-API-Key": api_key} if api_key else {})}
        self._sleep = sleep
        self._http = http_client
        self._own = own  # close the httpx client with this one (not one the caller passed)

    def _run(self, call: Call) -> Any:  # pragma: no cover - defined by the two clients
        raise NotImplementedError

    # ------------------------------------------------------------------ one image
    def verify(self, a: ImageInput | EmbeddingInput, b: ImageInput | EmbeddingInput, *,
               threshold: float | None = None, face_a: int | None = None, face_b: int | None = None,
               aligned: bool = False, contract_id: str | None = None) -> VerifyResult:
        """Are ``a`` and ``b`` the same person? Each is an image (path, bytes, binary file) or an
        embedding (floats with ``contract_id``, or an ``embed`` result, which carries its own); a
        side given as an embedding has no image report (``image_a`` / ``image_b`` is None).
        ``face_a`` / ``face_b``: which face of the image (index in ``detect``'s order; default the
        largest). ``aligned``: the images are 112x112 aligned crops (detection is skipped)."""
        if is_embedding(a) or is_embedding(b):  # JSON: each side an embedding or a base64 image
            body: dict[str, Any] = {}
            carried = []
            for side, value in (("a", a), ("b", b)):
                if is_embedding(value):
                    values, contract = embedding_values(value, side)
                    body[f"embedding_{side}"] = values
                    carried.append(contract)
                else:
                    body[f"image_{side}"] = image_b64(value, f"image_{side}")
            body["contract_id"] = _one_contract(contract_id, *carried)
            options = {"threshold": threshold, "face_a": face_a, "face_b": face_b, "aligned": _flag(aligned)}
            body.update({k: v for k, v in options.items() if v is not None})
            return self._run(Call("POST", "/v1/verify", _as(VerifyResult), json=body))
        return self._run(Call(
            "POST", "/v1/verify", _as(VerifyResult),
            files=[image_part("image_a", a), image_part("image_b", b)],
            data=form_fields(threshold=threshold, face_a=face_a, face_b=face_b, aligned=_flag(aligned)),
        ))

    def quality(self, image: ImageInput, *, aligned: bool = False) -> ImageReport:
        """Box, quality and OOD check of the largest face (or of the aligned crop)."""
        return self._run(self._one_image("/v1/quality", ImageReport, image, aligned=_flag(aligned)))

    def embed(self, image: ImageInput, *, aligned: bool = False) -> EmbedResult:
        """The unit-length embedding of the largest face (or of the aligned crop), with its contract id."""
        return self._run(self._one_image("/v1/embed", EmbedResult, image, aligned=_flag(aligned)))

    def detect(self, image: ImageInput, *, embeddings: bool = False) -> DetectResult:
        """Every face of the photo, largest first; ``embeddings=True``: each with its embedding."""
        return self._run(self._one_image("/v1/detect", DetectResult, image, embeddings=_flag(embeddings)))

    def embed_batch(self, images: Sequence[ImageInput], *, aligned: bool = False) -> EmbedBatchResult:
        """One embedding per image, in order; an image that cannot be used is an ``ItemError`` in its
        place (the others are unaffected)."""
        return self._run(Call("POST", "/v1/embed/batch", _as(EmbedBatchResult),
                              files=[image_part("images", i) for i in images],
                              data=form_fields(aligned=_flag(aligned))))

    @staticmethod
    def _one_image(path: str, cls: type, image: ImageInput, **fields: Any) -> Call:
        return Call("POST", path, _as(cls), files=[image_part("image", image)], data=form_fields(**fields))

    # ------------------------------------------------------------------ galleries
    def create_gallery(self, name: str, *, policy: dict | None = None, target_fpir: float | None = None,
                       match_threshold: float | None = None) -> Gallery:
        """A new gallery, pinned to the model the service runs; ``policy``: enrollment gate thresholds."""
        body = {"name": name, "policy": policy, "target_fpir": target_fpir, "match_threshold": match_threshold}
        return self._run(Call("POST", "/v1/galleries", _as(Gallery),
                              json={k: v for k, v in body.items() if v is not None}))

    def galleries(self) -> list[Gallery]:
        return self._run(Call("GET", "/v1/galleries", lambda body: [parse(Gallery, g) for g in body["galleries"]]))

    def gallery(self, gallery_id: str) -> Gallery:
        return self._run(Call("GET", f"/v1/galleries/{gallery_id}", _as(Gallery)))

    def delete_gallery(self, gallery_id: str) -> None:
        return self._run(Call("DELETE", f"/v1/galleries/{gallery_id}"))

    def enroll(self, gallery_id: str, name: str, images: Sequence[ImageInput], *,
               metadata: dict | None = None) -> EnrollResult:
        """A new person with one or more photos, each through the gallery's enrollment gate. When
        none passes, ``FacerecError`` with code ``enrollment_refused`` (its ``details["results"]``
        give every photo's reasons)."""
        fields = form_fields(name=name, metadata=None if metadata is None else json.dumps(metadata))
        return self._run(Call("POST", f"/v1/galleries/{gallery_id}/persons", _as(EnrollResult),
                              files=[image_part("images", i) for i in images], data=fields))

    def add_samples(self, gallery_id: str, person_id: str, images: Sequence[ImageInput]) -> EnrollResult:
        """More photos of an enrolled person (the same gate)."""
        return self._run(Call("POST", f"/v1/galleries/{gallery_id}/persons/{person_id}/samples",
                              _as(EnrollResult), files=[image_part("images", i) for i in images]))

    def delete_person(self, gallery_id: str, person_id: str) -> None:
        return self._run(Call("DELETE", f"/v1/galleries/{gallery_id}/persons/{person_id}"))

    def search(self, gallery_id: str, query: ImageInput | EmbeddingInput, *, top_k: int = 5,
               threshold: float | None = None, fpir: float | None = None,
               contract_id: str | None = None) -> SearchResult:
        """Who is this? The closest persons and the open-set decision (``match`` or ``unknown``).
        ``query``: an image, or an embedding (floats with ``contract_id``, or an ``embed`` result)."""
        path = f"/v1/galleries/{gallery_id}/search"
        if is_embedding(query):
            values, carried = embedding_values(query, "query")
            body = {"embedding": values, "contract_id": _one_contract(contract_id, carried),
                    "top_k": top_k, "threshold": threshold, "fpir": fpir}
            return self._run(Call("POST", path, _as(SearchResult),
                                  json={k: v for k, v in body.items() if v is not None}))
        return self._run(Call("POST", path, _as(SearchResult), files=[image_part("image", query)],
                              data=form_fields(top_k=top_k, threshold=threshold, fpir=fpir)))

    # ------------------------------------------------------------------ service
    def models(self) -> dict:
        """The model, its embedding contract, device, calibration and limits (as the service says)."""
        return self._run(Call("GET", "/v1/models", lambda body: body))


def _one_contract(given: str | None, *carried: str | None) -> str:
    ids = {c for c in (given, *carried) if c is not None}
    if not ids:
        raise TypeError("an embedding given as numbers needs contract_id (the id `embed` returned with it)")
    if len(ids) > 1:
        raise ValueError(f"embeddings of different contracts cannot be compared: {sorted(ids)}")
    return ids.pop()


class Client(_Operations):
    """A synchronous client of a facerec service.

    ``Client("http://127.0.0.1:8000", api_key)`` (the key is sent as ``X-API-Key``).
    ``retry``: when a refused request is sent again (default: up to 4 tries on 429, waiting what
    ``Retry-After`` says); ``sleep``: how to wait (tests pass a recorder). ``http_client``: an
    ``httpx.Client`` to send through instead of one of its own (it is not closed by ``close``).
    Errors: ``FacerecError`` (status, code, message, details, request_id); network failures are
    httpx's own exceptions. Use as a context manager, or call ``close``.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep,
                 http_client: httpx.Client | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(base_url, api_key, retry, sleep, headers,
                         http_client or httpx.Client(timeout=timeout), http_client is None)

    def _run(self, call: Call) -> Any:
        tries = 0
        while True:
            response = self._http.request(**call.request(self.base_url, self._headers))
            tries += 1
            wait = self.retry.delay(response, tries)
            if wait is None:
                return call.finish(response)
            self._sleep(wait)

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Operations):
    """The same operations for asyncio: every method returns an awaitable. Arguments as ``Client``
    (``http_client``: an ``httpx.AsyncClient``; ``sleep``: an async function)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 http_client: httpx.AsyncClient | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(base_url, api_key, retry, sleep, headers,
                         http_client or httpx.AsyncClient(timeout=timeout), http_client is None)

    async def _run(self, call: Call) -> Any:
        tries = 0
        while True:
            response = await self._http.request(**call.request(self.base_url, self._headers))
            tries += 1
            wait = self.retry.delay(response, tries)
            if wait is None:
                return call.finish(response)
            await self._sleep(wait)

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
