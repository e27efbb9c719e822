"""The HTTP app: ``POST /search`` (a multipart upload in field ``image``, or JSON ``{"url": ...}``),
``GET /images/{id}`` (``?size=`` for a thumbnail), ``GET /healthz``, the page at ``/`` and the
OpenAPI description at ``/docs``.

Limits, each a clear 4xx/503 with a one-line ``detail``, the service staying up: request bodies
over ``max_upload_bytes`` (413, refused before they are read when they say their length),
images over ``max_pixels`` or Pillow's decompression-bomb limit (413), anything that is not an
image (415), more than ``max_concurrency`` searches at once (503 with Retry-After), ``k`` above
the operator's ``max_k`` (422; at most :data:`tasks.search.k.MAX_K`).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations at run time,
# and some name this app's own limits.
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from service.engine import Engine
from service.page import page as render_page
from tasks.errors import ImageSearchError, TransientNetworkError
from tasks.search.k import MAX_K, K
from tasks.sources.http import FetchError, ResponseTooLarge, fetch_bytes
from tasks.sources.images import BadImage, decode_image, open_image

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_K = 10
DEFAULT_MAX_K = 100  # the operator's cap on neighbours per request, below MAX_K
THUMB_SIZES = (16, 1024)  # smallest and largest ?size= of /images/ID


@dataclass(frozen=True)
class Limits:
    """What one request may cost."""

    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000  # a 48-megapixel photo passes; Pillow's own limit is 89 M
    max_concurrency: int = 16
    max_k: int = DEFAULT_MAX_K
    url_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_k <= MAX_K:
            raise ValueError(f"max_k = {self.max_k}; it must be 1 to {MAX_K}")


class UrlQuery(BaseModel):
    """A search for the image at an http(s) URL."""

    url: str = Field(description="http:// or https:// URL of the query image.")
    k: K | None = Field(None, description="Neighbours to return (default 10).")


class NeighbourOut(BaseModel):
    """One neighbour: rank 1 is the nearest; ``url`` shows the image (``?size=`` a tile)."""

    rank: int
    image_id: int
    distance: float = Field(description="True Euclidean distance between the embeddings.")
    uri: str
    label: str | None
    url: str


class IndexOut(BaseModel):
    images: int
    model_key: str


class Timings(BaseModel):
    """Milliseconds per step of this request (embed and search: of the batch it was part of)."""

    read: float
    decode: float
    embed: float
    search: float
    total: float


class SearchOut(BaseModel):
    """The nearest index images of one query image, and the tier they came from."""

    query: str
    k: int
    index: IndexOut
    neighbours: list[NeighbourOut]
    tier: Literal["exact", "approximate"] = Field(
        description="exact: the true k nearest; approximate: from the approximate index "
        "(ask ?exact=true for exact), distances still exact."
    )
    method: str = Field(description="How this tier searched.")
    recall_at_10: float | None = Field(
        description="approximate only: the share of the true 10 nearest its answers held, "
        "measured against exact search on the index's own images when it was built."
    )
    timings_ms: Timings
    batch: int = Field(description="Queries embedded and searched together with this one.")


class HealthOut(BaseModel):
    """The index answering now: ``degraded`` with the ``problem`` when a newer one in the
    folder could not be loaded (or the folder vanished) and this one keeps answering."""

    status: Literal["ok", "degraded"]
    index: str
    images: int
    model_key: str
    weights: str
    input_size: int
    features_from: str
    loaded_at: float
    identity: str
    reloads: int
    queued: int
    problem: str | None


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


def _one_line(exc: RequestValidationError | ValidationError) -> str:
    """Validation errors as one line, each ``name = value: what is allowed``."""
    parts = []
    for err in exc.errors():
        names = [str(p) for p in err["loc"] if p not in ("body", "query", "path")]
        given = err.get("input")
        shown = given if isinstance(given, str) else repr(given)
        where = f"{names[-1]} = {shown}: " if names and not isinstance(given, dict) else ""
        where = where or (f"{names[-1]}: " if names else "")
        parts.append(f"{where}{err['msg']}")
    return "; ".join(parts)


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
    k_doc = f"Neighbours to return (1 to {limits.max_k}; default {DEFAULT_K})."

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="image-search",
        summary="Nearest images of an index, by exact Euclidean search of ResNet50 embeddings.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)

    @app.exception_handler(ImageSearchError)
    async def user_error(request: Request, exc: ImageSearchError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(exc)}, status_code=422)

    html = render_page(limits.max_k)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return html

    @app.get("/healthz", response_model=HealthOut)
    async def healthz() -> dict[str, Any]:
        """The index answering now, its model, how often it was swapped, and any trouble."""
        return engine.health()

    @app.get(
        "/images/{image_id}",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}},
    )
    async def image(
        image_id: int,
        size: Annotated[
            int | None,
            Query(
                ge=THUMB_SIZES[0],
                le=THUMB_SIZES[1],
                description="Side of a square thumbnail (JPEG) instead of the stored image.",
            ),
        ] = None,
    ) -> Response:
        """A result's image, as stored, or as a ``size``-pixel square thumbnail."""
        index = engine.loaded.index
        try:
            if size is None:
                data, media_type = await run_in_threadpool(index.image, image_id)
            else:
                data = await run_in_threadpool(index.thumbnail, image_id, size)
                media_type = "image/jpeg"
        except KeyError:
            raise HTTPException(
                404, f"Image id {image_id} is not in the index ({len(index)} images)."
            ) from None
        except BadImage as exc:
            raise HTTPException(
                410, f"Image id {image_id} can no longer be read: {exc.reason}."
            ) from exc
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    @app.post(
        "/search",
        response_model=SearchOut,
        openapi_extra={
            "requestBody": {
                "content": {"application/json": {"schema": UrlQuery.model_json_schema()}}
            }
        },
    )
    async def search(
        request: Request,
        image: Annotated[
            UploadFile | None, File(description="The query image (multipart upload).")
        ] = None,
        k_field: Annotated[int | None, Form(alias="k", ge=1, le=limits.max_k)] = None,
        k: Annotated[int | None, Query(ge=1, le=limits.max_k, description=k_doc)] = None,
        exact: Annotated[
            bool, Query(description="Exact answers even where the index has an approximate one.")
        ] = False,
    ) -> dict[str, Any]:
        """The nearest index images of an uploaded image (multipart field ``image``) or of the
        image at a URL (JSON ``{"url": ..., "k": ...}``). ``k`` as a query parameter wins over
        one in the body."""
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            if image is None:
                raise HTTPException(422, "Upload the image as the multipart form field 'image'.")
            data, name, body_k = await image.read(), image.filename or "upload", k_field
        elif content_type == "application/json":
            try:
                body = UrlQuery.model_validate_json(await request.body())
            except ValidationError as exc:
                raise HTTPException(
                    422, f'Send JSON like {{"url": "https://...", "k": 10}} ({_one_line(exc)}).'
                ) from exc
            if body.k is not None and body.k > limits.max_k:
                raise HTTPException(422, f"k = {body.k}: ask for 1 to {limits.max_k} neighbours.")
            data, name, body_k = await _fetch(body.url, limits), body.url, body.k
        else:
            raise HTTPException(
                415,
                f"Content-Type {content_type or 'missing'}: upload the image as "
                f'multipart/form-data (field "image") or send JSON {{"url": ...}}.',
            )
        loaded = engine.loaded  # this request's index and model, to the end
        k = k if k is not None else body_k if body_k is not None else DEFAULT_K
        k = min(k, len(loaded.index))
        with busy:
            read = time.perf_counter()
            pixels = await run_in_threadpool(
                _decode, data, loaded.index.input_size, limits.max_pixels
            )
            decoded = time.perf_counter()
            result = await asyncio.wrap_future(engine.submit(loaded, pixels, k, exact))
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
            **result.tier.as_dict(),
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
