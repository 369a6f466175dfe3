"""`vlp serve` under load and bad input (issue 17): the service in its own process answers
200 concurrent clients through its micro-batching queue with the results each query gets alone,
and answers the inputs that once gave 500s or took it to 1.4 GB (a 60 KB [[[...]]] body, k with
5,000 digits, a lone surrogate, a body shorter than its Content-Length, a 257-byte 60000x1 PNG)
with a 4xx JSON error while its peak memory (VmHWM) stays put."""
import asyncio
import base64
import http.client
import io
import json
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_retrieval_index import built, corpus, model_dir  # noqa: F401 - session fixtures
from vlp.cli import main
from vlp.retrieval.search import Query, Searcher
from vlp.retrieval.serve import MAX_JSON_BYTES, ApiError, MicroBatcher, json_depth

# The issue's bomb: a 257-byte PNG whose header says 60000 x 1 pixels. The eval transform
# resizes the shorter side to the model's size first, so it would become 3,840,000 x 64
# pixels in the tests' model (~1 GB) before the centre crop.
WIDE_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAA6mAAAAABCAIAAABryMezAAAAyElEQVR4nO3BAQ0AAAwCIO0f+ub4BrRNLgAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAHwxgw4BA+rnRRoAAAAASUVORK5CYII=")
MB = 2 ** 20
PEAK_GROWTH_LIMIT = 100 * MB  # what bad input may add to the server's peak memory
SERVER = """
import sys
from vlp.retrieval.search import Searcher
from vlp.retrieval.serve import make_server
searcher = Searcher(sys.argv[1])
server = make_server(searcher, "127.0.0.1", 0, body_timeout=float(sys.argv[2]))
searcher.model
print(server.url, flush=True)
server.serve_forever()
"""
BODY_TIMEOUT = 1.0
TEXTS = ["a red circle", "a small blue square", "two green triangles", "a yellow star",
         "a purple circle to the left of a red square", "three shapes", "a big orange hexagon",
         "a blue circle above a green square", "a tiny red triangle", "a cyan square"]


class Served:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url
        self.host, port = url[len("http://"):].rstrip("/").rsplit(":", 1)
        self.port = int(port)

    def peak_memory(self) -> int:
        """The server process's peak resident memory (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")


@pytest.fixture(scope="module")
def served(built):  # noqa: F811
    """The service in a process of its own (so its memory is its own), body timeout 1 s."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the server's peak memory from /proc (Linux)")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(built), str(BODY_TIMEOUT)],
                            stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    assert url.startswith("http://"), f"server did not start (exit {proc.poll()})"
    yield Served(proc, url)
    proc.terminate()
    proc.wait(30)


