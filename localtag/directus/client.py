"""A small Directus REST client: the parts of the API localtag uses, and tag writes with provenance.

- :class:`DirectusClient`: every request retries 5xx, 429 (honouring Retry-After), timeouts and
  connection errors with exponential backoff and full jitter. 401/403 raise DirectusAuthError at once;
  the token never appears in an error message.
- :func:`ensure_provenance_field`, :func:`write_plan`, :func:`retag_file`: store a
  :class:`~localtag.directus.tag_merge.TagPlan` (the pure merge rules live in :mod:`localtag.directus.tag_merge`).

The library-wide sync is :mod:`localtag.directus.sync`, the flow endpoint :mod:`localtag.directus.flow`,
the commands :mod:`localtag.cli.directus`.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any

import httpx

from ..core.limits import TooLarge, read_capped
from .tag_merge import PROVENANCE_FIELD, TagPlan, plan_tags

#: beside the provenance record: why localtag could not tag the file, and which content that was
FAILED_FIELD = "localtag_failed"

#: where `localtag serve` takes the flow made by :meth:`DirectusClient.install_flow`
FLOW_PATH = "/directus/flow"
SECRET_HEADER = "X-Localtag-Secret"
#: the Directus environment variable the flow's header comes from (also in FLOWS_ENV_ALLOW_LIST)
SECRET_ENV = "LOCALTAG_FLOW_SECRET"
DEFAULT_FIELDS = ("id", "type", "tags", "filename_download", "filesize", "width", "height")
IMAGES_ONLY = {"type": {"_starts_with": "image/"}}
log = logging.getLogger(__name__)
_RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class DirectusError(Exception):
    """A Directus request failed. `status` and `code` come from the response when there was one."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class DirectusAuthError(DirectusError):
    """Directus answered 401 or 403: the token is wrong or lacks a permission."""


class DirectusNotFoundError(DirectusError):
    """The item does not exist (Directus often says 403 instead; see DirectusAuthError)."""


