"""`vlp serve`: the HTTP JSON API under good and malformed requests, thumbnails from the
shards, and the web page driven in headless Chromium (selenium)."""
import http.client
import io
import json
import os
import shutil
import tarfile
import threading
import uuid

import pytest
from PIL import Image

from test_retrieval_index import built, corpus, model_dir  # noqa: F401 - session fixtures
from vlp.retrieval.search import Searcher
from vlp.retrieval.serve import MAX_K, make_server

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def server(built):  # noqa: F811
    searcher = Searcher(built)
    srv = make_server(searcher, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(server, method: str, path: str, body: bytes | str = b"",
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers (names case-insensitive, as HTTP has them), body)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def post_json(server, obj, path="/api/search"):
    status, headers, body = request(server, "POST", path, json.dumps(obj),
                                    {"Content-Type": "application/json"})
    return status, json.loads(body)


def _shard_image(corpus) -> tuple[str, bytes]:  # noqa: F811
    with tarfile.open(f"{corpus[1]}/train/00005.tar") as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        return member.name[:-4], tar.extractfile(member).read()


def test_search_and_thumbnails(server, corpus):  # noqa: F811
    status, out = post_json(server, {"text": "a red circle", "k": 5})
    assert status == 200 and len(out["results"]) == 5
    first = out["results"][0]
    assert set(first) == {"rank", "key", "score", "caption", "thumbnail"}
    assert first["thumbnail"] == f"/thumb/{first['key']}"
    status, headers, data = request(server, "GET", first["thumbnail"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(data)).size == (64, 64)

    status, out = post_json(server, {"text": "a red circle", "k": 3, "mode": "text"})
    assert status == 200 and len(out["results"]) == 3

    # image queries: raw bytes and multipart; the image itself comes first
    key, jpeg = _shard_image(corpus)
    status, _, body = request(server, "POST", "/api/search/image?k=2", jpeg,
                              {"Content-Type": "image/jpeg"})
    assert status == 200 and json.loads(body)["results"][0]["key"] == key
    boundary = uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"q.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + jpeg + \
        f"\r\n--{boundary}--\r\n".encode()
    status, _, body = request(server, "POST", "/api/search/image", form,
                              {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and json.loads(body)["results"][0]["key"] == key

    status, _, body = request(server, "GET", "/api/info")
    assert status == 200 and json.loads(body)["count"] == 64
    status, headers, body = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")


def test_bad_requests_get_4xx_json_and_service_goes_on(server):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    json_headers = {"Content-Type": "application/json"}
    bad = [
        ("POST", "/api/search", "{not json", json_headers, 400),
        ("POST", "/api/search", b"\xff\xfe\x00", json_headers, 400),
        ("POST", "/api/search", "[1, 2]", json_headers, 400),
        ("POST", "/api/search", b"x" * (10 * 2 ** 20), json_headers, 413),
        ("POST", "/api/search", json.dumps({"text": "a", "k": 10 ** 9}), json_headers, 400),
        ("POST", "/api/search", json.dumps({"text": "a", "k": -1}), json_headers, 400),
        ("POST", "/api/search", json.dumps({"text": "a", "k": "ten"}), json_headers, 400),
        ("POST", "/api/search", json.dumps({"text": "a", "k": True}), json_headers, 400),
        ("POST", "/api/search", json.dumps({"k": 5}), json_headers, 400),
        ("POST", "/api/search", json.dumps({"text": "   "}), json_headers, 400),
        ("POST", "/api/search", json.dumps({"text": "a " * 2500}), json_headers, 400),
        ("POST", "/api/search", json.dumps({"text": "a", "mode": "video"}), json_headers, 400),
        ("POST", "/api/search", json.dumps({"text": "a", "colour": 1}), json_headers, 400),
        ("POST", "/api/search/image", b"GIF89a but not really", {}, 415),
        ("POST", "/api/search/image", b"", {}, 400),
        ("POST", "/api/search/image", b"\0" * (10 * 2 ** 20), {}, 413),
        ("POST", f"/api/search/image?k={MAX_K + 1}", png.getvalue(), {}, 400),
        ("POST", "/api/search/image?size=3", png.getvalue(), {}, 400),
        ("POST", "/api/search/image", b"--x\r\n\r\n", {"Content-Type": "multipart/form-data; "
                                                          "boundary=x"}, 400),
        ("GET", "/thumb/no-such-key", b"", {}, 404),
        ("GET", "/thumb/..%2F..%2Fetc%2Fpasswd", b"", {}, 404),
        ("GET", "/api/search", b"", {}, 405),
        ("PUT", "/api/search", b"{}", json_headers, 405),
        ("DELETE", "/", b"", {}, 405),
        ("BREW", "/", b"", {}, 405),
        ("GET", "/etc/passwd", b"", {}, 404),
    ]
    for method, path, body, headers, want in bad:
        status, got_headers, data = request(server, method, path, body, headers)
        label = f"{method} {path} {str(body)[:40]}"
        assert status == want, (label, status, data[:200])
        assert got_headers["Content-Type"].startswith("application/json"), label
        message = json.loads(data)["error"]
        assert message and "Traceback" not in message, label
    # a decompression bomb: a small PNG of 12000 x 12000 pixels
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")
    status, _, data = request(server, "POST", "/api/search/image", bomb.getvalue())
    assert status == 413 and "pixels" in json.loads(data)["error"]

    status, out = post_json(server, {"text": "a small blue square", "k": 3})
    assert status == 200 and len(out["results"]) == 3


def _chromium_paths() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in CHROMIUM if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_page_in_headless_chromium(server):
    paths = _chromium_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select, WebDriverWait
    except ImportError:
        paths = None
    if paths is None:
        message = ("headless Chromium test needs selenium (pip install -e '.[dev]') and the "
                   "Debian packages chromium and chromium-driver (apt-get install chromium "
                   "chromium-driver; .ci/run installs them)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    browser, driver_path = paths
    options = webdriver.ChromeOptions()
    options.binary_location = browser  # explicit paths: selenium-manager never goes online
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get(server.url)
        box = driver.find_element(By.ID, "query")
        box.send_keys("a red circle to the left of a blue square")
        Select(driver.find_element(By.ID, "k")).select_by_visible_text("10")
        driver.find_element(By.ID, "search").click()
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img")) == 10)
        # every result image has loaded and decoded (naturalWidth is 0 for a broken image)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')]"
            ".every(img => img.complete && img.naturalWidth > 0)"))
        widths = driver.execute_script(
            "return [...document.querySelectorAll('#results img')].map(i => i.naturalWidth)")
        assert widths == [64] * 10
        assert "10 results" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()
