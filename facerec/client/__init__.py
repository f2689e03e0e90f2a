"""A Python client of the facerec service (``pip install httpx`` is all it needs: no torch, no
FastAPI, no numpy).

    from facerec.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as fr:
        r = fr.verify("a.jpg", "b.jpg")
        print(r.decision, r.similarity)

``Client`` is synchronous, ``AsyncClient`` the same for asyncio. Results are typed dataclasses
mirroring the service's schemas (``facerec.client.models``); a refused request raises
``FacerecError`` carrying the envelope's status, code, message and request id; 429 answers are
retried after the service's ``Retry-After`` (``RetryPolicy``). docs/service.md, "Python client".
"""

from facerec.client.calls import FacerecError, RetryPolicy
from facerec.client.client import AsyncClient, Client
from facerec.client.models import (
    Candidate,
    DetectedFace,
    DetectResult,
    EmbedBatchResult,
    EmbedResult,
    EnrollResult,
    FaceBox,
    FaceReport,
    Gallery,
    GalleryIndex,
    GalleryIndexRecall,
    GalleryOperatingPoint,
    ImageOutcome,
    ImageReport,
    ItemError,
    Ood,
    OperatingPoint,
    Person,
    Quality,
    Reason,
    SearchResult,
    VerifiedImage,
    VerifyResult,
)

__all__ = [
    "AsyncClient", "Candidate", "Client", "DetectResult", "DetectedFace", "EmbedBatchResult", "EmbedResult",
    "EnrollResult", "FaceBox", "FaceReport", "FacerecError", "Gallery", "GalleryIndex", "GalleryIndexRecall", "GalleryOperatingPoint", "ImageOutcome",
    "ImageReport", "ItemError", "Ood", "OperatingPoint", "Person", "Quality", "Reason", "RetryPolicy",
    "SearchResult", "VerifiedImage", "VerifyResult",
]
