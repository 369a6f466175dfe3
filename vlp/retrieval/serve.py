"""The search service: a small HTTP JSON API and a web page over a `Searcher`.

    GET  /                     the search page (static/index.html)
    GET  /api/info             {"count", "dim", "modes", "max_k", ...}
    POST /api/search           {"text": "...", "k": 10, "mode": "image"|"text"} -> {"results"}
    POST /api/search/image     the image as the raw body or multipart/form-data (field
                               "image"); ?k=10&mode=image -> {"results"}
    GET  /thumb/KEY            the image of sample KEY (URL-quoted), from its shard

Results: [{"rank", "key", "score", "caption", "thumbnail": "/thumb/KEY"}]. Standard library
only (http.server's ThreadingHTTPServer): a demo and team tool, not a public web service, so
it binds to loopback unless told otherwise. Every bad request (malformed JSON, oversized body,
non-image upload, k out of range, unknown field, key or path, wrong method) gets a 4xx with
{"error": message}; an unexpected failure a 500 with a message and no traceback.
"""
from __future__ import annotations

import email.parser
import email.policy
import io
import json
import logging
import warnings
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from PIL import Image

from vlp.retrieval.search import MODES, Searcher

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_QUERY_CHARS = 1000
MAX_JSON_BYTES = 64 * 1024
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # decompression bombs: a tiny PNG can claim 10^5 x 10^5 pixels
DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body is read and dropped up to this, so the
#                                 client gets its 413 instead of a reset connection
STATIC = Path(__file__).parent / "static"
JSON_FIELDS = ("text", "k", "mode")


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _check_k(k) -> int:
    if isinstance(k, str) and k.strip().lstrip("-").isdigit():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"k={k!r}: expected an integer from 1 to {MAX_K}")
    return k


def _check_mode(mode, searcher: Searcher) -> str:
    if mode not in MODES:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"mode={mode!r}: expected one of {list(MODES)}")
    if mode not in searcher.modes:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"mode={mode!r}: this index has no caption "
                       "index (build it with `vlp index build --text`)")
    return mode


def _decode_image(data: bytes) -> Image.Image:
    if not data:
        raise ApiError(HTTPStatus.BAD_REQUEST, "empty upload: send the image bytes as the body "
                       "or as the multipart field 'image'")
    not_an_image = ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the upload is not a decodable "
                            "image (JPEG, PNG, WebP...)")
    try:
        with warnings.catch_warnings():  # our own pixel limit below replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image too large: at most "
                       f"{MAX_IMAGE_PIXELS} pixels are accepted") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for non-images
        raise not_an_image from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       f"image of {image.width}x{image.height} pixels: at most "
                       f"{MAX_IMAGE_PIXELS} pixels are accepted")
    try:
        image.load()  # a truncated or corrupt body fails here
    except Exception:  # noqa: BLE001
        raise not_an_image from None
    return image


