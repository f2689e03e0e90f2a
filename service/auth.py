"""API keys: ``X-API-Key`` on every ``/v1`` route except health.

Keys come from ``FACEREC_API_KEYS`` (comma separated, so a new key can be added before the old one is
removed: rotation without downtime). With none configured a random key is generated at start and
printed once: the zero-argument start stays secure instead of silently open.

Keys are compared as SHA-256 digests with ``hmac.compare_digest``, against every configured key
without stopping at the first match, so the time taken does not reveal how much of a key matched,
its length, or which key of the list it was.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sys
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from service.errors import ApiError

API_KEY_HEADER = "X-API-Key"

# auto_error=False: a missing key must produce our envelope, not FastAPI's default 403.
_header_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="API key (FACEREC_API_KEYS, or the key printed at start)")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self.generated: str | None = None
        if not keys:
            self.generated = secrets.token_urlsafe(32)
            keys = [self.generated]
        self._digests = [_digest(k) for k in keys]

    def announce(self, stream=None) -> None:
        """Print the generated key once (to stderr: stdout may be a structured log)."""
        if self.generated is None:
            return
        stream = stream or sys.stderr
        print(
            f"facerec-serve: no FACEREC_API_KEYS configured; generated API key for this run:\n"
            f"  {self.generated}\n"
            f"Send it as the {API_KEY_HEADER} header. Set FACEREC_API_KEYS to keep a key across restarts.",
            file=stream, flush=True,
        )

    def check(self, given: str | None) -> bool:
        if not given:
            return False
        candidate = _digest(given)
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(candidate, digest)
        return ok


async def require_api_key(
    request: Request, key: Annotated[str | None, Depends(_header_scheme)]
) -> None:
    if not request.app.state.api_keys.check(key):
        what = "missing" if not key else "invalid"
        raise ApiError(401, "unauthorized", f"{what} API key: send a valid key in the {API_KEY_HEADER} header",
                       headers={"WWW-Authenticate": API_KEY_HEADER})


ApiKey = Annotated[None, Depends(require_api_key)]
