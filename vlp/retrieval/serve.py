"""The HTTP services of `vlp serve`: what every service shares (`Service`, `Server`) and the
search service over a `Searcher` (the demo of a fine-tuned model: vlp/retrieval/model_service.py).

    GET  /                     the search page (static/index.html)
    GET  /api/info             {"count", "dim", "modes", "max_k", "batching", ...}
    POST /api/search           {"text": "...", "k": 10, "mode": "image"|"text"} -> {"results"}
    POST /api/search/image     the image as the raw body or multipart/form-data (field
                               "image"); ?k=10&mode=image -> {"results"}
    GET  /thumb/KEY            the image of sample KEY (URL-quoted), from its shard

Results: [{"rank", "key", "score", "caption", "thumbnail": "/thumb/KEY"}].

An ASGI app (Starlette) served by uvicorn, what such services are deployed with: one event
loop holds every connection, so a burst of clients waits in memory instead of in a 5-slot
listen backlog. `create_app(searcher)` gives the app alone for another ASGI server.

`Service` is the part every service shares (body reading and its limits, image uploads decoded
under the pixel budget, JSON errors, the micro-batcher and its lifecycle, routing errors that
name the API); `Server` serves any Service on a socket bound first. A service adds its routes
and the function its batcher runs.

Under load: the encoder and faiss run in one worker thread behind a micro-batching queue
(`MicroBatcher`): whatever requests arrived while the previous batch ran go through the model
and the index together (`Searcher.search_batch`), so 200 concurrent queries cost a few batched
forward passes, not 200 single ones.

Bad input: every request gets a 4xx `{"error": message}` naming the value and what is valid
(an unexpected failure a 500 with a message, no traceback), and none can make the process
allocate more than a bounded amount:
  - bodies: JSON at most MAX_JSON_BYTES, images MAX_IMAGE_BYTES; a body that stalls for
    `body_timeout` seconds (sent shorter than its Content-Length) gets 408;
  - JSON: nesting depth checked before parsing (a deep `[[[...]]]` would hit Python's
    recursion limit); integers of more than MAX_INT_DIGITS digits are never converted
    (int() of 5,000 digits raises, and big ones cost quadratic time); text must be valid
    Unicode (a lone surrogate "\\ud800" cannot reach the tokenizer);
  - images: the header's size is checked before decoding: at most MAX_IMAGE_PIXELS and an
    aspect ratio of at most MAX_ASPECT. The eval transform resizes the *shorter* side to
    the model's size before its centre crop, so a 60000x1 image would become a
    (60000*S)xS one (a 257-byte PNG -> gigabytes); at most MAX_ASPECT:1 bounds that at
    S*S*MAX_ASPECT pixels. Decoding waits for a share of a process-wide pixel budget
    (DECODE_PIXEL_BUDGET) and at most MAX_UPLOADS image bodies are read at once.

A demo and team tool, bound to loopback unless told otherwise; put it behind a proxy with
TLS and authentication before exposing it. Malformed HTTP itself (a garbled request line,
headers over 16 KB) gets uvicorn's own plain-text 400.
"""
from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import errno
import functools
import io
import json
import logging
import queue
import re
import socket
import threading
import warnings
from http import HTTPStatus
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import parse_qs, quote

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from vlp.retrieval.search import MODES, Query, Searcher

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_QUERY_CHARS = 1000
MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 16  # the API's objects are flat; anything deeper is not a query
MAX_INT_DIGITS = 18  # fits an int64; longer integers are rejected unconverted
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # decompression bombs: a tiny PNG can claim 10^5 x 10^5 pixels
MAX_ASPECT = 20  # wider or taller images are refused (panoramas reach ~10:1)
DECODE_PIXEL_BUDGET = MAX_IMAGE_PIXELS  # pixels being decoded at once, all requests together
MAX_UPLOADS = 4  # image bodies read (and decoded) at once; others wait, unread
BODY_TIMEOUT_S = 10.0  # a body that sends nothing for this long gets 408
MAX_BATCH = 32  # queries per encoder call (per-query cost stopped falling at 32: bench/README.md)
MAX_QUEUE = 4096  # queries waiting for the encoder; beyond, 503 (retry)
BACKLOG = 2048  # listen backlog (http.server's default was 5)
STATIC = Path(__file__).parent / "static"
JSON_FIELDS = ("text", "k", "mode")
API = "GET /, /api/info, /thumb/KEY; POST /api/search, /api/search/image"


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# --------------------------------------------------------------------------- checking input
def _show(value, limit: int = 40) -> str:
    """repr of a request value, cut short: error messages must not echo 60 KB back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 8]}... ({len(text)} characters)"


class HugeInt:
    """An integer literal of more than MAX_INT_DIGITS digits, kept unconverted."""

    def __init__(self, literal: str):
        self.digits = len(literal.lstrip("-"))

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _parse_int(literal: str) -> int | HugeInt:
    return HugeInt(literal) if len(literal.lstrip("-")) > MAX_INT_DIGITS else int(literal)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of JSON text (brackets outside strings), counted up to limit + 1."""
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > limit:
            break
    return deepest


