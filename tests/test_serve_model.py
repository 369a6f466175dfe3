"""`vlp serve --model DIR`: the demo of a fine-tuned VQA or captioning model. Tiny models
fine-tuned for two steps on the shapes world are served on port 0; the API's answers and
captions equal the models' own (`VQAModel.answer`, `CaptionModel.caption`) on the same images,
bad input gets a 4xx JSON error, a region backbone is refused at start, and the page is driven
in headless Chromium (selenium) as the search page is."""
import concurrent.futures
import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
import uuid
from urllib.parse import quote

import pytest
from PIL import Image

import vlp
from vlp.cli import main
from vlp.retrieval.model_service import DEFAULT_TOP_K, MAX_TOP_K, make_model_server

FT = ["train.steps=2", "train.batch_size=8", "train.save_every=0", "train.log_every=1",
      "train.threads=1", "data.num_workers=0", "eval.at_end=false"]
QUESTIONS = ["what color is the circle?", "how many shapes are there?",
             "is there a red square?", "what shape is on the left?"]
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def finetune(task: str, init_from, world, out, *extra: str):
    assert main(["finetune", task, "--out", str(out), "--no-progress", f"init_from={init_from}",
                 f"data.synth_dir={world}", *FT, *extra]) == 0
    return out / "model"


@pytest.fixture(scope="module")
def vqa_dir(ft_world, pretrained, tmp_path_factory):
    return finetune("vqa", pretrained("patches"), ft_world, tmp_path_factory.mktemp("demo_vqa"))


@pytest.fixture(scope="module")
def caption_dir(ft_world, pretrained, tmp_path_factory):
    return finetune("caption", pretrained("patches"), ft_world,
                    tmp_path_factory.mktemp("demo_caption"), "caption.max_length=10",
                    "caption.beam_size=2")


def _serve(model_dir):
    server = make_model_server(model_dir, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def vqa_server(vqa_dir):
    server = _serve(vqa_dir)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def caption_server(caption_dir):
    server = _serve(caption_dir)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def images(ft_world):
    """Four benchmark images (files)."""
    return sorted((ft_world / "benchmarks" / "images").glob("*.jpg"))[:4]


def request(server, method: str, path: str, body: bytes | str = b"",
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def call(server, method: str, path: str, body: bytes | str = b"",
         headers: dict | None = None) -> tuple[int, dict]:
    status, got, data = request(server, method, path, body, headers)
    assert got["Content-Type"].startswith("application/json"), (path, status, data[:200])
    return status, json.loads(data)


def form(fields: dict[str, bytes | str], image: bytes | None = None) -> tuple[bytes, dict]:
    """A multipart/form-data body (as a browser's FormData sends it) and its headers."""
    boundary = uuid.uuid4().hex
    body = b""
    if image is not None:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                 f"filename=\"q.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + image + \
            b"\r\n"
    for name, value in fields.items():
        value = value.encode() if isinstance(value, str) else value
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                 ).encode() + value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def assert_same_top(got: list, want: list[tuple[str, float]]) -> None:
    assert [a for a, _ in got] == [a for a, _ in want]
    assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=2e-6)


