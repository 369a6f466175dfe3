"""The demo of a fine-tuned VQA or captioning model (`vlp serve --model DIR`): upload an image,
ask a question or get its caption, from a web page or a JSON API.

    GET  /               the demo page (static/demo.html)
    GET  /api/info       {"task", "model", "visual_tokens", "settings", "limits", "batching"}
    POST /api/caption    the image as the raw body or the multipart field "image"
                         -> {"caption"}
    POST /api/vqa        multipart fields "image" + "question" (+ optional "top_k"), or the
                         raw image body with ?question=...&top_k=...
                         -> {"answer", "top": [[answer, probability], ...]}  (top_k, default 5;
                         the probability is the model's head's: a classifier's sigmoid score
                         (vqa.head=classify), the likelihood normalised over the answer list
                         (rank), or the decoded answer's sequence probability, one entry
                         (generate); /api/info's settings name the head)

The same `Service` and `Server` as the search (vlp/retrieval/serve.py): the same body, image and
text limits, JSON errors, micro-batching and loopback default. The model runs in the batcher's
one worker thread: the captions of concurrent uploads are decoded as one batch
(`CaptionModel.captions`); VQA questions run one by one inside a batch (`VQAModel.answer`).
The decoded upload keeps its share of the pixel budget until its batch has run, so images
waiting for the model stay within that budget.

An endpoint of the other task (/api/vqa on a captioning model) is a 400 naming the one to use.
Region backbones (visual tokens `regions` / `roi_align`) read precomputed region files that an
uploaded image does not have: such a model is refused at start.
"""
from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Sequence

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from vlp import modeldir
from vlp.api import load_finetuned
from vlp.retrieval.serve import (MAX_ASPECT, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS,
                                 MAX_QUERY_CHARS, ApiError, Server, Service, api_endpoint, bind,
                                 check_k, check_text, json_response, query_params)
from vlp.tasks.caption import CaptionModel
from vlp.tasks.vqa import VQAModel

TASKS = ("vqa", "caption")
DEFAULT_TOP_K = 5
MAX_TOP_K = 100
ENDPOINTS = {"vqa": "POST /api/vqa (multipart fields image + question, or the raw image body "
                    "with ?question=...)",
             "caption": "POST /api/caption (the image as the body or the multipart field "
                        "image)"}


@dataclass
class Job:
    """One request for the model: its decoded image, and for VQA the question and top_k."""

    image: Image.Image
    question: str | None = None
    top_k: int = DEFAULT_TOP_K


def check_servable(model, source: str) -> str:
    """The model's task ("vqa" or "caption"); a ModelDirError naming `source` when it cannot
    answer uploaded images."""
    if isinstance(model, VQAModel):
        task = "vqa"
    elif isinstance(model, CaptionModel):
        task = "caption"
    else:
        raise modeldir.ModelDirError(f"{source}: a {type(model).__name__}; the demo serves "
                                     f"fine-tuned VQA and captioning models")
    needs = model.reader.needs
    if needs.region_boxes or needs.region_features:
        raise modeldir.ModelDirError(
            f"{source}: this {task} model's visual tokens are {needs.kind!r}, read from "
            "precomputed region files ({image}.npz) that an uploaded image does not have, so "
            "it cannot be served; a model fine-tuned from a backbone with patch tokens (a dual "
            "tower, combined, or single-stream model.visual_tokens=patches) can")
    return task


def load_servable(model_dir: str | Path, device: str | None = None):
    """(the loaded VQAModel or CaptionModel, its task) of a fine-tuned model directory, or a
    one-line ModelDirError / FileNotFoundError saying why it cannot be served."""
    folder = modeldir.read(model_dir)
    where = folder.path / modeldir.CONFIG
    if folder.architecture != "finetuned":
        hint = (" (a dual tower searches an index: vlp index build, then vlp serve --index)"
                if folder.architecture in ("dual_tower", "combined") else "")
        raise modeldir.ModelDirError(
            f"{where}: a {folder.architecture!r} model directory; `vlp serve --model` serves "
            f"fine-tuned VQA and captioning models (vlp finetune vqa|caption writes "
            f"OUT/model){hint}")
    task = folder.config.get("task")
    if task not in TASKS:
        raise modeldir.ModelDirError(f"{where}: a fine-tuned {task!r} model; `vlp serve "
                                     f"--model` serves the tasks {list(TASKS)}")
    model = load_finetuned(folder, device)
    return model, check_servable(model, str(folder.path))