def parse_json_object(body: bytes) -> dict:
    """A search request's JSON object, checked before and while it is parsed."""
    example = '{"text": "a red circle", "k": 10}'
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not UTF-8 ({e}); expected JSON "
                       f"like {example}") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the JSON nests more than {MAX_JSON_DEPTH} "
                       f"levels deep; expected a flat object like {example}")
    try:
        request = json.loads(text, parse_int=_parse_int)
    except ValueError as e:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({_show(str(e), 80)});"
                       f" expected {example}") from None
    if not isinstance(request, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"expected a JSON object like {example}, got "
                       f"{type(request).__name__}")
    unknown = sorted(set(request) - set(JSON_FIELDS))
    if unknown:
        shown = ", ".join(_show(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {shown}; valid: "
                       f"{list(JSON_FIELDS)}")
    return request


def check_k(k, limit: int = MAX_K, name: str = "k") -> int:
    """k from JSON (an int) or a query string (digits)."""
    if isinstance(k, str) and re.fullmatch(r"\s*[0-9]{1,4}\s*", k):
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name}={_show(k)}: expected an integer from 1 "
                       f"to {limit}")
    return k


def check_mode(mode, searcher: Searcher) -> str:
    if mode not in MODES:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"mode={_show(mode)}: expected one of "
                       f"{list(MODES)}")
    if mode not in searcher.modes:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"mode={mode!r}: this index has no caption "
                       "index (build it with `vlp index build --text`)")
    return mode


def check_text(text, name: str = "text") -> str:
    if not isinstance(text, str) or not text.strip():
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{name}' must be a non-empty string, got "
                       f"{_show(text)}")
    if len(text) > MAX_QUERY_CHARS:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{name}' has {len(text)} characters: at "
                       f"most {MAX_QUERY_CHARS}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'{name}' has a lone surrogate "
                       f"U+{ord(text[e.start]):04X} at character {e.start}: not valid Unicode "
                       "(a \\uD800-\\uDBFF escape must be followed by a \\uDC00-\\uDFFF "
                       "one)") from None
    return text


def open_image(data: bytes) -> Image.Image:
    """The upload opened lazily (the header only), its size and shape checked before any
    pixel is decoded."""
    if not data:
        raise ApiError(HTTPStatus.BAD_REQUEST, "empty upload: send the image bytes as the body "
                       "or as the multipart field 'image'")
    try:
        with warnings.catch_warnings():  # our own pixel limit below replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image too large: at most "
                       f"{MAX_IMAGE_PIXELS} pixels are accepted") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for non-images
        raise not_an_image() from None
    w, h = image.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image of {w}x{h} pixels: at most "
                       f"{MAX_IMAGE_PIXELS} pixels are accepted")
    if w < 1 or h < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"image of {w}x{h} pixels: the aspect ratio "
                       f"must be at most {MAX_ASPECT}:1 (crop it first)")
    return image


def not_an_image() -> ApiError:
    return ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the upload is not a decodable image "
                    "(JPEG, PNG, WebP...)")


