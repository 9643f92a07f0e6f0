"""The Directus flow endpoint: ``POST /directus/flow``, for the flow ``localtag directus install-flow`` makes.

POST /directus/flow takes what the flow made by `install_flow` sends for each upload,
{"trigger": <$trigger>} (a bare $trigger works too), checks the shared secret, answers 202 at once
(the flow's HTTP call has no timeout) and tags the file in the background: download /assets/{key}
with the configured static token, tag with the server's own model (its batcher, shared with the REST
and gRPC routes), write with plan_tags (a person's tags stay). Transient Directus failures are retried
with backoff; a bad image or a refused token is logged once and dropped (`sync` catches up later).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..core.config import Settings
from ..core.errors import ImageError
from ..core.limits import TooLarge, read_capped_async
from ..core.tag import Tag
from ..core.tagger import Tagger
from ..serve.service import Service
from .client import (
    FLOW_PATH,
    SECRET_HEADER,
    DirectusClient,
    DirectusError,
    DirectusNotFoundError,
    ensure_provenance_field,
    is_transient,
    retag_file,
)
from .tag_merge import TagsFieldError, provenance_stamp

log = logging.getLogger(__name__)

FLOW_CONCURRENCY = 4
FLOW_ATTEMPTS = 6  # on top of the client's own retries: about two minutes of Directus downtime
MAX_FLOW_BODY = 1_000_000

router = APIRouter(tags=["directus"])


class FlowWorker:
    """The background side of the flow endpoint, one per app (``app.state.directus_flow``)."""

    def __init__(self, service: Service, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        self.client = DirectusClient(settings.directus_url, settings.directus_token.get_secret_value())
        self.semaphore = asyncio.Semaphore(FLOW_CONCURRENCY)
        self.tasks: set[asyncio.Task] = set()
        self.field_ready = False
        self.backoff = 1.0
        self.done = 0
        self.failed = 0

    def submit(self, key: str, mime: str | None) -> None:
        task = asyncio.get_running_loop().create_task(self._run(key, mime))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, key: str, mime: str | None) -> None:
        async with self.semaphore:
            for attempt in range(FLOW_ATTEMPTS):
                try:
                    await self._tag(key, mime)
                    self.done += 1
                    return
                except ImageError as e:
                    log.warning("directus file %s not tagged: %s: %s", key, e.kind, e.message)
                except DirectusNotFoundError:
                    log.warning("directus file %s was deleted before it was tagged", key)
                except TagsFieldError as e:
                    log.warning("directus file %s not tagged: %s", key, e)
                except DirectusError as e:
                    if is_transient(e) and attempt + 1 < FLOW_ATTEMPTS:
                        delay = random.uniform(0.5, 1.0) * self.backoff * 2**attempt
                        log.warning("directus file %s: %s; retrying in %.1f s", key, e, delay)
                        await asyncio.sleep(delay)
                        continue
                    log.error("directus file %s not tagged: %s", key, e)
                self.failed += 1
                return

    async def _tag(self, key: str, mime: str | None) -> None:
        if not self.field_ready:
            self.field_ready = await asyncio.to_thread(ensure_provenance_field, self.client)
        if mime is None:  # a trigger without payload.type: ask Directus
            row = await asyncio.to_thread(self.client.files_by_id, [key], ["type"])
            if key not in row:
                raise DirectusNotFoundError(f"file {key} does not exist", code="NOT_FOUND")
            mime = row[key].get("type") or ""
            if not mime.startswith("image/"):
                log.info("directus file %s skipped: not an image (%s)", key, mime or "no type")
                return
        data = await asyncio.to_thread(self.client.download, key, max_bytes=self.settings.max_bytes)
        tagger, tags = await self._predict(data)
        stamp = provenance_stamp(tagger, "flow")
        plan = await asyncio.to_thread(retag_file, self.client, key, tags, stamp)
        log.info("directus file %s tagged: %s", key, ", ".join(plan.provenance["tags"]) or "(no tags)")

    async def _predict(self, data: bytes) -> tuple[Tagger, list[Tag]]:
        """The server's default model, through its shared batcher (the REST and gRPC routes' own)."""
        s = self.settings
        entry = self.service.default
        values = await self.service.image_values(entry, data=data)
        return entry.tagger, entry.tagger.pick(values, max_concepts=s.directus_max_concepts,
                                               min_value=s.directus_min_value)


def _flow_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _secret_matches(given: str, expected: str) -> bool:
    """Constant time in the secret's content and length (both are hashed first)."""
    a = hashlib.sha256(given.encode()).digest()
    b = hashlib.sha256(expected.encode()).digest()
    return hmac.compare_digest(a, b)


@router.post(FLOW_PATH, status_code=202)
async def directus_flow(request: Request) -> JSONResponse:
    """Queue the uploaded file of a Directus `files.upload` event for tagging (202), or say why not."""
    settings = request.app.state.settings
    if not (settings.flow_secret and settings.directus_url and settings.directus_token):
        return _flow_error(503, "the Directus flow endpoint is off: set LOCALTAG_FLOW_SECRET, "
                           "LOCALTAG_DIRECTUS_URL and LOCALTAG_DIRECTUS_TOKEN")
    if not _secret_matches(request.headers.get(SECRET_HEADER, ""), settings.flow_secret.get_secret_value()):
        return _flow_error(401, f"missing or wrong {SECRET_HEADER} header")
    try:
        body = await read_capped_async(request.stream(), MAX_FLOW_BODY, request.headers.get("content-length"))
    except TooLarge:
        return _flow_error(413, f"the body is over {MAX_FLOW_BODY} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return _flow_error(400, f"malformed JSON: {e}")
    trigger = doc.get("trigger", doc) if isinstance(doc, dict) else None
    if not isinstance(trigger, dict):
        return _flow_error(400, 'expected {"trigger": {{$trigger}}} from a Directus flow')
    if trigger.get("collection", "directus_files") != "directus_files":
        return _flow_error(400, f"not a file event (collection {trigger.get('collection')!r})")
    keys = trigger.get("keys") if isinstance(trigger.get("keys"), list) else [trigger.get("key")]
    keys = [k for k in keys if isinstance(k, str) and k]
    if not keys:
        return _flow_error(400, "the trigger has no file key")
    payload = trigger.get("payload") if isinstance(trigger.get("payload"), dict) else {}
    mime = payload.get("type") if isinstance(payload.get("type"), str) else None
    if mime is not None and not mime.startswith("image/"):
        return JSONResponse({"skipped": keys, "reason": f"not an image ({mime})"}, status_code=200)
    worker = request.app.state.directus_flow
    if worker is None:
        worker = request.app.state.directus_flow = FlowWorker(request.app.state.service, settings)
    if len(worker.tasks) + len(keys) > settings.max_queue:
        return JSONResponse({"error": "too many files waiting to be tagged; retry later"}, status_code=503,
                            headers={"Retry-After": "5"})
    for key in keys:
        worker.submit(key, mime)
    return JSONResponse({"queued": keys}, status_code=202)