class DirectusClient:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 30,
        retries: int = 5,
        transport: httpx.BaseTransport | None = None,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )

    def __repr__(self) -> str:  # never shows the token
        return f"DirectusClient({self.url!r})"

    def __enter__(self) -> DirectusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ transport

    def _delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), 300.0)
            except ValueError:
                try:
                    when = email.utils.parsedate_to_datetime(retry_after).timestamp()
                    return min(max(when - time.time(), 0.0), 300.0)
                except (TypeError, ValueError):
                    pass
        return random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))

    def _request(
        self, method: str, path: str, *, max_bytes: int | None = None, retries: int | None = None, **kwargs: Any
    ) -> tuple[httpx.Response, bytes]:
        """Send with retries (`retries`, default the client's); return the response and its body (at most
        max_bytes)."""
        what = f"{method} {path}"
        retries = self.retries if retries is None else retries
        attempt = 0
        while True:
            retry_after = None
            try:
                with self._http.stream(method, path, **kwargs) as resp:
                    if resp.status_code < 400:
                        return resp, _read_body(resp, max_bytes, what)
                    resp.read()
            except _RETRYABLE_ERRORS as exc:
                if attempt >= retries:
                    raise DirectusError(
                        f"{what}: {type(exc).__name__} after {attempt + 1} attempts: {exc}"
                    ) from exc
            else:
                status = resp.status_code
                message, code = _error_detail(resp)
                if status in (401, 403):
                    raise DirectusAuthError(
                        f"{what}: Directus refused access ({status} {code or ''}: {message}). Check "
                        "the Directus token and its permissions (Directus also answers 403 for "
                        "an item that does not exist).",
                        status=status,
                        code=code,
                    )
                if status != 429 and status < 500:
                    raise DirectusError(f"{what}: {status} {code or ''}: {message}", status=status, code=code)
                if attempt >= retries:
                    raise DirectusError(
                        f"{what}: {status} {code or ''} after {attempt + 1} attempts: {message}",
                        status=status,
                        code=code,
                    )
                retry_after = resp.headers.get("Retry-After")
            time.sleep(self._delay(attempt, retry_after))
            attempt += 1

    def _data(self, method: str, path: str, **kwargs: Any) -> Any:
        """A JSON request; returns the `data` member (None for an empty 204 answer)."""
        _, body = self._request(method, path, **kwargs)
        return json.loads(body)["data"] if body else None

    def _meta(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        _, body = self._request("GET", path, params=params)
        return json.loads(body).get("meta") or {}

    # ------------------------------------------------------------------ files

    def iter_files(
        self,
        filter: dict | None = None,
        page_size: int = 100,
        fields: Iterable[str] = DEFAULT_FIELDS,
        *,
        images_only: bool = True,
    ) -> Iterator[dict]:
        """Yield the matching files sorted by id, each once, reading page_size (at most 100) at a time.

        Directus has no `_gt` on uuid fields, so keyset paging on id is impossible; instead this takes a
        snapshot of the matching ids first (id-only requests) and then reads them in pages with
        `id _in [...]`, re-checking the filter. Writes during the walk (tagging the files an "untagged"
        filter selects) can't shift pages; files uploaded after the walk began are left for the next walk.
        """
        fields = list(dict.fromkeys(["id", *fields]))
        base = _combine(filter, images_only)
        ids = self._matching_ids(base)
        step = max(1, min(page_size, 100))  # 100 uuids keep the URL under ~5 kB
        for i in range(0, len(ids), step):
            chunk = ids[i : i + step]
            params = {"fields": ",".join(fields), "sort": "id", "limit": len(chunk)}
            params["filter"] = json.dumps({"_and": [*base, {"id": {"_in": chunk}}]})
            yield from self._data("GET", "/files", params=params) or []

    def _matching_ids(self, clauses: list[dict]) -> list[str]:
        """All matching ids, sorted. One request unless QUERY_LIMIT_MAX clamps `limit=-1`."""
        ids: list[str] = []
        while True:
            params: dict[str, Any] = {"fields": "id", "sort": "id", "limit": -1, "offset": len(ids)}
            params["meta"] = "filter_count"
            if clauses:
                params["filter"] = json.dumps({"_and": clauses})
            _, body = self._request("GET", "/files", params=params)
            doc = json.loads(body)
            page = [row["id"] for row in doc["data"]]
            ids += page
            if not page or len(ids) >= int(doc["meta"]["filter_count"]):
                return ids

    def count_files(self, filter: dict | None = None, *, images_only: bool = True) -> int:
        """How many files match (the same default images-only filter as iter_files)."""
        params: dict[str, Any] = {"limit": 1, "fields": "id", "meta": "filter_count"}
        clauses = _combine(filter, images_only)
        if clauses:
            params["filter"] = json.dumps({"_and": clauses})
        return int(self._meta("/files", params)["filter_count"])

    def get_file(self, file_id: str, fields: Iterable[str] | None = None) -> dict:
        params = {"fields": ",".join(fields)} if fields else None
        return self._data("GET", f"/files/{file_id}", params=params)

    def download(
        self,
        file_id: str,
        *,
        width: int | None = None,
        height: int | None = None,
        max_bytes: int = 20_000_000,
        fit: str = "inside",
        retries: int | None = None,
    ) -> bytes:
        """The file's bytes, or a JPEG rendition made by Directus: `fit` "inside" fits it inside
        width x height, "outside" makes it just cover them (short side >= the box, for a centre crop).
        `retries` overrides the client's (Directus answers 500 for an image it cannot resize)."""
        params: dict[str, Any] = {}
        if width or height:
            params = {"fit": fit, "format": "jpg", "withoutEnlargement": "true"}
            if width:
                params["width"] = width
            if height:
                params["height"] = height
        _, body = self._request("GET", f"/assets/{file_id}", params=params, max_bytes=max_bytes, retries=retries)
        return body

    def files_by_id(self, ids: Iterable[str], fields: Iterable[str]) -> dict[str, dict]:
        """The rows of these files (one request per 100 ids); a file that does not exist is left out."""
        ids = list(dict.fromkeys(ids))
        fields = ",".join(dict.fromkeys(["id", *fields]))
        out: dict[str, dict] = {}
        for i in range(0, len(ids), 100):
            chunk = ids[i : i + 100]
            params = {"fields": fields, "limit": len(chunk), "filter": json.dumps({"id": {"_in": chunk}})}
            out.update({row["id"]: row for row in self._data("GET", "/files", params=params) or []})
        return out

    def update_file(self, file_id: str, values: dict[str, Any], fields: Iterable[str] = ("id",)) -> dict:
        """PATCH /files/{id} with `values`; returns the stored `fields`. Raises DirectusNotFoundError when
        the file does not exist. A PATCH sets whole values, so sending it twice is the same as once."""
        params = {"fields": ",".join(dict.fromkeys(["id", *fields]))}
        data = self._data("PATCH", f"/files/{file_id}", params=params, json=values)
        if data is None:  # Directus answers 204 for a PATCH of an id that does not exist
            raise DirectusNotFoundError(f"PATCH /files/{file_id}: no such file", status=204, code="NOT_FOUND")
        return data

    def ping(self) -> bool:
        """Whether Directus answers /server/ping (after the usual retries)."""
        try:
            _, body = self._request("GET", "/server/ping")
        except DirectusError:
            return False
        return body.strip() == b"pong"

    def field_names(self, collection: str) -> set[str]:
        """The fields of `collection` this token can see."""
        return {f["field"] for f in self._data("GET", f"/fields/{collection}", params={"fields": "field"}) or []}

    def create_field(self, collection: str, field: dict[str, Any]) -> None:
        self._data("POST", f"/fields/{collection}", json=field)

    def find_flows(self, name: str) -> list[dict]:
        params = {
            "filter": json.dumps({"name": {"_eq": name}}),
            "fields": "id,operations.id",
            "sort": "date_created",
        }
        return self._data("GET", "/flows", params=params) or []

    def install_flow(self, name: str, localtag_url: str, secret_env: str = SECRET_ENV) -> str:
        """Create or update (in place, never a duplicate) the flow that POSTs each upload to localtag.

        Body: {"trigger": <the event's trigger object>} as JSON; header X-Localtag-Secret.
        The secret is never stored in Directus's database: the header is ``{{$env.<secret_env>}}``, which
        Directus fills from its own environment at each run and redacts in the flow's log (its revisions
        show ``--redacted:<secret_env>--``). So Directus needs ``<secret_env>=<the secret>`` and
        ``FLOWS_ENV_ALLOW_LIST=<secret_env>`` in its environment. (A literal header value would be stored
        in every run's revision, and so would a script holding the secret: Directus logs each step's
        resolved options.)
        Directus must allow the target address: for 127.0.0.1 set IMPORT_IP_DENY_LIST=169.254.169.254.
        """
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", secret_env):
            raise ValueError(f"{secret_env!r} is not an environment variable name (A-Z, 0-9, _)")
        secret = "{{$env." + secret_env + "}}"
        ops = [
            {
                "key": "localtag",
                "name": "Send to localtag",
                "type": "request",
                "options": {
                    "method": "POST",
                    "url": localtag_url,
                    "headers": [
                        {"header": SECRET_HEADER, "value": secret},
                        {"header": "Content-Type", "value": "application/json"},
                    ],
                    "body": '{"trigger": {{$trigger}}}',
                },
            }
        ]
        return self._put_flow(name, ops, "Tags uploaded images with localtag.")

    def _put_flow(self, name: str, ops: list[dict], description: str) -> str:
        """Create the flow `name`, or rebuild the existing one in place, with `ops` chained by resolve."""
        flow = {
            "name": name,
            "icon": "label",
            "description": description,
            "status": "active",
            "trigger": "event",
            "accountability": "all",
            "options": {"type": "action", "scope": ["files.upload"]},
        }
        existing = self.find_flows(name)
        for extra in existing[1:]:  # collapse duplicates someone else made
            self._delete_flow(extra)
        if existing:
            flow_id = existing[0]["id"]
            self._data(
                "PATCH", f"/flows/{flow_id}", params={"fields": "id"}, json={**flow, "operation": None}
            )
            old = [op["id"] for op in existing[0].get("operations") or []]
            if old:
                self._request("DELETE", "/operations", json=old)
        else:
            flow_id = self._data("POST", "/flows", params={"fields": "id"}, json=flow)["id"]
        next_id = None
        for i, op in reversed(list(enumerate(ops))):  # last first, so each can point to the next
            body = {
                **op,
                "flow": flow_id,
                "resolve": next_id,
                "reject": None,
                "position_x": 19 + 18 * i,
                "position_y": 1,
            }
            next_id = self._data("POST", "/operations", params={"fields": "id"}, json=body)["id"]
        self._data("PATCH", f"/flows/{flow_id}", params={"fields": "id"}, json={"operation": next_id})
        return flow_id

    def _delete_flow(self, flow: dict) -> None:
        ops = [op["id"] for op in flow.get("operations") or []]
        if ops:
            self._data("PATCH", f"/flows/{flow['id']}", params={"fields": "id"}, json={"operation": None})
            self._request("DELETE", "/operations", json=ops)
        self._request("DELETE", f"/flows/{flow['id']}")

    def uninstall_flow(self, name: str) -> bool:
        """Delete every flow called `name` with its operations; False when there was none."""
        flows = self.find_flows(name)
        for flow in flows:
            self._delete_flow(flow)
        return bool(flows)


def _readonly_json_field(name: str, note: str) -> dict[str, Any]:
    """The definition of a read-only json field of localtag's on directus_files."""
    return {
        "field": name,
        "type": "json",
        "meta": {"interface": "input-code", "options": {"language": "json"}, "special": ["cast-json"],
                 "readonly": True, "note": note},
        "schema": {"is_nullable": True},
    }


_FIELD_DEFINITION = _readonly_json_field(
    PROVENANCE_FIELD, "Written by localtag: which of the tags are machine tags (model, vocabulary, values). "
    "Tags you add or remove yourself are never changed by localtag.")


def ensure_provenance_field(client: DirectusClient, *, create: bool = True) -> bool:
    """Whether directus_files.localtag exists; with `create`, make it when missing (needs an admin token)."""
    if PROVENANCE_FIELD in client.field_names("directus_files"):
        return True
    if not create:
        return False
    try:
        client.create_field("directus_files", _FIELD_DEFINITION)
    except DirectusAuthError as e:
        raise DirectusAuthError(
            f"the field directus_files.{PROVENANCE_FIELD} (where localtag records its own tags) is missing "
            "and this token may not create it: run `localtag directus install-flow` or `sync` once with an "
            f"admin token. ({e})",
            status=e.status,
            code=e.code,
        ) from None
    return True


_FAILED_DEFINITION = _readonly_json_field(
    FAILED_FIELD, "Written by localtag: why this file could not be tagged (with its sha256, size and upload "
    "time). `localtag directus sync` skips it until the file changes or --retry-failed is given.")


def ensure_failure_field(client: DirectusClient, *, create: bool = True) -> bool:
    """Whether directus_files.localtag_failed exists; with `create`, make it when missing (False if refused)."""
    if FAILED_FIELD in client.field_names("directus_files"):
        return True
    if not create:
        return False
    try:
        client.create_field("directus_files", _FAILED_DEFINITION)
    except DirectusAuthError:
        log.warning("cannot create directus_files.%s (needs an admin token): failures are not remembered",
                    FAILED_FIELD)
        return False
    return True


def write_plan(client: DirectusClient, file_id: str, plan: TagPlan) -> None:
    """Store tags and provenance in one PATCH; check Directus kept the record (it silently drops a field
    it does not know)."""
    stored = client.update_file(
        file_id, {"tags": plan.tags, PROVENANCE_FIELD: plan.provenance}, fields=[PROVENANCE_FIELD]
    )
    if stored.get(PROVENANCE_FIELD) != plan.provenance:
        raise DirectusError(
            f"PATCH /files/{file_id}: Directus did not keep the {PROVENANCE_FIELD} field; create it with "
            "`localtag directus install-flow` or `sync` (an admin token)",
            code="NO_PROVENANCE_FIELD",
        )


def retag_file(client: DirectusClient, file_id: str, new: Sequence[Any], stamp: dict[str, Any],
               learnt: Collection[str] = ()) -> TagPlan:
    """Read the file's tags and record afresh, replace localtag's own tags with `new`, write (`learnt`: see
    :func:`~localtag.directus.tag_merge.plan_tags`)."""
    row = client.files_by_id([file_id], ["tags", PROVENANCE_FIELD]).get(file_id)
    if row is None:
        raise DirectusNotFoundError(f"file {file_id} does not exist", code="NOT_FOUND")
    plan = plan_tags(row.get("tags"), row.get(PROVENANCE_FIELD), new, stamp, learnt)
    write_plan(client, file_id, plan)
    return plan


def is_transient(error: DirectusError) -> bool:
    """No answer at all, a 5xx or a 429 (after the client's own retries): worth trying again later."""
    return (error.status is None and error.code is None) or (error.status or 0) >= 500 or error.status == 429


def _combine(filter: dict | None, images_only: bool) -> list[dict]:
    clauses = [IMAGES_ONLY] if images_only else []
    if filter:
        clauses.append(filter)
    return clauses


def _error_detail(resp: httpx.Response) -> tuple[str, str | None]:
    try:
        err = resp.json()["errors"][0]
        return str(err.get("message", "")), (err.get("extensions") or {}).get("code")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return resp.text[:200].strip() or resp.reason_phrase, None




def _read_body(resp: httpx.Response, max_bytes: int | None, what: str) -> bytes:
    if max_bytes is None:
        return resp.read()
    try:
        return read_capped(resp.iter_bytes(), max_bytes, resp.headers.get("Content-Length"))
    except TooLarge as e:
        raise DirectusError(f"{what}: {e}", code="TOO_LARGE") from None