def multipart_image(body: bytes, content_type: str,
                    fields: Sequence[str] = ()) -> tuple[bytes, dict[str, bytes]]:
    """The 'image' part (else the first file part) of a multipart/form-data body, and the
    parts named in `fields` that are present (their bytes)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(HTTPStatus.BAD_REQUEST, "malformed multipart/form-data body")
    parts = list(message.iter_parts())
    named = {}
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if name in fields and name not in named:
            named[name] = part.get_payload(decode=True) or b""
    chosen = next((p for p in parts if p.get_param("name", header="content-disposition")
                   == "image"), None) or next((p for p in parts if p.get_filename()), None)
    if chosen is None:
        raise ApiError(HTTPStatus.BAD_REQUEST, "multipart body has no 'image' field")
    return chosen.get_payload(decode=True) or b"", named


def read_upload(body: bytes, content_type: str,
                fields: Sequence[str] = ()) -> tuple[Image.Image, dict[str, bytes]]:
    """An image upload (the raw body, or multipart/form-data) opened lazily with its header
    checked (`open_image`), and the multipart fields named in `fields` that are present."""
    named: dict[str, bytes] = {}
    if content_type.startswith("multipart/form-data"):
        body, named = multipart_image(body, content_type, fields)
    return open_image(body), named


def decode_image(image: Image.Image) -> Image.Image:
    """An opened upload's pixels, decoded (a truncated or corrupt body fails here: 415), as an
    image of their own: the opened one keeps the whole upload's bytes for as long as it
    lives, which may be until the model has used it."""
    try:
        image.load()
    except Exception:  # noqa: BLE001 - PIL raises many types
        raise not_an_image() from None
    return image.copy()


# --------------------------------------------------------------------------- load control
class PixelBudget:
    """At most `total` pixels being decoded at once, across requests (an image larger than
    the budget waits until it has it all)."""

    def __init__(self, total: int):
        self.total = self.free = total
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def take(self, pixels: int):
        pixels = min(pixels, self.total)
        async with self._changed:
            await self._changed.wait_for(lambda: self.free >= pixels)
            self.free -= pixels
        try:
            yield
        finally:
            async with self._changed:
                self.free += pixels
                self._changed.notify_all()


class MicroBatcher:
    """A queue in front of `run(items) -> results`, drained by one worker thread: each call
    takes everything that queued up while the previous one ran (up to `max_batch`), so
    concurrent requests share one encoder pass and a lone request waits for nobody. If a
    batch fails, its items run one by one so a bad one fails alone."""

    def __init__(self, run: Callable[[list], list], max_batch: int = MAX_BATCH,
                 max_queue: int = MAX_QUEUE):
        self._run, self.max_batch, self.max_queue = run, max_batch, max_queue
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self.stats = {"batches": 0, "queries": 0, "largest_batch": 0}

    async def submit(self, item):
        """`item`'s result, computed in a batch; raises what computing it raised."""
        if self._queue.qsize() >= self.max_queue:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {self.max_queue} queries "
                           "are waiting; retry in a moment", {"Retry-After": "1"})
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="vlp-encoder",
                                                daemon=True)
                self._thread.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((item, future, loop))
        return await future

    def close(self) -> None:
        with self._start:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join(timeout=30)
                self._thread = None

    def _work(self) -> None:
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not None and len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None
            batch = [b for b in batch if b is not None]
            if batch:
                self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list) -> None:
        items = [item for item, _, _ in batch]
        try:
            results, errors = self._run(items), [None] * len(items)
        except Exception:  # noqa: BLE001 - retried one by one below
            results, errors = [None] * len(items), [None] * len(items)
            for i, item in enumerate(items):
                try:
                    results[i] = self._run([item])[0]
                except Exception as e:  # noqa: BLE001 - handed to that request
                    errors[i] = e
        self.stats["batches"] += 1
        self.stats["queries"] += len(items)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        for (_, future, loop), result, error in zip(batch, results, errors):
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# --------------------------------------------------------------------------- the app
def json_response(status: int, obj, headers: dict | None = None) -> Response:
    # ensure_ascii: a lone surrogate echoed in a message stays encodable
    return Response(json.dumps(obj).encode(), status_code=int(status),
                    media_type="application/json; charset=utf-8",
                    headers={"X-Content-Type-Options": "nosniff", **(headers or {})})


def api_endpoint(handler):
    """ApiError -> its 4xx JSON; anything else -> a logged 500 JSON without a traceback."""
    @functools.wraps(handler)
    async def run(self, request: Request) -> Response:
        try:
            return await handler(self, request)
        except ApiError as e:
            return json_response(e.status, {"error": e.message}, e.headers)
        except ClientDisconnect:  # gone: nothing we send reaches it
            return Response(status_code=400)
        except Exception as e:  # noqa: BLE001 - the service must keep answering
            log.exception("error serving %s %s", request.method, request.url.path)
            return json_response(HTTPStatus.INTERNAL_SERVER_ERROR, {
                "error": f"internal error ({type(e).__name__}); see the server log"})
    return run


def query_params(request: Request, valid: Sequence[str],
                 keep_blank: bool = False) -> dict[str, list[str]]:
    """The query string's parameters (each a list of values), only those in `valid`; values
    must be valid percent-encoded UTF-8. `keep_blank`: keep `?name=` (else dropped)."""
    try:
        query = parse_qs(request.url.query, keep_blank_values=keep_blank, max_num_fields=16,
                         errors="strict")
    except UnicodeDecodeError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "the query string is not valid UTF-8 "
                       "(percent-encode text as UTF-8)") from None
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"too many query parameters; valid: "
                       f"{', '.join(valid)}") from None
    unknown = sorted(set(query) - set(valid))
    if unknown:
        shown = ", ".join(_show(u) for u in unknown[:5])
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown parameter(s) {shown}; valid: "
                       f"{', '.join(valid) or 'none'}")
    return query