def call(served: Served, method: str, path: str, body: bytes | str = b"",
         headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(served.host, served.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        assert response.headers["Content-Type"].startswith("application/json"), data[:200]
        return response.status, json.loads(data)
    finally:
        conn.close()


def raw_exchange(served: Served, data: bytes, half_close: bool = False,
                 timeout: float = 30) -> bytes:
    """Send bytes as they are (then optionally shut down our sending side); what the server
    sent back until it closed the connection."""
    with socket.create_connection((served.host, served.port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def parse_response(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def shard_jpeg(corpus) -> tuple[str, bytes]:  # noqa: F811
    with tarfile.open(f"{corpus[1]}/train/00003.tar") as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        return member.name[:-4], tar.extractfile(member).read()


def assert_same_hits(got: list[dict], want) -> None:
    """The served results are the query's own: same scores (the server rounds to 6
    decimals) and the same keys wherever the scores are not (nearly) tied."""
    assert len(got) == len(want)
    np.testing.assert_allclose([g["score"] for g in got], [w.score for w in want], atol=2e-5)
    scores = [w.score for w in want]
    for r, (g, w) in enumerate(zip(got, want)):
        gaps = [abs(scores[r] - scores[j]) for j in (r - 1, r + 1) if 0 <= j < len(scores)]
        if min(gaps, default=1.0) > 1e-4:
            assert g["key"] == w.key, (r, g, w)


# ------------------------------------------------------------------------------ bad input
def test_issue_inputs_get_4xx_json_and_bounded_memory(served, corpus):  # noqa: F811
    key, jpeg = shard_jpeg(corpus)
    assert call(served, "POST", "/api/search", json.dumps({"text": "a red circle"}))[0] == 200
    status, out = call(served, "POST", "/api/search/image?k=3", jpeg)
    assert status == 200 and out["results"][0]["key"] == key
    before = served.peak_memory()
    json_headers = {"Content-Type": "application/json"}

    # a 60 KB [[[...]]] body: under the 64 KB limit, so it reaches the JSON parser's check
    nested = b"[" * (30 * 1024) + b"]" * (30 * 1024)
    assert 60 * 1024 <= len(nested) <= MAX_JSON_BYTES
    status, out = call(served, "POST", "/api/search", nested, json_headers)
    assert status == 400 and "nests more than" in out["error"]

    # k with 5,000 digits: as a JSON number, as a JSON string, in the query string
    digits = "9" * 5000
    for body in ('{"text": "a red circle", "k": %s}' % digits,
                 '{"text": "a red circle", "k": -%s}' % digits,
                 '{"text": "a red circle", "k": "%s"}' % digits):
        status, out = call(served, "POST", "/api/search", body, json_headers)
        assert status == 400 and out["error"].startswith("k=") and len(out["error"]) < 200, out
    assert "5000 digits" in call(served, "POST", "/api/search", '{"text": "a", "k": %s}'
                                 % digits, json_headers)[1]["error"]
    status, out = call(served, "POST", f"/api/search/image?k={digits}", jpeg)
    assert status == 400 and out["error"].startswith("k=")

    # a lone surrogate: the JSON escape "\ud800" alone, and inside a text
    for text in (r'"\ud800"', r'"a red \ud800 circle"', r'"\udfff"'):
        status, out = call(served, "POST", "/api/search", '{"text": %s}' % text, json_headers)
        assert status == 400 and "lone surrogate" in out["error"], out
    # the same code point sent as (invalid) UTF-8 bytes
    status, out = call(served, "POST", "/api/search", b'{"text": "\xed\xa0\x80"}', json_headers)
    assert status == 400 and "UTF-8" in out["error"]

    # a body shorter than its Content-Length, the client waiting for an answer: 408 after
    # the body timeout, not a 500 after 30 s
    head = (b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    t = time.perf_counter()
    status, headers, out = parse_response(raw_exchange(served, head + b'{"text": "a red'))
    waited = time.perf_counter() - t
    assert status == 408 and headers["content-type"].startswith("application/json")
    assert "15 bytes of the 100" in out["error"] and BODY_TIMEOUT <= waited < 10
    # ... and one that closes its sending side: no answer can be sent, and none is a 5xx
    answer = raw_exchange(served, head + b'{"text": "a red', half_close=True)
    assert answer == b"" or 400 <= parse_response(answer)[0] < 500

    # the 257-byte 60000x1 PNG, raw and as a multipart upload
    assert len(WIDE_PNG) == 257 and Image.open(io.BytesIO(WIDE_PNG)).size == (60000, 1)
    status, out = call(served, "POST", "/api/search/image", WIDE_PNG)
    assert status == 400 and "aspect ratio" in out["error"] and "60000x1" in out["error"]
    form = (b"--b0\r\nContent-Disposition: form-data; name=\"image\"; filename=\"w.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + WIDE_PNG + b"\r\n--b0--\r\n")
    status, out = call(served, "POST", "/api/search/image", form,
                       {"Content-Type": "multipart/form-data; boundary=b0"})
    assert status == 400 and "aspect ratio" in out["error"]

    # it goes on answering, and none of that raised its peak memory
    status, out = call(served, "POST", "/api/search", json.dumps({"text": "a blue square",
                                                                  "k": 4}), json_headers)
    assert status == 200 and len(out["results"]) == 4
    grown = served.peak_memory() - before
    assert grown < PEAK_GROWTH_LIMIT, f"peak memory grew by {grown / MB:.0f} MB"


def test_port_in_use_is_one_line(served, built, capsys):  # noqa: F811
    t = time.perf_counter()
    assert main(["serve", "--index", str(built), "--port", str(served.port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"port {served.port}" in err and "already in use" in err and "--port" in err
    assert time.perf_counter() - t < 10  # it fails before loading the model


def test_json_depth_counts_outside_strings():
    assert json_depth('{"text": "[[[[[[", "k": [1, [2]]}') == 3
    assert json_depth("[]") == 1 and json_depth('"{"') == 0
    assert json_depth('["\\"[[["]') == 1  # an escaped quote does not end the string
    assert json_depth("[" * 100, limit=16) == 17  # stops counting past the limit


# ------------------------------------------------------------------------------ load
async def _post(host: str, port: int, path: str, body: bytes,
                content_type: str) -> tuple[float, bytes]:
    t = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return time.perf_counter() - t, data


async def _burst(host: str, port: int, requests: list[tuple[str, bytes, str]]):
    return await asyncio.gather(*(_post(host, port, *r) for r in requests))


def test_200_concurrent_clients_all_answered_with_their_own_results(served, built,
                                                                     corpus):  # noqa: F811
    key, jpeg = shard_jpeg(corpus)
    requests = []
    for i in range(200):
        if i % 10 == 9:  # every tenth an image query
            requests.append(("/api/search/image?k=5", jpeg, "image/jpeg"))
        else:
            body = json.dumps({"text": TEXTS[i % len(TEXTS)], "k": 5 + i % 3,
                               "mode": "text" if i % 4 == 1 else "image"}).encode()
            requests.append(("/api/search", body, "application/json"))
    before = call(served, "GET", "/api/info")[1]["batching"]
    t = time.perf_counter()
    answers = asyncio.run(_burst(served.host, served.port, requests))
    wall = time.perf_counter() - t
    after = call(served, "GET", "/api/info")[1]["batching"]

    reference = Searcher(built)  # the unbatched path, in this process
    for (path, body, _), (latency, raw) in zip(requests, answers):
        status, _, out = parse_response(raw)
        assert status == 200, out
        if path == "/api/search":
            q = json.loads(body)
            want = reference.search_text(q["text"], q["k"], q["mode"])
        else:
            want = reference.search_image(Image.open(io.BytesIO(jpeg)), 5)
            assert out["results"][0]["key"] == key
        assert_same_hits(out["results"], want)
    latencies = sorted(latency for latency, _ in answers)
    # 200 queries through a 32-wide model: seconds only if they were not served at once
    assert latencies[-1] < 20, f"slowest {latencies[-1]:.1f} s (wall {wall:.1f} s)"
    # they were batched: fewer encoder calls than queries, and some call took several
    assert after["queries"] - before["queries"] == 200
    assert after["batches"] - before["batches"] < 200 and after["largest_batch"] > 1


# ------------------------------------------------------------------------------ batching
def test_search_batch_matches_single_queries(built, corpus):  # noqa: F811
    searcher = Searcher(built)
    _, jpeg = shard_jpeg(corpus)
    image = Image.open(io.BytesIO(jpeg))
    queries = [Query(k=3, text="a red circle"), Query(k=7, mode="text", text="a blue square"),
               Query(k=5, pixels=searcher.prepare_image(image)),
               Query(k=4, mode="text", pixels=searcher.prepare_image(image)),
               Query(k=1000, text="two green triangles")]
    got = searcher.search_batch(queries)
    want = [searcher.search_text("a red circle", 3), searcher.search_text("a blue square", 7,
                                                                          "text"),
            searcher.search_image(image, 5), searcher.search_image(image, 4, "text"),
            searcher.search_text("two green triangles", 1000)]
    assert [len(g) for g in got] == [3, 7, 5, 4, 64]  # k beyond the 64 samples: all of them
    for g, w in zip(got, want):
        assert_same_hits([{"score": h.score, "key": h.key} for h in g], w)
    with pytest.raises(ValueError, match="text` or `pixels"):
        searcher.search_batch([Query(k=3)])


def test_micro_batcher_batches_and_isolates_a_bad_item():
    calls = []

    def run(items):
        calls.append(list(items))
        if len(calls) == 1:
            time.sleep(0.2)  # the first call is slow: the others queue up behind it
        if "bad" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]

    async def go():
        batcher = MicroBatcher(run, max_batch=8)
        first = asyncio.ensure_future(batcher.submit("first"))
        await asyncio.sleep(0.05)
        items = [f"q{i}" for i in range(20)] + ["bad"]
        results = await asyncio.gather(*(batcher.submit(i) for i in items),
                                       return_exceptions=True)
        batcher.close()
        return await first, items, results, batcher.stats

    first, items, results, stats = asyncio.run(go())
    assert first == "FIRST"
    assert results[:-1] == [i.upper() for i in items[:-1]]
    assert isinstance(results[-1], ValueError)  # only the bad one failed
    assert stats["queries"] == 22 and stats["largest_batch"] == 8  # capped at max_batch
    assert all(len(c) <= 8 for c in calls) and calls[1] == items[:8]


def test_micro_batcher_queue_limit_is_503():
    async def go():
        batcher = MicroBatcher(lambda items: [time.sleep(0.3)] * len(items), max_queue=2)
        waiting = [asyncio.ensure_future(batcher.submit(0))]
        await asyncio.sleep(0.1)  # the worker has taken it and is busy: the next ones queue
        waiting += [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as e:
            await batcher.submit("one too many")
        await asyncio.gather(*waiting)
        batcher.close()
        return e.value

    error = asyncio.run(go())
    assert error.status == 503 and error.headers == {"Retry-After": "1"}
