"""GET / : the demo page, and GET /docs: the API reference (static HTML + JS + CSS from
service/static, no build step, no CDN).

``/docs`` renders this origin's ``/openapi.json`` in the browser. It replaces FastAPI's Swagger UI
page, which loads its script and styles from a CDN: with it, opening the docs made every visitor's
browser fetch code from a third party (and it showed nothing on a network without internet).
``FACEREC_DOCS=false`` turns ``/docs`` off with ``/openapi.json``.

The page holds no secret: the visitor types the API key, and the page's scripts send it as the
``X-API-Key`` header to ``POST /v1/verify`` and the gallery routes on this origin. So the page itself needs no key, and
``FACEREC_DEMO_PAGE=false`` turns it off (404) for deployments that want the API alone.

The routes are plain Starlette routes, not API operations: they are not part of the OpenAPI
schema. Every response carries a strict Content-Security-Policy: scripts and styles only from
this origin (no inline code), requests only to this origin, no framing.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request, Response

from service.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; "  # data: only for the empty favicon
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
# URL path -> (file in service/static, media type, the setting that turns it on)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8", "demo_page"),
    "/demo/app.js": ("app.js", "text/javascript; charset=utf-8", "demo_page"),
    "/demo/gallery.js": ("gallery.js", "text/javascript; charset=utf-8", "demo_page"),
    "/demo/style.css": ("style.css", "text/css; charset=utf-8", "demo_page"),
    "/docs": ("docs.html", "text/html; charset=utf-8", "docs"),
    "/docs/docs.js": ("docs.js", "text/javascript; charset=utf-8", "docs"),
    "/docs/docs.css": ("docs.css", "text/css; charset=utf-8", "docs"),
}
_SWITCHES = {"demo_page": "the demo page is turned off: FACEREC_DEMO_PAGE=false",
             "docs": "the API docs are turned off: FACEREC_DOCS=false"}

router = APIRouter(tags=["demo"])


@cache
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


def _endpoint(name: str, media_type: str, switch: str):
    async def serve(request: Request) -> Response:
        if not getattr(request.app.state.settings, switch):
            raise ApiError(404, "not_found", f"no route {request.url.path} ({_SWITCHES[switch]})")
        return Response(_read(name), media_type=media_type, headers=SECURITY_HEADERS)

    return serve


for _path, (_name, _type, _switch) in FILES.items():
    router.add_route(_path, _endpoint(_name, _type, _switch), methods=["GET"], include_in_schema=False)
