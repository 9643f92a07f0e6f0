"""Clarifai workflows: ``PostWorkflows``, ``GetWorkflow``, ``ListWorkflows``, ``DeleteWorkflows`` and
``PostWorkflowResults`` over the family models (:mod:`localtag.serve.family`).

A workflow is a list of nodes ``{id, model: {id}}``; its results run every node on each input, and
each input is fetched, decoded and encoded once for all of them. Workflows are stored one JSON file
each in ``<cache_dir>/workflows/`` (written to a temp file, then renamed: a crash never leaves half a
file), so they survive a restart. ``General`` (general + embedding) is built in and read-only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ..app.api import ApiError
from ..core import clarifai
from .fairpool import RequestPixels
from .model_service import request_app
from .schema import InputIn
from .service import Overloaded, PredictOptions, Service, StatusError

log = logging.getLogger(__name__)

#: Clarifai's limit of inputs per PostWorkflowResults call
MAX_WORKFLOW_INPUTS = 32
MAX_NODES = 16
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
WORKFLOW_DUPLICATE = 22100
WORKFLOW_DOES_NOT_EXIST = 22102
WORKFLOW_INVALID_ARGUMENT = 22104
#: Clarifai's public workflows, answered here too (read-only)
BUILT_IN = {
    "General": [{"id": "general-concept", "model": {"id": "general-image-recognition"}},
                {"id": "general-embed", "model": {"id": "general-image-embedding"}}],
}


def _ok(**body: Any) -> tuple[int, dict]:
    return 200, {"status": clarifai.status(clarifai.SUCCESS, req_id=clarifai.new_id()), **body}


def _err(http: int, code: int, details: str) -> tuple[int, dict]:
    return http, clarifai.error_response(code, details, description=_DESCRIPTIONS.get(code))


_DESCRIPTIONS = {WORKFLOW_DUPLICATE: "Workflow already exists", WORKFLOW_DOES_NOT_EXIST: "Workflow does not exist",
                 WORKFLOW_INVALID_ARGUMENT: "Invalid workflow argument"}


class Workflows:
    """The stored workflows of one server, and running them."""

    def __init__(self, service: Service, folder: Path):
        self.service = service
        self.folder = Path(folder)

    # -- storage -----------------------------------------------------------------------------------
    def _path(self, workflow_id: str) -> Path:
        return self.folder / f"{workflow_id}.json"

    def _read(self, workflow_id: str) -> dict | None:
        if workflow_id in BUILT_IN:
            return self._doc(workflow_id, BUILT_IN[workflow_id], clarifai.EPOCH, built_in=True)
        if not ID_RE.match(workflow_id or ""):
            return None
        try:
            return json.loads(self._path(workflow_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("workflow %s unreadable: %s", workflow_id, e)
            return None

    def _write(self, doc: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".wf-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(doc["id"]))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _doc(self, workflow_id: str, nodes: list[dict], created: str, built_in: bool = False) -> dict:
        user, app = (clarifai.USER_ID, clarifai.APP_ID) if built_in else ("localtag", "localtag")
        return {"id": workflow_id, "app_id": app, "user_id": user, "created_at": created, "modified_at": created,
                "nodes": nodes, "version": {"id": workflow_id.lower()[:32], "created_at": created}}

    def _stored_ids(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.json") if ID_RE.match(p.stem))

    # -- checking nodes ----------------------------------------------------------------------------
    def _nodes(self, raw: Any, app: str = "me/main") -> list[dict]:
        """Validated nodes ``[{id, model: {id}}]``; raises StatusError (unknown model, bad shape)."""
        if not isinstance(raw, list) or not raw:
            raise StatusError(WORKFLOW_INVALID_ARGUMENT, "a workflow needs nodes: [{id, model: {id}}]")
        if len(raw) > MAX_NODES:
            raise StatusError(WORKFLOW_INVALID_ARGUMENT, f"{len(raw)} nodes is over the limit of {MAX_NODES}")
        nodes, seen = [], set()
        for i, n in enumerate(raw):
            model = n.get("model") if isinstance(n, dict) else None
            model_id = model.get("id") if isinstance(model, dict) else None
            node_id = n.get("id") if isinstance(n, dict) else None
            if not isinstance(model_id, str) or not model_id:
                raise StatusError(WORKFLOW_INVALID_ARGUMENT, f"nodes[{i}] needs model.id")
            node_id = node_id if isinstance(node_id, str) and node_id else f"node-{i + 1}"
            if node_id in seen:
                raise StatusError(WORKFLOW_INVALID_ARGUMENT, f"node id {node_id!r} is given twice")
            seen.add(node_id)
            model_ref = {"id": model_id, **self._custom_ref(model, app)}
            self._runnable(model_id, model_ref, check_only=True)
            nodes.append({"id": node_id, "model": model_ref})
        return nodes

    def _custom_ref(self, model: dict, app: str) -> dict:
        """A custom model's app and (optional) version, kept in its node: ``user_id``, ``app_id``, ``model_version``."""
        svc = self.service
        if svc.entry(model["id"]) is not None or svc.custom_models is None:
            return {}
        if model.get("app_id"):
            app = request_app({}, model)
        user_id, app_id = app.split("/", 1)
        ref: dict = {"user_id": user_id, "app_id": app_id}
        version = model.get("model_version") if isinstance(model.get("model_version"), dict) else {}
        if isinstance(version.get("id"), str) and version["id"]:
            ref["model_version"] = {"id": version["id"]}
        return ref

    def _runnable(self, model_id: str, ref: dict | None = None, check_only: bool = False):
        """The entry of a model a workflow may run: the default model, a family model or an app's custom model
        (they share one image embedding); raises StatusError for any other (and for an untrained custom model,
        unless ``check_only``)."""
        svc = self.service
        entry = svc.entry(model_id)
        ref = ref or {}
        if entry is None and ref.get("app_id") and svc.custom_models is not None:
            app = f"{ref.get('user_id') or 'me'}/{ref['app_id']}"
            if svc.custom_models.owns(app, model_id):
                if check_only:
                    return None
                try:
                    return svc.custom_models.entry(app, model_id, (ref.get("model_version") or {}).get("id"))
                except ApiError as e:
                    raise StatusError(e.code, e.details) from None
        if entry is None:
            raise StatusError(clarifai.MODEL_DOES_NOT_EXIST, f"model {model_id!r} is not served here")
        if model_id in svc.entries and entry is not svc.default:
            raise StatusError(WORKFLOW_INVALID_ARGUMENT, f"model {model_id!r} runs on another CLIP model; a workflow "
                              "takes the default model and Clarifai's family models, which share one embedding")
        return entry

    # -- the calls ---------------------------------------------------------------------------------
    def post(self, body: Any) -> tuple[int, dict]:
        items = body.get("workflows") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            return _err(400, clarifai.CONN_INVALID_REQUEST, "the request needs workflows: [{id, nodes}]")
        docs = []
        try:
            for w in items:
                wid = w.get("id") if isinstance(w, dict) else None
                if not isinstance(wid, str) or not ID_RE.match(wid):
                    raise StatusError(WORKFLOW_INVALID_ARGUMENT, f"workflow id {wid!r}: letters, digits, - and _ "
                                      "(at most 128)")
                if wid in BUILT_IN or self._read(wid) is not None or any(d["id"] == wid for d in docs):
                    return _err(409, WORKFLOW_DUPLICATE, f"workflow {wid!r} already exists")
                docs.append(self._doc(wid, self._nodes(w.get("nodes"), request_app({}, body.get("user_app_id"))),
                                      clarifai.now()))
        except StatusError as e:
            return _err(404 if e.code == clarifai.MODEL_DOES_NOT_EXIST else 400, e.code, e.details)
        for d in docs:
            self._write(d)
        return _ok(workflows=docs)

    def get(self, workflow_id: str) -> tuple[int, dict]:
        doc = self._read(workflow_id)
        if doc is None:
            return _err(404, WORKFLOW_DOES_NOT_EXIST, f"workflow {workflow_id!r} does not exist")
        return _ok(workflow=doc)

    def list(self, page: int = 1, per_page: int = 128) -> tuple[int, dict]:
        page, per_page = page or 1, per_page or 128
        ids = list(BUILT_IN) + self._stored_ids()
        docs = [d for d in (self._read(i) for i in ids[(page - 1) * per_page: page * per_page]) if d]
        return _ok(workflows=docs)

    def delete(self, body: Any, workflow_id: str | None = None) -> tuple[int, dict]:
        body = body if isinstance(body, dict) else {}
        ids = [workflow_id] if workflow_id else body.get("ids") or []
        if body.get("delete_all"):
            ids = self._stored_ids()
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not (ids or body.get("delete_all")):
            return _err(400, clarifai.CONN_INVALID_REQUEST, "give ids: [workflow ids] or delete_all: true")
        if any(i in BUILT_IN for i in ids):
            return _err(400, WORKFLOW_INVALID_ARGUMENT, "a built-in workflow cannot be deleted")
        missing = [i for i in ids if self._read(i) is None]
        if missing:
            return _err(404, WORKFLOW_DOES_NOT_EXIST, f"workflow(s) {missing} do not exist")
        for i in ids:
            self._path(i).unlink(missing_ok=True)
        return _ok()

    async def results(self, workflow_id: str, body: Any) -> tuple[int, dict]:
        """``PostWorkflowResults``: every node on each input (one fetch, decode and embedding per input)."""
        svc = self.service
        req_id = clarifai.new_id()
        doc = self._read(workflow_id)
        if doc is None:
            return _err(404, WORKFLOW_DOES_NOT_EXIST, f"workflow {workflow_id!r} does not exist")
        raw_inputs = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(raw_inputs, list) or not raw_inputs:
            return _err(400, clarifai.CONN_INVALID_REQUEST, "the request has no inputs")
        if len(raw_inputs) > MAX_WORKFLOW_INPUTS:
            return _err(400, clarifai.CONN_INVALID_REQUEST,
                        f"{len(raw_inputs)} inputs is over the limit of {MAX_WORKFLOW_INPUTS} per workflow call")
        try:
            inputs = [InputIn.model_validate(i) for i in raw_inputs]
            models = [(n["model"]["id"], self._runnable(n["model"]["id"], n["model"])) for n in doc["nodes"]]
        except StatusError as e:  # a stored workflow whose model is no longer served
            return _err(400, e.code, e.details)
        except ValueError as e:
            return _err(400, clarifai.CONN_INVALID_REQUEST, str(e).splitlines()[0])
        opts = PredictOptions(svc.settings.max_concepts, svc.settings.min_value, None, None)
        budget = RequestPixels(svc.settings.max_request_pixels)
        try:
            with svc.admitted(len(inputs)):
                per_input = await asyncio.gather(*(svc.family.run_input(svc, [(m, e, opts) for m, e in models], inp,
                                                                        budget) for inp in inputs))
        except Overloaded:
            return svc.overloaded_response()
        results = []
        for outs in per_input:
            failed = [o for o in outs if o["status"]["code"] != clarifai.SUCCESS]
            results.append({"id": clarifai.new_id(), "created_at": clarifai.now(),
                            "status": failed[0]["status"] if failed else clarifai.status(clarifai.SUCCESS),
                            "input": outs[0]["input"], "outputs": outs})
        code = clarifai.batch_code(len(results), sum(r["status"]["code"] != clarifai.SUCCESS for r in results))
        return (400 if code == clarifai.FAILURE else 200), {"status": clarifai.status(code, req_id=req_id),
                                                             "workflow": doc, "results": results}
