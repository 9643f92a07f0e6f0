"""The background side of the Directus flow endpoint (the route is :mod:`localtag.serve.flow_route`).

For each uploaded file the flow made by ``localtag directus install-flow`` reports, :class:`FlowWorker`
downloads /assets/{key} with the configured static token, tags it with the ``predict`` it was given
(the server's own model and batcher, shared with the REST and gRPC routes) and writes the tags with
plan_tags (a person's tags stay). Transient Directus failures are retried with backoff; a bad image or
a refused token is logged once and dropped (``sync`` catches up later). The server's lifespan owns the
worker and drains it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from ..core.config import Settings
from ..core.errors import ImageError
from ..core.head_mix import head_record
from ..core.tag import Tag
from ..core.tagger import Tagger
from .client import (
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
#: image bytes → (the tagger that tagged it, its tags)
Predict = Callable[[bytes], Awaitable[tuple[Tagger, list[Tag]]]]


class FlowWorker:
    """The background side of the flow endpoint, one per app (``app.state.directus_flow``)."""

    def __init__(self, predict: Predict, settings: Settings) -> None:
        self.predict = predict
        self.settings = settings
        self.client = DirectusClient(settings.directus_url, settings.directus_token.get_secret_value())
        self.semaphore = asyncio.Semaphore(FLOW_CONCURRENCY)
        self.tasks: set[asyncio.Task] = set()
        self.field_ready = False
        self.backoff = 1.0
        self.done = 0
        self.failed = 0
        self.refused_secret = 0  # flow calls that came with a missing or wrong secret

    def state(self) -> dict[str, int]:
        return {"queued": len(self.tasks), "tagged": self.done, "failed": self.failed,
                "refused_secret": self.refused_secret}

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
        tagger, tags = await self.predict(data)
        head, learnt = head_record(tagger)  # the server's learnt head (LOCALTAG_MODEL_HEAD), if any
        stamp = provenance_stamp(tagger.info.name, tagger.info.sha256, tagger.vocab.sha256, "flow", head)
        plan = await asyncio.to_thread(retag_file, self.client, key, tags, stamp, learnt)
        log.info("directus file %s tagged: %s", key, ", ".join(plan.provenance["tags"]) or "(no tags)")

    async def drain(self, timeout: float = 10.0) -> None:
        """Let the files being tagged finish (up to ``timeout``), then cancel the rest; close the client."""
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.to_thread(self.client.close)