class Service:
    """What every `vlp serve` service shares: the ASGI app (`.app`) with the page at `/`, a
    micro-batcher in front of the model (`run(items) -> results`, started on the first
    request, stopped with the app), bodies read within their limits, image uploads decoded
    under the pixel budget, and JSON for every error, routing errors naming the API (`api`).
    A service passes its own routes and `run`."""

    def __init__(self, routes: Sequence[Route], run: Callable[[list], list], *, api: str,
                 page: str, body_timeout: float = BODY_TIMEOUT_S, max_batch: int = MAX_BATCH,
                 max_queue: int = MAX_QUEUE):
        """`page`: a file of static/, sent for GET / and GET /<page>."""
        self.api = api
        self.body_timeout = body_timeout
        self.batcher = MicroBatcher(run, max_batch, max_queue)
        self.pixels = PixelBudget(DECODE_PIXEL_BUDGET)
        self.uploads = asyncio.Semaphore(MAX_UPLOADS)
        self.page = (STATIC / page).read_bytes()
        self.app = Starlette(routes=[
            Route("/", self.page_response, methods=["GET"]),
            Route(f"/{page}", self.page_response, methods=["GET"]),
            *routes,
        ], exception_handlers={HTTPException: self.http_error}, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        yield
        await asyncio.to_thread(self.batcher.close)

    def close(self) -> None:
        self.batcher.close()

    async def page_response(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8")

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's routing errors (no such path, wrong method) as JSON."""
        path = request.url.path
        if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            message = (f"method {_show(request.method)} is not allowed on {_show(path)}; "
                       f"{self.api}")
        elif exc.status_code == HTTPStatus.NOT_FOUND:
            message = f"no such path {_show(path, 80)}; the API: {self.api}"
        else:
            message = str(exc.detail)
        return json_response(exc.status_code, {"error": message}, exc.headers)

    async def read_body(self, request: Request, limit: int) -> bytes:
        """The body, at most `limit` bytes (413 beyond), each part arriving within
        body_timeout seconds (408: e.g. a body shorter than its Content-Length)."""
        declared = request.headers.get("content-length")
        if declared is not None and (len(declared) > MAX_INT_DIGITS or int(declared) > limit):
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {_show(declared)} "
                           f"bytes: at most {limit} are accepted here")
        chunks, size = [], 0
        stream = request.stream()
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), self.body_timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                of = f" of the {declared} its Content-Length announced" if declared else ""
                raise ApiError(HTTPStatus.REQUEST_TIMEOUT, f"the body stopped after {size} "
                               f"bytes{of} (nothing arrived for {self.body_timeout:g} s)",
                               {"Connection": "close"}) from None
            size += len(chunk)
            if size > limit:
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of more than "
                               f"{limit} bytes: at most {limit} are accepted here")
            chunks.append(chunk)
        return b"".join(chunks)

    @contextlib.asynccontextmanager
    async def image_upload(self, request: Request, fields: Sequence[str] = ()):
        """-> (image, fields): the uploaded image (raw body or multipart field 'image'),
        decoded, and the multipart fields named in `fields` that were sent (bytes). At most
        MAX_UPLOADS bodies are read at once; the image's pixels hold their share of the
        decoding budget until the `async with` block ends, so what a service keeps of the
        decoded image (until its batch runs, say) stays within the budget too."""
        content_type = request.headers.get("content-type", "")
        async with contextlib.AsyncExitStack() as held:
            async with self.uploads:
                body = await self.read_body(request, MAX_IMAGE_BYTES)
                image, named = await asyncio.to_thread(read_upload, body, content_type, fields)
                await held.enter_async_context(self.pixels.take(image.width * image.height))
                image = await asyncio.to_thread(decode_image, image)
                del body
            yield image, named