class ModelService(Service):
    """The demo API and page over a fine-tuned VQAModel or CaptionModel."""

    def __init__(self, model, name: str = "", **options):
        """`model`: a VQAModel or CaptionModel (region backbones are refused); `name`: what
        /api/info calls it (its directory). options: Service's."""
        self.model, self.name = model, name
        self.task = check_servable(model, name or "the model")
        if self.task == "vqa":
            run = self._answer_batch
        else:
            run = self._caption_batch
        api = f"GET /, /api/info; {ENDPOINTS[self.task]}"
        super().__init__([
            Route("/api/info", self.info, methods=["GET"]),
            Route("/api/vqa", self.vqa, methods=["POST"]),
            Route("/api/caption", self.caption, methods=["POST"]),
        ], run, api=api, page="demo.html", **options)

    # ------------------------------------------------------------------ the model's thread
    def _answer_batch(self, jobs: list[Job]) -> list[list[tuple[str, float]]]:
        # top_k >= 2: answer() then gives (answer, probability) pairs, the first its argmax
        return [self.model.answer(j.image, j.question, top_k=max(2, j.top_k)) for j in jobs]

    def _caption_batch(self, jobs: list[Job]) -> list[str]:
        return self.model.captions([j.image for j in jobs])

    # ------------------------------------------------------------------ endpoints
    def _settings(self) -> dict:
        m = self.model
        if self.task == "vqa":
            return {"head": m.head, "answers": len(m.answers),
                    "max_question_length": m.max_length,
                    "default_top_k": DEFAULT_TOP_K, "max_top_k": MAX_TOP_K}
        return {"beam_size": m.beam_size, "max_length": m.max_length,
                "length_penalty": m.length_penalty}

    @api_endpoint
    async def info(self, request: Request) -> Response:
        return json_response(HTTPStatus.OK, {
            "task": self.task, "model": self.name, "visual_tokens": self.model.reader.needs.kind,
            "endpoint": ENDPOINTS[self.task], "settings": self._settings(),
            "limits": {"max_image_bytes": MAX_IMAGE_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS,
                       "max_aspect": MAX_ASPECT, "max_question_chars": MAX_QUERY_CHARS},
            "batching": dict(self.batcher.stats)})

    def _require(self, task: str) -> None:
        """A request for the other task: 400 naming what this model answers."""
        if task != self.task:
            kinds = {"vqa": "VQA", "caption": "captioning"}
            raise ApiError(HTTPStatus.BAD_REQUEST, f"this server runs a {kinds[self.task]} "
                           f"model, not a {kinds[task]} one: use {ENDPOINTS[self.task]}")

    @api_endpoint
    async def caption(self, request: Request) -> Response:
        self._require("caption")
        query_params(request, ())
        async with self.image_upload(request) as (image, _):
            caption = await self.batcher.submit(Job(image))
        return json_response(HTTPStatus.OK, {"caption": caption})

    @api_endpoint
    async def vqa(self, request: Request) -> Response:
        self._require("vqa")
        query = query_params(request, ("question", "top_k"), keep_blank=True)
        top_k = check_k(query.get("top_k", [str(DEFAULT_TOP_K)])[-1], MAX_TOP_K, "top_k")
        question = None
        if "question" in query:  # checked before the body is read
            question = check_text(query["question"][-1], "question")
        elif not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "no question: send the image as the body "
                           "with ?question=..., or multipart/form-data with the fields 'image' "
                           "and 'question'")
        async with self.image_upload(request, ("question", "top_k")) as (image, fields):
            if "question" in fields:
                question = check_text(_field_text(fields["question"], "question"), "question")
            elif question is None:
                raise ApiError(HTTPStatus.BAD_REQUEST, "the multipart body has no 'question' "
                               "field (or send ?question=...)")
            if "top_k" in fields:
                top_k = check_k(_field_text(fields["top_k"], "top_k"), MAX_TOP_K, "top_k")
            top = await self.batcher.submit(Job(image, question, top_k))
        return json_response(HTTPStatus.OK, {
            "answer": top[0][0], "top": [[a, round(p, 6)] for a, p in top[:top_k]]})


def _field_text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the multipart field '{name}' is not UTF-8 "
                       f"({e.reason} at byte {e.start})") from None


def create_model_app(model, **options) -> Starlette:
    """The demo as an ASGI app, for any ASGI server (options: ModelService's)."""
    return ModelService(model, **options).app


def make_model_server(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *,
                      device: str | None = None, **options) -> Server:
    """The demo of the fine-tuned model in `model_dir` on (host, port) (port 0: any free one;
    see `.url`): the address is bound before the model loads, so a port in use fails at once
    (BindError). A model that cannot be served: ModelDirError (one line)."""
    sock = bind(host, port)
    try:
        model, _ = load_servable(model_dir, device)
        service = ModelService(model, str(model_dir), **options)
    except BaseException:
        sock.close()
        raise
    return Server(service, sock)


__all__: Sequence[str] = ("ModelService", "create_model_app", "load_servable",
                          "make_model_server", "DEFAULT_TOP_K", "MAX_TOP_K")
