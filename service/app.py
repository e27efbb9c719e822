"""The HTTP app: ``POST /search`` (a multipart upload in field ``image``, or JSON ``{"url": ...}``),
``GET /images/{id}`` (``?size=`` for a thumbnail), ``GET /healthz``, the page at ``/`` and the
OpenAPI description at ``/docs``.

Limits, each a clear 4xx/503 with a one-line ``detail``, the service staying up: request bodies
over ``max_upload_bytes`` (413, refused before they are read when they say their length),
images over ``max_pixels`` or Pillow's decompression-bomb limit (413), anything that is not an
image (415), more than ``max_concurrency`` searches at once (503 with Retry-After; a fetch by
URL keeps its search's place until it ends, within ``url_timeout_s``), more than
``max_requests`` requests of any kind at once (503; ``/healthz`` is never refused), ``k`` that
is not a whole number from 1 to the operator's ``max_k`` (422, one message wherever it came).
A search whose client went away is abandoned: its queued work is dropped.

Who may ask, and what a search by URL may reach: :mod:`service.security`. Answers name images
relative to the source and the index by its folder's name: no absolute path of the server.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations at run time,
# and some name this app's own limits.
import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from starlette.concurrency import run_in_threadpool

from service.engine import Engine
from service.images import OutsideSource, picture, shown_uri, source_base, thumbnail
from service.page import page as render_page
from service.security import (
    Access,
    FetchPolicy,
    HostCheck,
    SecurityHeaders,
    TokenGate,
    docs_csp,
    page_csp,
)
from tasks.errors import ImageSearchError, TransientNetworkError
from tasks.search.k import MAX_K
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
    """What one request may cost, and how many may run at once."""

    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000  # a 48-megapixel photo passes; Pillow's own limit is 89 M
    max_concurrency: int = 16
    max_k: int = DEFAULT_MAX_K
    url_timeout_s: float = 10.0  # one fetch by URL, redirects included, from start to end
    max_requests: int | None = None  # requests of any kind at once; None: 4 × max_concurrency

    def __post_init__(self) -> None:
        if not 1 <= self.max_k <= MAX_K:
            raise ValueError(f"max_k = {self.max_k}; it must be 1 to {MAX_K}")

    @property
    def request_limit(self) -> int:
        return self.max_requests or 4 * self.max_concurrency


_WHOLE = re.compile(r"[0-9]{1,9}")


def parse_k(given: object, max_k: int) -> int:
    """``k`` as a query parameter, a form field or a JSON value gives it: a whole number (digits,
    or a JSON integer) from 1 to ``max_k``. The one parse of ``k``; raises ValueError naming
    what is allowed."""
    value: int | None = None
    if isinstance(given, str) and _WHOLE.fullmatch(given.strip()):
        value = int(given.strip())
    elif isinstance(given, int) and not isinstance(given, bool):
        value = given
    if value is None or not 1 <= value <= max_k:
        raise ValueError(f"ask for a whole number of neighbours from 1 to {max_k}")
    return value


def _shown(value: object) -> str:
    return value if isinstance(value, str) else repr(value)


class UrlQuery(BaseModel):
    """A search for the image at an http(s) URL."""

    url: str = Field(description="http:// or https:// URL of the query image.")
    k: int | None = Field(
        None, ge=1, le=MAX_K, description="Neighbours to return (default 10; the service's cap)."
    )

    @field_validator("k", mode="before")
    @classmethod
    def _k(cls, value: object, info: ValidationInfo) -> int | None:
        max_k = (info.context or {}).get("max_k", MAX_K)
        return None if value is None else parse_k(value, max_k)


class NeighbourOut(BaseModel):
    """One neighbour: rank 1 is the nearest; ``url`` shows the image (``?size=`` a tile).

    ``uri`` says where the image is, relative to the source the index was built from: a file of
    a folder as ``cat/1.jpg``, an archive member as ``photos.tar::cat/1.jpg``, a row of an
    STL-10 file as ``unlabeled_X.bin::000042``, a URL or object-store URL as it is."""

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
    """The index answering now (``index``: its folder's name): ``degraded`` with the ``problem``
    when a newer one in the folder could not be loaded (or the folder vanished) and this one
    keeps answering."""

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


class Admission:
    """ASGI middleware: at most ``limit`` requests in progress at once, the next one told to come
    back (503); ``/healthz`` is always let in, so a probe never mistakes load for death."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int):
        self.app = app
        self.limit = limit
        self.running = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        if self.running >= self.limit:
            response = JSONResponse(
                {
                    "detail": f"The service is busy ({self.running} requests in progress); retry "
                    f"in a moment."
                },
                status_code=503,
                headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        self.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1


class Busy:
    """At most ``limit`` searches at once; the next one is told to come back (503). A search
    holds its :class:`Slot` until the request has ended *and* its fetch by URL, if any, has
    ended (an abandoned fetch still holds a connection until its deadline)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self._lock = threading.Lock()

    def take(self) -> "Slot":
        with self._lock:
            if self.running >= self.limit:
                raise HTTPException(
                    status_code=503,
                    detail=f"The service is busy ({self.running} searches running); retry in a "
                    f"moment.",
                    headers={"Retry-After": "1"},
                )
            self.running += 1
        return Slot(self)

    def _free(self) -> None:
        with self._lock:
            self.running -= 1


class Slot:
    """One search's place in :class:`Busy`, freed when every holder has released it."""

    def __init__(self, busy: Busy) -> None:
        self._busy = busy
        self._holds = 1
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self._holds += 1

    def release(self, *_: object) -> None:
        with self._lock:
            self._holds -= 1
            free = self._holds == 0
        if free:
            self._busy._free()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (the request's body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """The result of ``work``, unless the client disconnects first: then ``work`` is cancelled
    (its queued steps never run) and :class:`ClientGone` is raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        gone.cancel()
    if task.cancelled() or not task.done():
        raise ClientGone
    return task.result()


def _fetch_failed(url: str, limits: Limits) -> HTTPException:
    """The one answer for every fetch that failed: the same words for a refused address, a
    closed port, a silent server and an HTTP error, so that the service tells nothing about
    what lies behind a URL."""
    return HTTPException(
        422,
        f"Could not fetch the URL {url}. This service fetches images from public http(s) "
        f"addresses, at most {limits.max_upload_bytes:,} bytes within {limits.url_timeout_s:g} s.",
    )


async def _fetch(
    url: str, limits: Limits, policy: FetchPolicy, pool: ThreadPoolExecutor, slot: Slot
) -> bytes:
    """The bytes at an http(s) ``url`` through the one HTTP client and ``policy`` (every address
    judged before a connection, redirects included): at most ``max_upload_bytes`` of them (413
    beyond), within ``url_timeout_s`` in all. The fetch holds ``slot`` until it ends, even when
    its request is abandoned."""
    if not url.lower().startswith(("http://", "https://")):
        raise HTTPException(422, f"url = {url!r}: only http:// and https:// URLs are fetched.")
    slot.hold()
    future = pool.submit(
        fetch_bytes,
        url,
        max_bytes=limits.max_upload_bytes,
        timeout=limits.url_timeout_s,
        deadline=limits.url_timeout_s,
        policy=policy,
    )
    future.add_done_callback(slot.release)
    try:
        return await asyncio.wrap_future(future)
    except ResponseTooLarge:
        raise _too_large(limits.max_upload_bytes) from None
    except (FetchError, TransientNetworkError):
        raise _fetch_failed(url, limits) from None


def _one_line(exc: RequestValidationError | ValidationError) -> str:
    """Validation errors as one line, each ``name = value: what is allowed``."""
    parts = []
    for err in exc.errors():
        names = [str(p) for p in err["loc"] if p not in ("body", "query", "path")]
        given = err.get("input")
        shown = _shown(given)
        where = f"{names[-1]} = {shown}: " if names and not isinstance(given, dict) else ""
        where = where or (f"{names[-1]}: " if names else "")
        message = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        parts.append(f"{where}{message}")
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


def _without_paths(text: str, folders: list[Path]) -> str:
    """``text`` with each of ``folders`` named by its last part: no absolute server paths."""
    for folder in sorted(folders, key=lambda f: -len(str(f))):
        text = text.replace(str(folder), folder.name)
    return text


def create_app(
    engine: Engine, limits: Limits | None = None, access: Access | None = None
) -> FastAPI:
    """The service's ASGI app around ``engine`` (started and stopped with the app)."""
    limits = limits or Limits()
    access = access or Access()
    busy = Busy(limits.max_concurrency)
    # Fetches by URL: never more than the searches that start them, so none ever waits here.
    fetch_pool = ThreadPoolExecutor(limits.max_concurrency, thread_name_prefix="url-fetch")
    k_doc = f"Neighbours to return (1 to {limits.max_k}; default {DEFAULT_K})."

    def k_value(given: object) -> int:
        return parse_k(given, limits.max_k)

    # The bounds are for the API's description; k_value has checked them already.
    KValue = Annotated[
        Annotated[int, Field(ge=1, le=limits.max_k)] | None, BeforeValidator(k_value)
    ]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            fetch_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="image-search",
        summary="Nearest images of an index, by exact Euclidean search of ResNet50 embeddings.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    # Innermost first: the last one added sees a request first.
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    app.add_middleware(Admission, limit=limits.request_limit)
    if access.token:
        app.add_middleware(TokenGate, token=access.token)
    app.add_middleware(HostCheck, allowed_hosts=list(access.allowed_hosts))
    app.add_middleware(SecurityHeaders)

    def private(text: str) -> str:
        index = engine.loaded.index
        base = source_base(index)
        return _without_paths(text, [engine.folder, index.folder, *([base] if base else [])])

    @app.exception_handler(ImageSearchError)
    async def user_error(request: Request, exc: ImageSearchError) -> JSONResponse:
        return JSONResponse({"detail": private(str(exc))}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(exc)}, status_code=422)

    html = render_page(limits.max_k)
    html_policy = page_csp(html)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": html_policy})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        swagger = get_swagger_ui_html(openapi_url="/openapi.json", title="image-search API")
        body = bytes(swagger.body).decode()
        return HTMLResponse(body, headers={"Content-Security-Policy": docs_csp(body)})

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
        """A result's image, as indexed (its bytes checked against the catalogued SHA-256), or
        as a ``size``-pixel square thumbnail of those bytes."""
        index = engine.loaded.index
        try:
            if size is None:
                data, media_type = await run_in_threadpool(picture, index, image_id)
            else:
                data = await run_in_threadpool(thumbnail, index, image_id, size)
                media_type = "image/jpeg"
        except KeyError:
            raise HTTPException(
                404, f"Image id {image_id} is not in the index ({len(index)} images)."
            ) from None
        except OutsideSource as exc:
            raise HTTPException(
                403, f"Image id {image_id} is not shown: {exc}; only files inside the source are."
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
        k_field: Annotated[KValue, Form(alias="k")] = None,
        k: Annotated[KValue, Query(description=k_doc)] = None,
        exact: Annotated[
            bool, Query(description="Exact answers even where the index has an approximate one.")
        ] = False,
    ) -> Any:
        """The nearest index images of an uploaded image (multipart field ``image``) or of the
        image at a URL (JSON ``{"url": ..., "k": ...}``). ``k`` as a query parameter wins over
        one in the body."""
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        url: str | None = None
        data = b""
        if content_type == "multipart/form-data":
            if image is None:
                raise HTTPException(422, "Upload the image as the multipart form field 'image'.")
            data, name, body_k = await image.read(), image.filename or "upload", k_field
        elif content_type == "application/json":
            if not access.url_search:
                raise HTTPException(
                    403,
                    "Search by URL is off on this service; upload the image as the multipart "
                    "form field 'image'.",
                )
            try:
                body = UrlQuery.model_validate_json(
                    await request.body(), context={"max_k": limits.max_k}
                )
            except ValidationError as exc:
                if all(err["loc"] == ("k",) for err in exc.errors()):
                    raise HTTPException(422, _one_line(exc)) from exc
                raise HTTPException(
                    422, f'Send JSON like {{"url": "https://...", "k": 10}} ({_one_line(exc)}).'
                ) from exc
            url, name, body_k = body.url, body.url, body.k
        else:
            raise HTTPException(
                415,
                f"Content-Type {content_type or 'missing'}: upload the image as "
                f'multipart/form-data (field "image") or send JSON {{"url": ...}}.',
            )
        wanted = k if k is not None else body_k if body_k is not None else DEFAULT_K
        slot = busy.take()
        try:
            return await _unless_gone(
                request, answer(url, data, name, wanted, exact, started, slot)
            )
        except ClientGone:
            return Response(status_code=499)  # nobody is listening; the status is for logs
        finally:
            slot.release()

    async def answer(
        url: str | None,
        data: bytes,
        name: str,
        wanted: int,
        exact: bool,
        started: float,
        slot: Slot,
    ) -> dict[str, Any]:
        if url is not None:
            data = await _fetch(url, limits, access.fetch, fetch_pool, slot)
        loaded = engine.loaded  # this request's index and model, to the end
        k = min(wanted, len(loaded.index))
        read = time.perf_counter()
        pixels = await run_in_threadpool(_decode, data, loaded.index.input_size, limits.max_pixels)
        decoded = time.perf_counter()
        result = await asyncio.wrap_future(engine.submit(loaded, pixels, k, exact))
        base = source_base(loaded.index)
        return {
            "query": name,
            "k": k,
            "index": {"images": len(loaded.index), "model_key": loaded.index.model_key},
            "neighbours": [
                {
                    "rank": n.rank,
                    "image_id": n.image_id,
                    "distance": n.distance,
                    "uri": shown_uri(n.uri, base),
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
