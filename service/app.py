"""The HTTP app: ``POST /search`` (a multipart upload or JSON ``{"url": ...}``), ``GET
/images/{id}``, ``GET /healthz`` and the page at ``/``.

Limits, each a clear 4xx/503 with a one-line ``detail``, the service staying up: request bodies
over ``max_upload_bytes`` (413, refused before they are read when they say their length),
images over ``max_pixels`` or Pillow's decompression-bomb limit (413), anything that is not an
image (415), more than ``max_concurrency`` searches at once (503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.engine import Engine
from service.page import PAGE
from tasks.errors import ImageSearchError, TransientNetworkError
from tasks.query import check_k
from tasks.sources.http import FetchError, ResponseTooLarge, fetch_bytes
from tasks.sources.images import BadImage, decode_image, open_image

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_K = 100  # neighbours per request


@dataclass(frozen=True)
class Limits:
    """What one request may cost."""

    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000  # a 48-megapixel photo passes; Pillow's own limit is 89 M
    max_concurrency: int = 16
    url_timeout_s: float = 10.0


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        status_code=413,
        detail=f"The request is larger than this service accepts ({limit:,} bytes); send a "
        f"smaller image.",
    )


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, before reading it when the
    client declares its length, else as soon as the bytes read pass the limit."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            exc = _too_large(self.max_bytes)
            response = JSONResponse({"detail": exc.detail}, status_code=413)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _too_large(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class Busy:
    """At most ``limit`` searches at once; the next one is told to come back (503)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    def __enter__(self) -> None:
        if self.running >= self.limit:
            raise HTTPException(
                status_code=503,
                detail=f"The service is busy ({self.running} searches running); retry in a moment.",
                headers={"Retry-After": "1"},
            )
        self.running += 1

    def __exit__(self, *exc: object) -> None:
        self.running -= 1


async def _fetch(url: str, limits: Limits) -> bytes:
    """The bytes at an http(s) ``url`` through the one HTTP client: at most ``max_upload_bytes``
    of them (413 beyond), within ``url_timeout_s`` in all. Every other failure is one 422 worded
    alike, so the service cannot be used to tell a closed port from an HTTP status."""
    if not url.lower().startswith(("http://", "https://")):
        raise HTTPException(422, f"url = {url!r}: only http:// and https:// URLs are fetched.")
    try:
        return await run_in_threadpool(
            fetch_bytes,
            url,
            max_bytes=limits.max_upload_bytes,
            timeout=limits.url_timeout_s,
            deadline=limits.url_timeout_s,
        )
    except ResponseTooLarge:
        raise _too_large(limits.max_upload_bytes) from None
    except (FetchError, TransientNetworkError):
        raise HTTPException(422, f"Could not fetch the URL {url}.") from None


async def _query_bytes(request: Request, limits: Limits) -> tuple[bytes, str, int | None]:
    """(image bytes, its name, k from the body) of a multipart upload or a JSON body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("image")
        if upload is None:
            upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "Upload the image as the multipart form field 'image'.")
        k_field = form.get("k")
        k = int(k_field) if isinstance(k_field, str) and k_field.isdigit() else None
        return await upload.read(), upload.filename or "upload", k
    if content_type == "application/json":
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise HTTPException(422, f"The JSON body does not parse ({exc}).") from exc
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            raise HTTPException(422, 'Send JSON like {"url": "https://...", "k": 10}.')
        k = body.get("k")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
            raise HTTPException(422, f"k = {k!r}: give a whole number.")
        return await _fetch(body["url"], limits), body["url"], k
    raise HTTPException(
        415,
        f"Content-Type {content_type or 'missing'}: upload the image as multipart/form-data "
        f'(field "image") or send JSON {{"url": ...}}.',
    )


def _decode(data: bytes, size: int, max_pixels: int) -> Any:
    """Model input of the uploaded bytes; 413 beyond ``max_pixels``, 415 for a non-image."""
    try:
        width, height = open_image(data).size  # the header only: refuse before decoding
        if width * height > max_pixels:
            raise HTTPException(
                413,
                f"The image is {width}×{height} pixels; this service decodes at most "
                f"{max_pixels:,} pixels. Send a smaller image.",
            )
        return decode_image(data, size).pixels
    except BadImage as exc:
        status = 413 if "decompression bomb" in exc.reason else 415
        raise HTTPException(status, f"Not usable as an image: {exc.reason}.") from exc


def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    """The service's ASGI app around ``engine`` (started and stopped with the app)."""
    limits = limits or Limits()
    busy = Busy(limits.max_concurrency)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="image-search", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)

    @app.exception_handler(ImageSearchError)
    async def user_error(request: Request, exc: ImageSearchError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return engine.health()

    @app.get("/images/{image_id}")
    async def image(image_id: int) -> Response:
        index = engine.loaded.index
        try:
            data, media_type = await run_in_threadpool(index.image, image_id)
        except KeyError:
            raise HTTPException(
                404, f"Image id {image_id} is not in the index ({len(index)} images)."
            ) from None
        except BadImage as exc:
            raise HTTPException(
                410, f"Image id {image_id} can no longer be read: {exc.reason}."
            ) from exc
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    @app.post("/search")
    async def search(request: Request, k: int | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        data, name, body_k = await _query_bytes(request, limits)
        loaded = engine.loaded  # this request's index and model, to the end
        k = k if k is not None else body_k if body_k is not None else 10
        if not 1 <= k <= MAX_K:
            raise HTTPException(422, f"k = {k}: ask for 1 to {MAX_K} neighbours.")
        k = check_k(min(k, len(loaded.index)), loaded.index)
        with busy:
            read = time.perf_counter()
            pixels = await run_in_threadpool(
                _decode, data, loaded.index.input_size, limits.max_pixels
            )
            decoded = time.perf_counter()
            result = await asyncio.wrap_future(engine.submit(loaded, pixels, k))
        return {
            "query": name,
            "k": k,
            "index": {"images": len(loaded.index), "model_key": loaded.index.model_key},
            "neighbours": [
                {
                    "rank": n.rank,
                    "image_id": n.image_id,
                    "distance": n.distance,
                    "uri": n.uri,
                    "label": n.label,
                    "url": f"/images/{n.image_id}",
                }
                for n in result.neighbours
            ],
            "timings_ms": {
                "read": round((read - started) * 1e3, 2),
                "decode": round((decoded - read) * 1e3, 2),
                "embed": round(result.embed_ms, 2),
                "search": round(result.search_ms, 2),
                "total": round((time.perf_counter() - started) * 1e3, 2),
            },
            "batch": result.batch,
        }

    return app
