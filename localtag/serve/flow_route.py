"""``POST /directus/flow``: the endpoint of the flow ``localtag directus install-flow`` makes.

It takes what the flow sends for each upload, ``{"trigger": <$trigger>}`` (a bare ``$trigger`` works
too), checks the shared secret, answers 202 at once (the flow's HTTP call has no timeout) and hands
the file to the lifespan's :class:`~localtag.directus.flow.FlowWorker`, which tags it in the background.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..core.config import Settings
from ..core.limits import TooLarge, read_capped_async
from ..core.scorer import Picking
from ..core.tag import Tag
from ..core.tagger import Tagger
from ..directus.client import FLOW_PATH, SECRET_HEADER
from ..directus.flow import FlowWorker
from .service import Service

MAX_FLOW_BODY = 1_000_000

log = logging.getLogger(__name__)

router = APIRouter(tags=["directus"])


def flow_configured(settings: Settings) -> bool:
    return bool(settings.flow_secret and settings.directus_url and settings.directus_token)


def make_worker(service: Service, settings: Settings) -> FlowWorker:
    """The flow worker of this server: it tags with the default model, through the shared batcher."""
    picking = Picking(settings.directus_max_concepts, settings.directus_min_value,
                      language=settings.directus_language)

    async def predict(data: bytes) -> tuple[Tagger, list[Tag]]:
        entry = service.default
        return entry.tagger, await service.image_tags(entry, picking, data=data)

    return FlowWorker(predict, settings)


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
    worker = request.app.state.directus_flow
    if not flow_configured(settings) or worker is None:
        return _flow_error(503, "the Directus flow endpoint is off: set LOCALTAG_FLOW_SECRET, "
                           "LOCALTAG_DIRECTUS_URL and LOCALTAG_DIRECTUS_TOKEN")
    if not _secret_matches(request.headers.get(SECRET_HEADER, ""), settings.flow_secret.get_secret_value()):
        worker.refused_secret += 1  # /readyz says so: a flow whose Directus has another (or no) secret
        log.warning("directus flow call refused: %s", "no secret header" if not request.headers.get(SECRET_HEADER)
                    else "wrong secret")
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
    if len(worker.tasks) + len(keys) > settings.max_queue:
        return JSONResponse({"error": "too many files waiting to be tagged; retry later"}, status_code=503,
                            headers={"Retry-After": "5"})
    for key in keys:
        worker.submit(key, mime)
    return JSONResponse({"queued": keys}, status_code=202)