# ------------------------------------------------------------------------------ the API
def test_vqa_api_answers_as_the_model(vqa_server, vqa_dir, images):
    model = vlp.load(vqa_dir)
    status, info = call(vqa_server, "GET", "/api/info")
    assert status == 200 and info["task"] == "vqa" and info["visual_tokens"] == "patches"
    assert info["settings"]["answers"] == len(model.answers)
    assert info["settings"]["head"] == "classify"
    assert info["settings"]["max_top_k"] == MAX_TOP_K

    jpeg = images[0].read_bytes()
    question = QUESTIONS[0]
    want_answer = model.answer(images[0], question)
    want_top = model.answer(images[0], question, top_k=DEFAULT_TOP_K)
    # multipart (what the page sends), and the raw body with ?question=
    body, headers = form({"question": question}, jpeg)
    status, out = call(vqa_server, "POST", "/api/vqa", body, headers)
    assert status == 200 and set(out) == {"answer", "top"}
    assert out["answer"] == want_answer
    assert_same_top(out["top"], want_top)
    status, raw = call(vqa_server, "POST", f"/api/vqa?question={quote(question)}", jpeg,
                       {"Content-Type": "image/jpeg"})
    assert status == 200 and raw == out
    # top_k as a field and as a parameter; a PNG made here (not a file)
    png = io.BytesIO()
    Image.open(images[1]).convert("RGB").rotate(90).save(png, "PNG")
    body, headers = form({"question": QUESTIONS[1], "top_k": "3"}, png.getvalue())
    status, out = call(vqa_server, "POST", "/api/vqa", body, headers)
    want = model.answer(Image.open(io.BytesIO(png.getvalue())), QUESTIONS[1], top_k=3)
    assert status == 200 and len(out["top"]) == 3
    assert_same_top(out["top"], want)
    status, out = call(vqa_server, "POST", f"/api/vqa?question={quote(QUESTIONS[1])}&top_k=1",
                       png.getvalue())
    assert status == 200 and out["top"] == [[want[0][0], pytest.approx(want[0][1], abs=2e-6)]]

    # concurrent requests (batched together) each get their own image's and question's answer
    jobs = [(images[i % 4], QUESTIONS[(i // 4) % 4]) for i in range(16)]

    def ask(job):
        path, q = job
        body, headers = form({"question": q}, path.read_bytes())
        return call(vqa_server, "POST", "/api/vqa", body, headers)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for i, ((path, q), (status, out)) in enumerate(zip(jobs, answers)):
        assert status == 200, out
        assert_same_top(out["top"], model.answer(path, q, top_k=DEFAULT_TOP_K))
        # the comparison tells images and questions apart (the two-step model's
        # probabilities differ by ~1e-4 between inputs): another image's or question's
        # reference is outside its tolerance
        for other in (images[(i + 1) % 4], q), (path, QUESTIONS[(i // 4 + 1) % 4]):
            with pytest.raises(AssertionError):
                assert_same_top(out["top"], model.answer(*other, top_k=DEFAULT_TOP_K))
    status, info = call(vqa_server, "GET", "/api/info")
    assert info["batching"]["queries"] >= 20


def test_caption_api_captions_as_the_model(caption_server, caption_dir, images):
    model = vlp.load(caption_dir)
    status, info = call(caption_server, "GET", "/api/info")
    assert status == 200 and info["task"] == "caption"
    assert info["settings"] == {"beam_size": 2, "max_length": 10, "length_penalty": 1.0}

    want = [model.caption(p) for p in images]
    assert all(want)
    jpeg = images[0].read_bytes()
    status, out = call(caption_server, "POST", "/api/caption", jpeg,
                       {"Content-Type": "image/jpeg"})
    assert status == 200 and out == {"caption": want[0]}
    body, headers = form({}, images[1].read_bytes())
    status, out = call(caption_server, "POST", "/api/caption", body, headers)
    assert status == 200 and out == {"caption": want[1]}

    # a burst of uploads: decoded in shared batches, each its own image's caption
    jobs = [images[i % 4] for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda p: call(caption_server, "POST", "/api/caption",
                                           p.read_bytes()), jobs))
    assert [out for _, out in got] == [{"caption": want[i % 4]} for i in range(12)]
    status, info = call(caption_server, "GET", "/api/info")
    assert info["batching"]["queries"] == 14


def test_bad_requests_get_4xx_json_naming_what_is_valid(vqa_server, caption_server, images):
    jpeg = images[0].read_bytes()
    q = quote(QUESTIONS[0])
    raw = {"Content-Type": "image/jpeg"}

    def multipart(fields, image=jpeg):
        return form(fields, image)

    bad = [  # (server, method, path, body, headers, status, words in the error)
        (vqa_server, "POST", f"/api/vqa?question={q}", b"GIF89a but not really", raw, 415,
         "not a decodable image"),
        (vqa_server, "POST", "/api/vqa", *multipart({"question": "q"}, b"\xff\xd8 broken"),
         415, "not a decodable image"),
        (vqa_server, "POST", f"/api/vqa?question={q}", jpeg[:len(jpeg) // 3], raw, 415,
         "not a decodable image"),
        (vqa_server, "POST", f"/api/vqa?question={q}", b"", raw, 400, "empty upload"),
        (vqa_server, "POST", "/api/vqa?question=", jpeg, raw, 400, "non-empty"),
        (vqa_server, "POST", "/api/vqa?question=%20%20", jpeg, raw, 400, "non-empty"),
        (vqa_server, "POST", "/api/vqa", *multipart({"question": "  "}), 400, "non-empty"),
        (vqa_server, "POST", "/api/vqa", *multipart({"question": "why " * 300}), 400,
         "at most 1000"),
        (vqa_server, "POST", "/api/vqa", *multipart({"question": b"what \xff\xfe?"}), 400,
         "not UTF-8"),
        (vqa_server, "POST", "/api/vqa?question=%FF%FE", jpeg, raw, 400, "not valid UTF-8"),
        (vqa_server, "POST", "/api/vqa", jpeg, raw, 400, "no question"),
        (vqa_server, "POST", "/api/vqa", *multipart({}), 400, "no 'question'"),
        (vqa_server, "POST", f"/api/vqa?question={q}&top_k=0", jpeg, raw, 400, "top_k=0"),
        (vqa_server, "POST", f"/api/vqa?question={q}&top_k={MAX_TOP_K + 1}", jpeg, raw, 400,
         f"1 to {MAX_TOP_K}"),
        (vqa_server, "POST", "/api/vqa", *multipart({"question": "q", "top_k": "many"}), 400,
         "top_k"),
        (vqa_server, "POST", f"/api/vqa?question={q}&colour=red", jpeg, raw, 400,
         "valid: question, top_k"),
        (vqa_server, "POST", f"/api/vqa?question={q}", b"\0" * (9 * 2 ** 20), raw, 413,
         "at most"),
        # the other task's endpoint: 400 naming this model's
        (vqa_server, "POST", "/api/caption", jpeg, raw, 400, "POST /api/vqa"),
        (caption_server, "POST", f"/api/vqa?question={q}", jpeg, raw, 400, "POST /api/caption"),
        (caption_server, "POST", "/api/caption", b"not an image", raw, 415, "decodable"),
        (caption_server, "POST", "/api/caption?k=3", jpeg, raw, 400, "valid: none"),
        # routing: the API named
        (vqa_server, "GET", "/api/vqa", b"", {}, 405, "POST /api/vqa"),
        (caption_server, "GET", "/api/search", b"", {}, 404, "POST /api/caption"),
        (caption_server, "DELETE", "/", b"", {}, 405, "POST /api/caption"),
    ]
    for server, method, path, body, headers, want, words in bad:
        status, out = call(server, method, path, body, headers)
        label = f"{method} {path} {str(body)[:60]}"
        assert status == want, (label, status, out)
        assert words in out["error"] and "Traceback" not in out["error"], (label, out)
    # a decompression bomb and a 60000x1 image: refused from the header
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")
    status, out = call(caption_server, "POST", "/api/caption", bomb.getvalue())
    assert status == 413 and "pixels" in out["error"]
    wide = io.BytesIO()
    Image.new("L", (4000, 10)).save(wide, "PNG")
    status, out = call(vqa_server, "POST", f"/api/vqa?question={q}", wide.getvalue())
    assert status == 400 and "aspect ratio" in out["error"]
    # both go on answering
    assert call(vqa_server, "POST", f"/api/vqa?question={q}", jpeg)[0] == 200
    assert call(caption_server, "POST", "/api/caption", jpeg)[0] == 200


# ------------------------------------------------------------------------------ refusals
def test_unservable_models_are_one_line(ft_world, pretrained, tmp_path, capsys):
    regions = finetune("vqa", pretrained("regions"), ft_world, tmp_path / "vqa_regions",
                       "train.steps=1")
    single_stream = pretrained("patches")
    capsys.readouterr()  # the runs' own output
    for model_dir, words in ((regions, "visual tokens are 'regions'"),
                             (single_stream, "'single_stream' model directory")):
        assert main(["serve", "--model", str(model_dir), "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("vlp serve: error: ") and words in err, err
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "--index" in err and "--model" in err and err.count("\n") == 1


def test_port_in_use_fails_before_the_model_loads(tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        t = time.perf_counter()
        # not even a model directory: the port is checked first
        assert main(["serve", "--model", str(tmp_path / "none"), "--port", str(port)]) == 2
        assert time.perf_counter() - t < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"port {port}" in err and "already in use" in err


# ------------------------------------------------------------------------------ the page
def _chromium_driver():
    browser = next((shutil.which(n) for n in CHROMIUM if shutil.which(n)), None)
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        browser = None
    if not (browser and driver_path):
        message = ("headless Chromium test needs selenium (pip install -e '.[dev]') and the "
                   "Debian packages chromium and chromium-driver (apt-get install chromium "
                   "chromium-driver; .ci/run installs them)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = browser  # explicit paths: selenium-manager never goes online
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def test_demo_page_in_headless_chromium(vqa_server, caption_server, images):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = images[2]
    question = QUESTIONS[2]
    _, api_vqa = call(vqa_server, "POST", f"/api/vqa?question={quote(question)}",
                      image.read_bytes())
    _, api_caption = call(caption_server, "POST", "/api/caption", image.read_bytes())
    driver = _chromium_driver()
    try:
        wait = WebDriverWait(driver, 60)
        # VQA: choose the file, type the question, ask
        driver.get(vqa_server.url)
        wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
        assert driver.find_element(By.ID, "ask").text == "Ask"
        driver.find_element(By.ID, "image-file").send_keys(str(image))
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('preview');"
            "return i.complete && i.naturalWidth > 0"))  # the preview shows the chosen file
        driver.find_element(By.ID, "question").send_keys(question)
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "answer").text)
        assert driver.find_element(By.ID, "answer").text == api_vqa["answer"]
        rows = driver.find_elements(By.CSS_SELECTOR, "#top li")
        assert len(rows) == DEFAULT_TOP_K and rows[0].text.startswith(api_vqa["answer"])
        assert "answered in" in driver.find_element(By.ID, "status").text
        # an empty question is stopped on the page, nothing is sent
        driver.find_element(By.ID, "question").clear()
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: "type a question" in d.find_element(By.ID, "status").text)

        # captioning: no question box, one click
        driver.get(caption_server.url)
        wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
        assert driver.find_element(By.ID, "ask").text == "Caption"
        assert not driver.find_element(By.ID, "question").is_displayed()
        driver.find_element(By.ID, "image-file").send_keys(str(image))
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "answer").text)
        assert driver.find_element(By.ID, "answer").text == api_caption["caption"]
    finally:
        driver.quit()