def _multipart_image(body: bytes, content_type: str) -> bytes:
    """The 'image' part (else the first file part) of a multipart/form-data body."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(HTTPStatus.BAD_REQUEST, "malformed multipart/form-data body")
    parts = list(message.iter_parts())
    chosen = next((p for p in parts if p.get_param("name", header="content-disposition")
                   == "image"), None) or next((p for p in parts if p.get_filename()), None)
    if chosen is None:
        raise ApiError(HTTPStatus.BAD_REQUEST, "multipart body has no 'image' field")
    return chosen.get_payload(decode=True) or b""


class Handler(BaseHTTPRequestHandler):
    """One request. `server.searcher` is the Searcher; errors become JSON (`_fail`)."""

    server_version = "vlp-search"
    timeout = 30  # a client that stops sending mid-request frees its thread
    _consumed = False  # whether this request's body has been read (or dropped)

    # ---------------------------------------------------------------- plumbing
    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        log.info("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, extra: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8", extra)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (malformed request line, headers too long...) as JSON."""
        self.close_connection = True
        try:
            self._json(code, {"error": message or HTTPStatus(code).phrase})
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str):
        # any other method (PUT, DELETE, FOO...): 405, not http.server's 501
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        self._drain()
        self._json(HTTPStatus.METHOD_NOT_ALLOWED,
                   {"error": f"method {self.command} is not allowed here; GET /, /api/info, "
                             "/thumb/KEY; POST /api/search, /api/search/image"},
                   {"Allow": "GET, POST"})

    def _length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            if self.headers.get("Transfer-Encoding"):
                raise ApiError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted: "
                               "send Content-Length")
            return 0
        try:
            n = int(raw)
        except ValueError:
            n = -1
        if n < 0:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {raw!r}")
        return n

    def _drain(self) -> None:
        """Read and drop an unread body (up to DRAIN_BYTES), so the client sees our answer."""
        if self._consumed:
            return
        self._consumed = True
        try:
            n = self._length()
        except ApiError:
            n = 0
        if n > DRAIN_BYTES:
            self.close_connection = True
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                break
            n -= len(chunk)

    def _body(self, limit: int) -> bytes:
        n = self._length()
        if n > limit:
            self._drain()
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body of {n} bytes: at most {limit} are accepted here")
        self._consumed = True
        data = self.rfile.read(n)
        if len(data) != n:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"body ended after {len(data)} of {n} bytes")
        return data

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        routes = {("GET", "/"): self._page, ("GET", "/index.html"): self._page,
                  ("GET", "/api/info"): self._info, ("POST", "/api/search"): self._search_text,
                  ("POST", "/api/search/image"): self._search_image}
        try:
            if (method, path) in routes:
                routes[(method, path)]()
            elif method == "GET" and path.startswith("/thumb/"):
                self._thumb(unquote(path[len("/thumb/"):]))
            elif any(p == path for _, p in routes) or path.startswith("/thumb/"):
                self._method_not_allowed()
            else:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no such path {path!r}; the API: GET /, "
                               "/api/info, /thumb/KEY; POST /api/search, /api/search/image")
        except ApiError as e:
            self._drain()
            self._json(e.status, {"error": e.message})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - the service must keep answering
            log.exception("error serving %s %s", method, path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                       {"error": f"internal error ({type(e).__name__}); see the server log"})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    # ---------------------------------------------------------------- endpoints
    def _page(self) -> None:
        self._send(HTTPStatus.OK, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8")

    def _info(self) -> None:
        s = self.server.searcher
        image = s.info.get("image", {})
        self._json(HTTPStatus.OK, {"count": s.count, "dim": image.get("dim"),
                                   "modes": list(s.modes), "max_k": MAX_K,
                                   "factory": image.get("factory"),
                                   "recall@10": image.get("recall@10")})

    def _results(self, hits) -> None:
        self._json(HTTPStatus.OK, {"results": [
            {"rank": h.rank, "key": h.key, "score": round(h.score, 6), "caption": h.caption,
             "thumbnail": "/thumb/" + quote(h.key, safe="")} for h in hits]})

    def _search_text(self) -> None:
        body = self._body(MAX_JSON_BYTES)
        try:
            request = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({e}); expected "
                           '{"text": "a red circle", "k": 10}') from None
        if not isinstance(request, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, 'expected a JSON object like {"text": '
                           '"a red circle", "k": 10}')
        unknown = sorted(set(request) - set(JSON_FIELDS))
        if unknown:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {unknown}; valid: "
                           f"{list(JSON_FIELDS)}")
        text = request.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(HTTPStatus.BAD_REQUEST, "'text' must be a non-empty string")
        if len(text) > MAX_QUERY_CHARS:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"'text' has {len(text)} characters: at most "
                           f"{MAX_QUERY_CHARS}")
        k = _check_k(request.get("k", 10))
        mode = _check_mode(request.get("mode", "image"), self.server.searcher)
        self._results(self.server.searcher.search_text(text, k, mode))

    def _search_image(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        unknown = sorted(set(query) - {"k", "mode"})
        if unknown:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown parameter(s) {unknown}; valid: "
                           "k, mode")
        k = _check_k(query.get("k", ["10"])[-1])
        mode = _check_mode(query.get("mode", ["image"])[-1], self.server.searcher)
        body = self._body(MAX_IMAGE_BYTES)
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            body = _multipart_image(body, content_type)
        image = _decode_image(body)
        self._results(self.server.searcher.search_image(image, k, mode))

    def _thumb(self, key: str) -> None:
        try:
            data, mime = self.server.searcher.image_bytes(key)
        except KeyError:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no sample with key {key!r}") from None
        except FileNotFoundError as e:
            raise ApiError(HTTPStatus.NOT_FOUND, str(e)) from None
        self._send(HTTPStatus.OK, data, mime, {"Cache-Control": "max-age=3600"})


class SearchServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never blocks shutdown

    def __init__(self, address: tuple[str, int], searcher: Searcher):
        super().__init__(address, Handler)
        self.searcher = searcher

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000) -> SearchServer:
    """A server bound to (host, port) (port 0: any free one; see `.url`); run it with
    `serve_forever()`."""
    return SearchServer((host, port), searcher)