class SearchService(Service):
    """The search API and page over a Searcher."""

    def __init__(self, searcher: Searcher, **options):
        """options: Service's (body_timeout, max_batch, max_queue)."""
        self.searcher = searcher
        super().__init__([
            Route("/api/info", self.info, methods=["GET"]),
            Route("/api/search", self.search_text, methods=["POST"]),
            Route("/api/search/image", self.search_image, methods=["POST"]),
            Route("/thumb/{key:path}", self.thumb, methods=["GET"]),
        ], searcher.search_batch, api=API, page="index.html", **options)

    # ------------------------------------------------------------------ endpoints
    @api_endpoint
    async def info(self, request: Request) -> Response:
        s = self.searcher
        image = s.info.get("image", {})
        return json_response(HTTPStatus.OK, {
            "count": s.count, "dim": image.get("dim"), "modes": list(s.modes), "max_k": MAX_K,
            "factory": image.get("factory"), "recall@10": image.get("recall@10"),
            "batching": dict(self.batcher.stats)})

    @staticmethod
    def _results(hits) -> Response:
        return json_response(HTTPStatus.OK, {"results": [
            {"rank": h.rank, "key": h.key, "score": round(h.score, 6), "caption": h.caption,
             "thumbnail": "/thumb/" + quote(h.key, safe="")} for h in hits]})

    @api_endpoint
    async def search_text(self, request: Request) -> Response:
        request_json = parse_json_object(await self.read_body(request, MAX_JSON_BYTES))
        text = check_text(request_json.get("text"))
        k = check_k(request_json.get("k", 10))
        mode = check_mode(request_json.get("mode", "image"), self.searcher)
        return self._results(await self.batcher.submit(Query(k, mode, text=text)))

    @api_endpoint
    async def search_image(self, request: Request) -> Response:
        query = query_params(request, ("k", "mode"))
        k = check_k(query.get("k", ["10"])[-1])
        mode = check_mode(query.get("mode", ["image"])[-1], self.searcher)
        async with self.image_upload(request) as (image, _):
            pixels = await asyncio.to_thread(self.searcher.prepare_image, image)
            del image
        return self._results(await self.batcher.submit(Query(k, mode, pixels=pixels)))

    @api_endpoint
    async def thumb(self, request: Request) -> Response:
        key = request.path_params["key"]
        try:
            data, mime = await asyncio.to_thread(self.searcher.image_bytes, key)
        except KeyError:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no sample with key {_show(key, 80)}") from None
        except FileNotFoundError as e:
            raise ApiError(HTTPStatus.NOT_FOUND, str(e)) from None
        return Response(data, media_type=mime, headers={"Cache-Control": "max-age=3600",
                                                         "X-Content-Type-Options": "nosniff"})


def create_app(searcher: Searcher, **options) -> Starlette:
    """The service as an ASGI app, for any ASGI server (options: SearchService's)."""
    return SearchService(searcher, **options).app


# --------------------------------------------------------------------------- the server
class BindError(OSError):
    """The address cannot be bound (port in use, no such host, privileged port)."""


def bind(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket, or a BindError with one line saying what to change."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise BindError(f"port {port} on {host} is already in use (another `vlp serve`?): "
                            f"stop that process or choose another port, e.g. --port "
                            f"{port + 1 if port < 65535 else 8000}") from None
        if e.errno == errno.EACCES:
            raise BindError(f"no permission to listen on port {port}: ports below 1024 need "
                            "root; choose another with --port, e.g. --port 8000") from None
        raise BindError(f"cannot listen on {host}:{port} ({e.strerror or e}): check --host "
                        "(e.g. 127.0.0.1, or 0.0.0.0 for every interface) and --port") from None


class Server:
    """uvicorn serving a Service on an already bound socket (`bind`: so a port in use fails
    before a model loads). `serve_forever()` blocks; `shutdown()` from another thread stops
    it; `server_close()` releases the socket and the service's batcher thread."""

    def __init__(self, service: Service, sock: socket.socket):
        self.socket, self.service = sock, service
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(self.service.app, log_config=None, log_level="warning",
                                access_log=False, backlog=BACKLOG, timeout_keep_alive=5,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def serve_forever(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float = 30) -> None:
        self._server.should_exit = True
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()
        self.service.close()


class SearchServer(Server):
    """The search service on (host, port)."""

    def __init__(self, searcher: Searcher, host: str = "127.0.0.1", port: int = 8000,
                 **options):
        sock = bind(host, port)
        try:
            service = SearchService(searcher, **options)
        except BaseException:
            sock.close()
            raise
        super().__init__(service, sock)


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000,
                **options) -> SearchServer:
    """A search server bound to (host, port) (port 0: any free one; see `.url`); run it with
    `serve_forever()`. BindError (an OSError) when the address cannot be bound."""
    return SearchServer(searcher, host, port, **options)


__all__: Sequence[str] = ("ApiError", "BindError", "MicroBatcher", "SearchServer",
                          "SearchService", "Server", "Service", "api_endpoint", "bind",
                          "create_app", "make_server", "MAX_K")
