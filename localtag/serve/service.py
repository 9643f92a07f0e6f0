"""The service behind every adapter: served models, admission and ``predict`` (request schema:
:mod:`~localtag.serve.schema`; metrics: :mod:`~localtag.serve.metrics`; API keys: :mod:`~localtag.serve.auth`).

``localtag.serve.server`` (REST, Filestack) and ``localtag.serve.grpc_service`` (gRPC) are thin adapters over one
:class:`Service`. Every image goes fetch (async, guarded: :mod:`localtag.core.fetch`) → decode and preprocess
(a thread pool, off the event loop) → its model's :class:`~localtag.serve.batcher.Batcher` (batches shared
across requests) → the caller's own output config. Admission is bounded by ``max_queue`` images.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..core import clarifai, decode, errors, languages, memory
from ..core.config import Settings
from ..core.encoder import ImageEncoder
from ..core.errors import ImageError
from ..core.fetch import FetchPolicy, fetch
from ..core.loader import Loaded, load
from ..core.pipeline import Pipeline
from ..core.scorer import Picking
from ..core.tag import Tag
from ..core.tagger import SelectError, Tagger
from .auth import parse_authorization
from .batcher import Batcher
from .budgets import ByteBudget, Full, Slots
from .fairpool import FairPool, RequestPixels
from .metrics import Metrics
from .schema import InputIn, PredictRequest

log = logging.getLogger(__name__)

MAX_INPUTS = 128
#: the server decodes JPEGs whose short side is at least twice this at a reduced scale (draft mode)
DRAFT_SIDE = 512
#: after decoding an image this large, freed heap is given back to the system
TRIM_PIXELS = 16_000_000
GENERAL_IDS = (clarifai.GENERAL_MODEL_ID, clarifai.LEGACY_GENERAL_MODEL_ID)
MODEL_TYPE = {
    "id": "visual-classifier",
    "title": "Visual Classifier",
    "description": "Classify images into concepts (localtag: CLIP zero-shot over a vocabulary).",
    "input_fields": ["image"],
    "output_fields": ["concepts"],
    "trainable": False,
    "creatable": False,
    "internal_only": False,
}


class StatusError(Exception):
    """A Clarifai status code with details: a bad request, or one unusable input (not about its pixels)."""

    def __init__(self, code: int, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class Overloaded(Full):
    """The image queue (``max_queue``) is full."""

    def __init__(self, cap: int = 0):
        super().__init__("queued images", cap, False)


@dataclass
class PredictOptions:
    max_concepts: int
    min_value: float
    select: Any
    language: str | None


# -- models ------------------------------------------------------------------------------------------
class ModelEntry:
    """One served (model, vocabulary): its tagger, image encoder, decode pipeline and batcher."""

    def __init__(self, tagger: Tagger, encoder: ImageEncoder, settings: Settings, *, general: bool, on_batch=None):
        self.tagger = tagger
        self.encoder = encoder
        self.general = general
        self.pipeline = Pipeline.from_settings(encoder, settings)
        # the encoder resolves batch_size <= 0 (automatic) to a measured size
        self.batcher = Batcher(tagger, encoder, max_batch=encoder.batch_size,
                               window=settings.batch_window_ms / 1000, on_batch=on_batch)
        digest = hashlib.sha256(f"{tagger.info.sha256}:{tagger.vocab.sha256}".encode()).hexdigest()
        self.version_id = clarifai.GENERAL_MODEL_VERSION if general else digest[:32]
        self.user_id, self.app_id = (clarifai.USER_ID, clarifai.APP_ID) if general else ("localtag", "localtag")
        self.visible = [c for c in tagger.vocab if not c.hidden]

    def model_json(self, model_id: str, **extra: Any) -> dict[str, Any]:
        name = "Image Recognition" if self.general else model_id
        return clarifai.model_json(model_id, self.version_id, name=name, app_id=self.app_id,
                                   user_id=self.user_id, **extra)

    def concept_json(self, c, language: str | None = None) -> dict[str, Any]:
        return {"id": c.id, "name": c.display(language), "value": 1.0, "created_at": clarifai.EPOCH,
                "app_id": self.app_id, "user_id": self.user_id}


# -- the service -------------------------------------------------------------------------------------
class Service:
    """Everything the adapters share: models, auth, admission, metrics."""

    def __init__(self, settings: Settings, entries: dict[str, ModelEntry], keys: list[bytes], metrics: Metrics):
        self.settings = settings
        self.entries = entries
        self.keys = keys
        self.metrics = metrics
        self.policy = FetchPolicy.from_settings(settings)
        # requests take turns at the decode threads, within max_decode_pixels being decoded at once
        self.decoder = FairPool(settings.workers, settings.max_decode_pixels)
        self.load = 0  # images admitted and not yet answered (the queue max_queue bounds)
        # request bodies being read (not queued work), in all and per client address
        self.readers = Slots("request bodies being read", settings.max_body_readers,
                             settings.max_client_body_readers)
        # bytes of bodies still arriving, and of Filestack uploads spooled to temp files, across requests
        self.body_bytes = ByteBudget("bytes of request bodies arriving", settings.max_body_bytes,
                                     settings.max_client_body_bytes)
        self.spool = ByteBudget("bytes of uploads in temp files", settings.max_spool_bytes,
                                settings.max_client_spool_bytes)
        self.ready = False
        self.family: Any = None  # serve.family.Family: Clarifai's other public models (set by the server)
        self.workflows: Any = None  # serve.workflows.Workflows (set by the server)
        self.custom_models: Any = None  # serve.model_service.CustomModels (set by the server)

    @property
    def reading(self) -> int:
        """Request bodies being read now."""
        return self.readers.used

    @property
    def waiting(self) -> int:
        """Decoded images waiting for a model batch."""
        return sum(e.batcher.depth for e in {id(e): e for e in self.entries.values()}.values())

    @property
    def default(self) -> ModelEntry:
        return self.entries[clarifai.GENERAL_MODEL_ID]

    # auth
    def check_auth(self, header: str | None) -> tuple[int, dict] | None:
        """None when the caller may go on, else (HTTP status, Clarifai error body)."""
        if not self.keys:
            return None
        token = parse_authorization(header)
        if token is None:
            return 401, clarifai.error_response(clarifai.CONN_KEY_NOT_FOUND,
                                                "send 'Authorization: Key <api key>'")
        given = token.encode()
        ok = False
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(given, key)
        if not ok:
            return 401, clarifai.error_response(clarifai.CONN_KEY_INVALID, "the API key is not valid")
        return None

    # admission
    def busy(self, extra: int = 0) -> bool:
        """Would ``extra`` more images overflow the queue? (An idle server takes any one request.)

        Only admitted images count: a body still on the wire is not work (:meth:`body_slot`)."""
        return self.load > 0 and self.load + extra > self.settings.max_queue

    @contextlib.contextmanager
    def body_slot(self, client: str = ""):
        """One request body being read; raises :class:`~localtag.serve.budgets.Full` past ``max_body_readers``
        or ``max_client_body_readers``."""
        with self.readers.held(client):
            self.metrics.body_readers.set(self.reading)
            try:
                yield
            finally:
                self.metrics.body_readers.set(self.reading - 1)

    def overloaded_response(self, e: Full | None = None) -> tuple[int, dict]:
        """503 with Clarifai's 21354 (the official clients retry it): the queue, or ``e``'s budget, is full."""
        self.metrics.rejected.inc()
        details = "the request queue is full; retry later" if e is None or isinstance(e, Overloaded) else str(e)
        if e is not None and not isinstance(e, Overloaded):
            log.warning("refused: %s", details)
        return 503, clarifai.error_response(clarifai.MODEL_BUSY, details, description="Model is busy, please retry")

    @contextlib.contextmanager
    def admitted(self, n: int):
        if self.busy(n):
            raise Overloaded
        self.load += n
        self.metrics.queue_depth.set(self.load)
        try:
            yield
        finally:
            self.load -= n
            self.metrics.queue_depth.set(self.load)

    # models
    def entry(self, model_id: str | None) -> ModelEntry | None:
        found = self.entries.get(model_id or "")
        if found is None and self.family is not None:
            found = self.family.entry(model_id)
        return found

    def list_models(self) -> tuple[int, dict]:
        """``ListModels``: Clarifai's family as served here, then the configured extra model ids."""
        listed = self.family.list_models() if self.family is not None else [(clarifai.GENERAL_MODEL_ID, self.default)]
        listed += [(i, e) for i, e in self.entries.items() if i not in GENERAL_IDS]
        return 200, {"status": clarifai.status(clarifai.SUCCESS, req_id=clarifai.new_id()),
                     "models": [e.model_json(i) for i, e in listed]}

    def model_not_found(self, model_id: str | None) -> tuple[int, dict]:
        return 404, clarifai.error_response(clarifai.MODEL_DOES_NOT_EXIST, f"model {model_id!r} is not served here")

    def get_model(self, model_id: str) -> tuple[int, dict]:
        e = self.entry(model_id)
        if e is None:
            return self.model_not_found(model_id)
        info = {"message": f"Show output_info with: GET /v2/models/{model_id}/output_info"}
        model = e.model_json(model_id, output_info=info)
        # GetModel's body; "model_version" also answers GetModelVersion on the …/versions/{id} route forms
        return 200, {"status": clarifai.status(clarifai.SUCCESS, req_id=clarifai.new_id()), "model": model,
                     "model_version": model["model_version"]}

    def get_output_info(self, model_id: str) -> tuple[int, dict]:
        e = self.entry(model_id)
        if e is None:
            return self.model_not_found(model_id)
        info = {
            "data": {"concepts": [e.concept_json(c) for c in e.visible]},
            "output_config": {"max_concepts": self.settings.max_concepts, "min_value": self.settings.min_value},
            "message": f"Show output_info with: GET /v2/models/{model_id}/output_info",
        }
        return 200, {"status": clarifai.status(clarifai.SUCCESS, req_id=clarifai.new_id()),
                     "model": e.model_json(model_id, output_info=info)}

    def list_concepts(self, model_id: str, page: int = 1, per_page: int = 128) -> tuple[int, dict]:
        e = self.entry(model_id)
        if e is None:
            return self.model_not_found(model_id)
        page = page or 1
        per_page = per_page or 128
        if page < 1 or not 1 <= per_page <= 1000:
            return 400, clarifai.error_response(clarifai.CONN_INVALID_REQUEST,
                                                "page must be >= 1 and per_page between 1 and 1000")
        start = (page - 1) * per_page
        concepts = [e.concept_json(c) for c in e.visible[start:start + per_page]]
        return 200, {"status": clarifai.status(clarifai.SUCCESS, req_id=clarifai.new_id()), "concepts": concepts}

    def get_model_type(self, type_id: str) -> tuple[int, dict]:
        if type_id != MODEL_TYPE["id"]:
            return 404, clarifai.error_response(clarifai.CONN_DOES_NOT_EXIST, f"model type {type_id!r} is not served")
        return 200, {"status": clarifai.status(clarifai.SUCCESS, req_id=clarifai.new_id()), "model_type": MODEL_TYPE}

    def list_model_types(self) -> tuple[int, dict]:
        return 200, {"status": clarifai.status(clarifai.SUCCESS, req_id=clarifai.new_id()),
                     "model_types": [MODEL_TYPE]}

    # predict
    def options(self, entry: ModelEntry, req: PredictRequest) -> PredictOptions:
        """Output config from ``model.output_info`` then ``model.model_version.output_info`` (the latter wins)."""
        opts = PredictOptions(self.settings.max_concepts, self.settings.min_value, None, None)
        configs = []
        if req.model is not None:
            if req.model.output_info and req.model.output_info.output_config:
                configs.append(req.model.output_info.output_config)
            mv = req.model.model_version
            if mv and mv.output_info and mv.output_info.output_config:
                configs.append(mv.output_info.output_config)
        select = None
        for c in configs:
            if c.max_concepts:
                opts.max_concepts = c.max_concepts
            if c.min_value:
                opts.min_value = c.min_value
            if c.select_concepts:
                select = [s.id or s.name for s in c.select_concepts if s.id or s.name]
                if not select:
                    raise SelectError("select_concepts entries need an id or a name")
            if c.language:
                try:
                    opts.language = languages.check(c.language)
                except ValueError as e:
                    raise SelectError(str(e)) from None
        opts.select = entry.tagger.select_indices(select) if select else None
        return opts

    async def predict(self, req: PredictRequest, model_id: str | None) -> tuple[int, dict]:
        """A ``PostModelOutputs`` call → (HTTP status, Clarifai response body)."""
        req_id = clarifai.new_id()
        model_id = model_id or req.model_id or (req.model.id if req.model else None)
        entry = self.entry(model_id)
        if entry is None:
            return self.model_not_found(model_id)
        if model_id not in self.entries:  # a family model: serve.family answers it
            return await self.family.predict(self, req, model_id, entry)
        n = len(req.inputs)
        if n == 0:
            return 400, clarifai.error_response(clarifai.CONN_INVALID_REQUEST, "the request has no inputs",
                                                req_id=req_id)
        if n > MAX_INPUTS:
            return 400, clarifai.error_response(
                clarifai.CONN_INVALID_REQUEST, f"{n} inputs is over the limit of {MAX_INPUTS} per request",
                req_id=req_id)
        try:
            opts = self.options(entry, req)
        except SelectError as e:
            return 400, clarifai.error_response(clarifai.MODEL_INVALID_ARGUMENT, str(e), req_id=req_id)
        budget = RequestPixels(self.settings.max_request_pixels)
        try:
            with self.admitted(n):
                outputs = await asyncio.gather(*(self._one(entry, model_id, inp, opts, budget)
                                                 for inp in req.inputs))
        except Overloaded:
            return self.overloaded_response()
        body = clarifai.response(list(outputs), req_id)
        return (400 if body["status"]["code"] == clarifai.FAILURE else 200), body

    async def _one(self, entry: ModelEntry, model_id: str, inp: InputIn, opts: PredictOptions,
                   budget: RequestPixels) -> dict:
        input_id = inp.id or clarifai.new_id()
        image = inp.data.image if inp.data else None
        url = image.url if image else None
        b64 = image.base64 if image else None
        echo = {"image": {"url": url}} if url and not b64 else {"image": {"base64": "dHJ1ZQ=="}}
        model = entry.model_json(model_id)
        try:
            values = await self.image_values(entry, url=url, b64=b64, budget=budget)
        except (ImageError, StatusError) as e:  # this input's own fault: its status says why
            self.metrics.images.labels("error").inc()
            status = (clarifai.image_error_status(e) if isinstance(e, ImageError)
                      else clarifai.status(e.code, details=e.details))
            return clarifai.output_json(input_id, echo if image else {}, model, error=status)
        except Exception as e:  # noqa: BLE001 - a bug fails this input alone, told as one (traceback, counted)
            self.metrics.images.labels("internal_error").inc()
            log.error("input %s failed: internal error", input_id, exc_info=e)
            status = clarifai.status(clarifai.INTERNAL_SERVER_ISSUE, details=type(e).__name__)
            return clarifai.output_json(input_id, echo if image else {}, model, error=status)
        self.metrics.images.labels("ok").inc()
        tags = entry.tagger.scorer.pick(values, Picking(opts.max_concepts, opts.min_value, opts.select, opts.language))
        return clarifai.output_json(input_id, echo, model, tags)

    async def image_tags(self, entry: ModelEntry, picking: Picking, *, url: str | None = None,
                         data: bytes | None = None) -> list[Tag]:
        """One image's tags by the entry's model (Filestack, the Directus flow): :meth:`image_values`
        then the scorer's picking."""
        return entry.tagger.scorer.pick(await self.image_values(entry, url=url, data=data), picking)

    async def image_values(self, entry: ModelEntry, *, url: str | None = None, b64: str | bytes | None = None,
                           data: bytes | None = None, budget: RequestPixels | None = None):
        """One image (a URL, base64 or bytes): fetched, decoded and embedded with the others of its batch →
        its per-concept values; raises ImageError / StatusError.

        Decoding takes turns with other requests (``budget`` names the request and holds its pixel
        allowance), within the server's pixel budget."""
        budget = budget or RequestPixels(self.settings.max_request_pixels)
        data, cost = await self.admit(entry, budget, url=url, b64=b64, data=data)
        prepared = await self.decoder.run(budget, self._prepare, entry, data, cost=cost)
        if cost >= TRIM_PIXELS:
            await self.decoder.run(budget, memory.trim)
        if prepared.error is not None:
            raise prepared.error
        return await entry.batcher.submit(prepared.tensor)

    async def admit(self, entry: ModelEntry, budget: RequestPixels, *, url: str | None, b64: str | bytes | None,
                    data: bytes | None) -> tuple[bytes, int]:
        """One image's bytes (fetched, or from base64) and its pixel cost, taken from the request's budget:
        what is decoded plus what the resize to the model's short side makes of it. Raises ImageError /
        StatusError."""
        if data is None and not b64:
            if not url:
                raise StatusError(clarifai.INPUT_INVALID_ARGUMENT, "the input needs data.image.url or data.image.base64")
            data = await fetch(url, self.policy)
        data, (w, h) = await self.decoder.run(budget, self._peek, entry, data if data is not None else b64)
        side = entry.encoder.image_size
        cost = w * h + side * side * max(w, h) // max(1, min(w, h))
        if not budget.take(cost):
            raise ImageError(errors.TOO_MANY_PIXELS,
                             f"{w}x{h} is over this request's budget of {budget.total / 1e6:.0f} MP decoded")
        return data, cost

    def _draft(self, entry: ModelEntry) -> int:
        return entry.pipeline.draft or DRAFT_SIDE

    def _peek(self, entry: ModelEntry, source: str | bytes) -> tuple[bytes, tuple[int, int]]:
        """On a decode thread: base64 → bytes, and the size they will decode to (the header alone)."""
        data = source if isinstance(source, bytes) else decode_base64(source, self.settings.max_bytes)
        return data, decode.peek_size(data, max_pixels=self.settings.max_pixels, max_bytes=self.settings.max_bytes,
                                      draft=self._draft(entry))

    def _prepare(self, entry: ModelEntry, data: bytes):
        """On a decode thread: bytes → the model's tensor (or the error in ``Prepared``)."""
        return entry.pipeline.prepare_tensor(data, draft=self._draft(entry))


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Standard or URL-safe base64, with or without padding, optionally a ``data:`` URI."""
    if text.startswith("data:") and "," in text[:200]:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    if len(text) * 3 // 4 > max_bytes:
        raise ImageError(errors.TOO_MANY_BYTES, f"about {len(text) * 3 // 4} bytes is over the {max_bytes}-byte limit")
    text += "=" * (-len(text) % 4)
    urlsafe = "-" in text or "_" in text
    if urlsafe and ("+" in text or "/" in text):  # two alphabets at once: not base64 of anything
        raise StatusError(clarifai.INPUT_INVALID_ARGUMENT,
                          "data.image.base64 is not valid base64 (it mixes the standard and URL-safe alphabets)")
    alphabet = b"-_" if urlsafe else None
    try:
        return base64.b64decode(text, altchars=alphabet, validate=True)
    except (binascii.Error, ValueError):
        raise StatusError(clarifai.INPUT_INVALID_ARGUMENT, "data.image.base64 is not valid base64") from None


def build_entries(settings: Settings, loaded: Loaded | None, on_batch) -> dict[str, ModelEntry]:
    """Load the default model (unless given) and every configured extra model id, once each."""
    default_loaded = loaded or load(settings, head="add")  # a learnt head joins the general model's vocabulary
    default = ModelEntry(*default_loaded, settings, general=True, on_batch=on_batch)
    entries = {i: default for i in GENERAL_IDS}
    by_key: dict[tuple[str, str | None], ModelEntry] = {}
    for model_id, (model, vocab) in settings.model_ids.items():
        key = (model, str(vocab) if vocab else None)
        if key not in by_key:
            same = model == settings.model and (vocab or None) == settings.vocab
            sub = settings.model_copy(update={"model": model, "vocab": vocab, "model_head": None})  # the head: default only
            by_key[key] = ModelEntry(*(default_loaded if same else load(sub)), settings, general=False,
                                     on_batch=on_batch)
        entries[model_id] = by_key[key]
    return entries


def parse_predict(raw: bytes) -> PredictRequest:
    doc = parse_json(raw)
    try:
        return PredictRequest.model_validate(doc)
    except RecursionError:
        raise StatusError(clarifai.CONN_BAD_REQUEST_FORMAT, "malformed JSON: nested too deeply") from None
    except ValidationError as e:
        raise StatusError(clarifai.CONN_INVALID_REQUEST, describe_errors(e.errors())) from None


def parse_json(raw: bytes) -> Any:
    """A request body's JSON; :class:`StatusError` (11100) for malformed or too deeply nested JSON."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise StatusError(clarifai.CONN_BAD_REQUEST_FORMAT, f"malformed JSON: {e}") from None
    except RecursionError:
        raise StatusError(clarifai.CONN_BAD_REQUEST_FORMAT, "malformed JSON: nested too deeply") from None


def describe_errors(errors: Iterable[dict]) -> str:
    parts = []
    for e in list(errors)[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"
