"""Custom models of an app (Clarifai's ``embedding-classifier``): records, versions, training and their JSON.

A model names concepts of its app; a version is trained from the app's annotations of those concepts
(value 1: a positive, value 0: a negative) over the app's stored CLIP embeddings, by
:func:`localtag.core.learn.train` (a calibrated probe per concept, the zero-shot text embedding as the
prior where the model's vocabulary knows the concept's name). Versions are kept: each is a row in
``model_versions`` (status, the CLIP model's sha256 it was trained on, counts) and a head file
``<app store>/heads/<app digest>/<model>/<version>.npz`` in the format ``localtag tag --model-head``
reads. Both tables live in the app store's SQLite file; every write is one transaction.

Protocol-free like :mod:`localtag.app.api`: methods answer ``(http_status, body)`` in Clarifai's JSON
(``Model``, ``ModelVersion``, ``OutputInfo``, ``SingleModelResponse``, ``MultiModelVersionResponse``);
training itself (:meth:`ModelsApi.train`) is blocking and run by the server's worker.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core import clarifai, learn
from .api import ApiError
from .store import AppStore

log = logging.getLogger(__name__)

MODEL_TYPE = "embedding-classifier"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
MAX_CONCEPTS = 1000
#: the states of a version that is not finished yet
PENDING = (clarifai.MODEL_QUEUED_FOR_TRAINING, clarifai.MODEL_TRAINING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    app TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL, concepts TEXT NOT NULL,
    config TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, modified REAL NOT NULL,
    PRIMARY KEY (app, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS model_versions (
    app TEXT NOT NULL, model TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, status INTEGER NOT NULL,
    details TEXT, created REAL NOT NULL, completed REAL, model_sha256 TEXT, head TEXT, inputs INTEGER,
    meta TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (app, model, id)) WITHOUT ROWID;
"""


def _ts(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _config(given: dict) -> dict:
    """The output_config a model keeps: ``max_concepts`` (0-1000), ``min_value`` (0-1) and Clarifai's two
    training flags (kept, not used); anything else is an error."""
    out: dict[str, Any] = {}
    for k, v in given.items():
        if k == "max_concepts" and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_CONCEPTS):
            raise ApiError(clarifai.MODEL_INVALID_ARGUMENT, f"output_config.max_concepts: 0 to {MAX_CONCEPTS}")
        if k == "min_value" and not (isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1):
            raise ApiError(clarifai.MODEL_INVALID_ARGUMENT, "output_config.min_value: 0 to 1")
        if k in ("concepts_mutually_exclusive", "closed_environment") and not isinstance(v, bool):
            raise ApiError(clarifai.MODEL_INVALID_ARGUMENT, f"output_config.{k}: true or false")
        if k in ("max_concepts", "min_value", "concepts_mutually_exclusive", "closed_environment"):
            out[k] = v
    return out


class Untrained(ApiError):
    """A model (or the asked version) has no trained head to predict with."""


class ModelStore:
    """The ``models`` and ``model_versions`` tables and the head files, next to an :class:`AppStore`."""

    def __init__(self, store: AppStore):
        self.store = store
        self.heads = store.root / "heads"
        self.store._db().executescript(_SCHEMA)

    def _write(self):
        return self.store._write()

    def _db(self) -> sqlite3.Connection:
        return self.store._db()

    def head_dir(self, app: str, model_id: str) -> Path:
        return self.heads / hashlib.sha256(app.encode()).hexdigest()[:16] / model_id

    # models
    def create(self, app: str, model_id: str, name: str, concepts: list[str], config: dict) -> bool:
        """False when the id is taken in the app."""
        now = time.time()
        with self._write() as db:
            try:
                db.execute("INSERT INTO models (app, id, name, type, concepts, config, created, modified) "
                           "VALUES (?,?,?,?,?,?,?,?)", (app, model_id, name, MODEL_TYPE, json.dumps(concepts),
                                                       json.dumps(config), now, now))
            except sqlite3.IntegrityError:
                return False
        return True

    def get(self, app: str, model_id: str) -> dict | None:
        row = self._db().execute("SELECT id, name, type, concepts, config, created, modified FROM models "
                                 "WHERE app = ? AND id = ?", (app, model_id)).fetchone()
        return self._model(row) if row else None

    def list(self, app: str) -> list[dict]:
        rows = self._db().execute("SELECT id, name, type, concepts, config, created, modified FROM models "
                                  "WHERE app = ? ORDER BY created DESC, id", (app,)).fetchall()
        return [self._model(r) for r in rows]

    @staticmethod
    def _model(r) -> dict:
        return {"id": r[0], "name": r[1], "type": r[2], "concepts": json.loads(r[3]), "config": json.loads(r[4]),
                "created": r[5], "modified": r[6]}

    def delete(self, app: str, model_id: str) -> bool:
        with self._write() as db:
            n = db.execute("DELETE FROM models WHERE app = ? AND id = ?", (app, model_id)).rowcount
            db.execute("DELETE FROM model_versions WHERE app = ? AND model = ?", (app, model_id))
        shutil.rmtree(self.head_dir(app, model_id), ignore_errors=True)
        return n > 0

    # versions
    def add_version(self, app: str, model_id: str, description: str = "") -> str:
        vid = uuid.uuid4().hex
        with self._write() as db:
            seq = db.execute("SELECT coalesce(max(seq), 0) FROM model_versions WHERE app = ? AND model = ?",
                             (app, model_id)).fetchone()[0]
            db.execute("INSERT INTO model_versions (app, model, id, seq, status, created, meta) VALUES (?,?,?,?,?,?,?)",
                       (app, model_id, vid, seq + 1, clarifai.MODEL_QUEUED_FOR_TRAINING, time.time(),
                        json.dumps({"description": description} if description else {})))
        return vid

    def set_version(self, app: str, model_id: str, vid: str, status: int, details: str | None = None, **cols: Any
                    ) -> None:
        sets, args = ["status = ?", "details = ?"], [status, details]
        for k, v in cols.items():
            sets.append(f"{k} = ?")
            args.append(json.dumps(v) if k == "meta" else v)
        with self._write() as db:
            db.execute(f"UPDATE model_versions SET {', '.join(sets)} WHERE app = ? AND model = ? AND id = ?",
                       (*args, app, model_id, vid))

    _VCOLS = "id, seq, status, details, created, completed, model_sha256, head, inputs, meta, model, app"

    def version(self, app: str, model_id: str, vid: str) -> dict | None:
        row = self._db().execute(f"SELECT {self._VCOLS} FROM model_versions WHERE app = ? AND model = ? AND id = ?",
                                 (app, model_id, vid)).fetchone()
        return self._version(row) if row else None

    def versions(self, app: str, model_id: str) -> list[dict]:
        """Newest first."""
        rows = self._db().execute(f"SELECT {self._VCOLS} FROM model_versions WHERE app = ? AND model = ? "
                                  "ORDER BY seq DESC", (app, model_id)).fetchall()
        return [self._version(r) for r in rows]

    def pending(self) -> list[dict]:
        """Versions queued or training (a server stopped before it finished them), oldest first."""
        rows = self._db().execute(f"SELECT {self._VCOLS} FROM model_versions WHERE status IN (?, ?) ORDER BY created",
                                  PENDING).fetchall()
        return [self._version(r) for r in rows]

    @staticmethod
    def _version(r) -> dict:
        return {"id": r[0], "seq": r[1], "status": r[2], "details": r[3], "created": r[4], "completed": r[5],
                "model_sha256": r[6], "head": r[7], "inputs": r[8], "meta": json.loads(r[9]), "model": r[10],
                "app": r[11]}


class ModelsApi:
    """Clarifai's custom-model calls over one app store. ``key``: the embedding key of the server's encoder;
    ``model_sha256``/``model_name``: its CLIP model; ``prior(name)``: the zero-shot ``(w₀, b₀)`` of a concept
    name, or None; ``reserved(id)``: True for model ids the server already serves (the public family)."""

    def __init__(self, store: AppStore, key: str, model_sha256: str, model_name: str,
                 prior: Callable[[str], tuple[np.ndarray, float] | None] | None = None,
                 reserved: Callable[[str], bool] | None = None):
        self.store = store
        self.models = ModelStore(store)
        self.key, self.model_sha256, self.model_name = key, model_sha256, model_name
        self.prior = prior or (lambda name: None)
        self.reserved = reserved or (lambda model_id: False)
        self._heads: dict[str, learn.Head] = {}

    @staticmethod
    def ok(**body: Any) -> tuple[int, dict]:
        return 200, {"status": clarifai.status(clarifai.SUCCESS, req_id=clarifai.new_id()), **body}

    @staticmethod
    def error(e: ApiError) -> tuple[int, dict]:
        return e.http, clarifai.error_response(e.code, e.details)

    # -- JSON ---------------------------------------------------------------------------------------
    def version_json(self, app: str, model: dict, v: dict) -> dict:
        user_id, app_id = app.split("/", 1)
        out: dict[str, Any] = {
            "id": v["id"], "created_at": _ts(v["created"]), "status": clarifai.status(v["status"], details=v["details"]),
            "active_concept_count": len(model["concepts"]), "app_id": app_id, "user_id": user_id,
            "output_info": self._output_info(app, model), "description": v["meta"].get("description", ""),
            "metadata": {k: x for k, x in v["meta"].items() if k in ("concepts", "contradictions", "model",
                                                                     "model_sha256", "train_seconds")},
        }
        if v["inputs"] is not None:
            out["total_input_count"] = v["inputs"]
        if v["completed"] is not None:
            out["completed_at"] = _ts(v["completed"])
        return out

    def _output_info(self, app: str, model: dict) -> dict:
        names = dict(self.store.concepts(app))
        info: dict[str, Any] = {"data": {"concepts": [{"id": c, "name": names.get(c, c), "value": 1.0}
                                                      for c in model["concepts"]]}}
        if model["config"]:
            info["output_config"] = model["config"]
        return info

    def model_json(self, app: str, model: dict, version: dict | None = None) -> dict:
        user_id, app_id = app.split("/", 1)
        out: dict[str, Any] = {"id": model["id"], "name": model["name"], "created_at": _ts(model["created"]),
                               "modified_at": _ts(model["modified"]), "app_id": app_id, "user_id": user_id,
                               "model_type_id": MODEL_TYPE, "output_info": self._output_info(app, model)}
        if version is None:
            versions = self.models.versions(app, model["id"])
            version = next((v for v in versions if v["status"] == clarifai.MODEL_TRAINED), None) or \
                (versions[0] if versions else None)
        if version is not None:
            out["model_version"] = self.version_json(app, model, version)
        return out

    # -- lookups ------------------------------------------------------------------------------------
    def model(self, app: str, model_id: str) -> dict:
        m = self.models.get(app, model_id)
        if m is None:
            raise ApiError(clarifai.MODEL_DOES_NOT_EXIST, f"model {model_id!r} does not exist in app {app!r}", 404)
        return m

    def owns(self, app: str, model_id: str | None) -> bool:
        return bool(model_id) and self.models.get(app, model_id) is not None

    def head(self, app: str, model_id: str, version_id: str | None = None) -> tuple[learn.Head, dict, dict]:
        """(head, model, version) to predict with: ``version_id``'s, else the newest trained version's.
        Raises :class:`ApiError` (unknown model or version, not trained, trained on another CLIP model)."""
        model = self.model(app, model_id)
        if version_id:
            v = self.models.version(app, model_id, version_id)
            if v is None:
                raise ApiError(clarifai.MODEL_DOES_NOT_EXIST, f"model {model_id!r} has no version {version_id!r}",
                               404)
            if v["status"] != clarifai.MODEL_TRAINED:
                raise Untrained(clarifai.MODEL_UNTRAINED, f"version {version_id!r} of model {model_id!r} is not "
                                f"trained (status {v['status']}: {v['details'] or clarifai.DESCRIPTIONS.get(v['status'])})")
        else:
            v = next((x for x in self.models.versions(app, model_id) if x["status"] == clarifai.MODEL_TRAINED), None)
            if v is None:
                raise Untrained(clarifai.MODEL_UNTRAINED, f"model {model_id!r} has no trained version yet: "
                                "PostModelVersions trains one (poll GetModelVersion until 21100)")
        path = self.models.heads / v["head"]
        head = self._heads.get(str(path))
        if head is None:
            head = learn.load(path)
            self._heads[str(path)] = head
        try:
            head.check(self.model_sha256, self.model_name)
        except learn.HeadMismatch as e:
            raise ApiError(clarifai.MODEL_INVALID_ARGUMENT, str(e)) from None
        return head, model, v

    # -- the calls ----------------------------------------------------------------------------------
    def post_models(self, app: str, body: dict) -> tuple[int, dict]:
        """``PostModels``: ``model`` (or ``models[0]``) with ``model_type_id`` ``embedding-classifier`` and
        ``output_info.data.concepts``; ``output_info.output_config`` is kept (max_concepts, min_value)."""
        raw = _dict(body.get("model")) or _dict((body.get("models") or [{}])[0] if isinstance(body.get("models"),
                                                                                               list) else {})
        try:
            mid = raw.get("id")
            if not isinstance(mid, str) or not ID_RE.match(mid):
                raise ApiError(clarifai.MODEL_INVALID_ARGUMENT, f"model id {mid!r}: letters, digits, '.', '_' and '-' "
                                                                "(at most 100)")
            if self.reserved(mid):
                raise ApiError(clarifai.MODEL_INVALID_ARGUMENT, f"model id {mid!r} is a public model served here",
                               409)
            mtype = raw.get("model_type_id") or MODEL_TYPE
            if mtype != MODEL_TYPE:
                raise ApiError(clarifai.MODEL_INVALID_ARGUMENT, f"model_type_id {mtype!r}: localtag trains "
                                                                f"{MODEL_TYPE!r} models only")
            info = _dict(raw.get("output_info"))
            given = _dict(info.get("data")).get("concepts")
            concepts: list[str] = []
            named: list[tuple[str, str]] = []
            for c in given if isinstance(given, list) else []:
                cid = _dict(c).get("id") or _dict(c).get("name")
                if not isinstance(cid, str) or not cid:
                    raise ApiError(clarifai.MODEL_INVALID_ARGUMENT, "a concept of output_info.data.concepts needs an id")
                if cid not in concepts:
                    concepts.append(cid)
                    name = _dict(c).get("name")
                    named.append((cid, name if isinstance(name, str) and name else ""))
            if not concepts:
                raise ApiError(clarifai.MODEL_INVALID_ARGUMENT, "the model needs output_info.data.concepts "
                                                                "(the concepts to learn)")
            if len(concepts) > MAX_CONCEPTS:
                raise ApiError(clarifai.MODEL_INVALID_ARGUMENT, f"{len(concepts)} concepts; at most {MAX_CONCEPTS}")
            config = _config(_dict(info.get("output_config")))
            known = dict(self.store.concepts(app))
            self.store.add_concepts(app, [(cid, name or cid) for cid, name in named if cid not in known or name])
            name = raw.get("name") if isinstance(raw.get("name"), str) and raw.get("name") else mid
            if not self.models.create(app, mid, name, concepts, config):
                raise ApiError(clarifai.MODEL_INVALID_ARGUMENT, f"model {mid!r} already exists in app {app!r}", 409)
        except ApiError as e:
            return self.error(e)
        return self.ok(model=self.model_json(app, self.model(app, mid)))

    def get_model(self, app: str, model_id: str) -> tuple[int, dict]:
        try:
            return self.ok(model=self.model_json(app, self.model(app, model_id)))
        except ApiError as e:
            return self.error(e)

    def list_json(self, app: str) -> list[dict]:
        return [self.model_json(app, m) for m in self.models.list(app)]

    def delete_model(self, app: str, model_id: str) -> tuple[int, dict]:
        if not self.models.delete(app, model_id):
            return self.error(ApiError(clarifai.MODEL_DOES_NOT_EXIST, f"model {model_id!r} does not exist", 404))
        self._heads.clear()
        return self.ok()

    def delete_models(self, app: str, body: dict) -> tuple[int, dict]:
        ids = [m["id"] for m in self.models.list(app)] if body.get("delete_all") else body.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not (ids or body.get("delete_all")):
            return self.error(ApiError(clarifai.MODEL_INVALID_ARGUMENT, "give ids: [model ids] or delete_all: true"))
        missing = [i for i in ids if self.models.get(app, i) is None]
        if missing:
            return self.error(ApiError(clarifai.MODEL_DOES_NOT_EXIST, f"model(s) {missing[:5]} do not exist", 404))
        for i in ids:
            self.models.delete(app, i)
        self._heads.clear()
        return self.ok()

    def post_version(self, app: str, model_id: str, body: dict) -> tuple[tuple[int, dict], str | None]:
        """``PostModelVersions``: a new version, queued (21103); the caller's worker trains it. Answers
        ``SingleModelResponse`` with the model and the new version, and the version id."""
        try:
            model = self.model(app, model_id)
        except ApiError as e:
            return self.error(e), None
        desc = body.get("description") if isinstance(body.get("description"), str) else ""
        vid = self.models.add_version(app, model_id, desc)
        v = self.models.version(app, model_id, vid)
        return self.ok(model=self.model_json(app, model, v)), vid

    def get_version(self, app: str, model_id: str, vid: str) -> tuple[int, dict]:
        try:
            model = self.model(app, model_id)
        except ApiError as e:
            return self.error(e)
        v = self.models.version(app, model_id, vid)
        if v is None:
            return self.error(ApiError(clarifai.MODEL_DOES_NOT_EXIST, f"model {model_id!r} has no version {vid!r}",
                                       404))
        return self.ok(model_version=self.version_json(app, model, v))

    def list_versions(self, app: str, model_id: str, page: int = 1, per_page: int = 128,
                      trained_only: bool = False) -> tuple[int, dict]:
        try:
            model = self.model(app, model_id)
        except ApiError as e:
            return self.error(e)
        vs = [v for v in self.models.versions(app, model_id) if not trained_only or v["status"] == clarifai.MODEL_TRAINED]
        page, per_page = max(page or 1, 1), max(1, min(per_page or 128, 1000))
        vs = vs[(page - 1) * per_page: page * per_page]
        return self.ok(model_versions=[self.version_json(app, model, v) for v in vs])

    def delete_version(self, app: str, model_id: str, vid: str) -> tuple[int, dict]:
        v = self.models.version(app, model_id, vid)
        if v is None:
            return self.error(ApiError(clarifai.MODEL_DOES_NOT_EXIST, f"model {model_id!r} has no version {vid!r}",
                                       404))
        with self.models._write() as db:
            db.execute("DELETE FROM model_versions WHERE app = ? AND model = ? AND id = ?", (app, model_id, vid))
        if v["head"]:
            (self.models.heads / v["head"]).unlink(missing_ok=True)
        self._heads.clear()
        return self.ok()

    # -- training -----------------------------------------------------------------------------------
    def train(self, app: str, model_id: str, vid: str) -> int:
        """Train one queued version (blocking): 21101 while it runs, then 21100, or a 2111x code with the
        reason when the annotations are too few. Returns the final status code."""
        model = self.models.get(app, model_id)
        if model is None or self.models.version(app, model_id, vid) is None:
            return clarifai.MODEL_DOES_NOT_EXIST  # deleted while queued
        self.models.set_version(app, model_id, vid, clarifai.MODEL_TRAINING)
        start = time.perf_counter()
        try:
            head, meta, n = train_head(self.store, app, model, self.key, self.model_sha256, self.model_name,
                                       self.prior)
        except ApiError as e:
            self.models.set_version(app, model_id, vid, e.code, e.details, completed=time.time())
            log.info("model %s/%s version %s: %s", app, model_id, vid, e.details)
            return e.code
        except Exception as e:  # noqa: BLE001 - a bug fails this version alone, told as one
            log.error("model %s/%s version %s: training failed", app, model_id, vid, exc_info=e)
            self.models.set_version(app, model_id, vid, clarifai.MODEL_TRAINING_FAILED,
                                    f"internal error ({type(e).__name__})", completed=time.time())
            return clarifai.MODEL_TRAINING_FAILED
        meta["train_seconds"] = round(time.perf_counter() - start, 3)
        head.meta.update({"app": app, "model_id": model_id, "version_id": vid})
        rel = self.models.head_dir(app, model_id).relative_to(self.models.heads) / f"{vid}.npz"
        learn.save(head, self.models.heads / rel)
        old = self.models.version(app, model_id, vid) or {"meta": {}}
        self.models.set_version(app, model_id, vid, clarifai.MODEL_TRAINED, None, completed=time.time(),
                                head=rel.as_posix(), model_sha256=self.model_sha256, inputs=n,
                                meta={**old["meta"], **meta})
        return clarifai.MODEL_TRAINED


def training_data(store: AppStore, app: str, concepts: list[str], key: str
                  ) -> tuple[list[str], np.ndarray, list[learn.Annotation]]:
    """The annotated inputs of ``concepts`` in ``app`` (their ids and embeddings under ``key``) and their
    annotations (1: positive, 0: negative). Raises :class:`ApiError` 21110/21111 when there is nothing to learn."""
    ann: list[learn.Annotation] = []
    no_pos = []
    for c in concepts:
        pos, neg = store.annotated(app, c, 1), store.annotated(app, c, 0)
        if not pos:
            no_pos.append(c)
        ann += [learn.Annotation(i, c, True, "app") for i in sorted(pos)]
        ann += [learn.Annotation(i, c, False, "app") for i in sorted(neg)]
    if not ann:
        raise ApiError(clarifai.MODEL_TRAINING_NO_DATA, f"no input of app {app!r} is annotated with "
                       f"{', '.join(map(repr, concepts))}: annotate inputs (value 1 for a positive, 0 for a negative) "
                       "and train again")
    if no_pos:
        raise ApiError(clarifai.MODEL_TRAINING_NO_POSITIVES, f"no positive example (an input annotated with value 1) "
                       f"of {', '.join(map(repr, no_pos))} in app {app!r}")
    ids, mat = store.matrix(app, key)
    row = {i: n for n, i in enumerate(ids)}
    keys = sorted({a.key for a in ann if a.key in row})
    ann = [a for a in ann if a.key in row]  # an input without an embedding (failed, or another model's) is skipped
    if not keys:
        raise ApiError(clarifai.MODEL_TRAINING_NO_DATA, "no annotated input has an embedding of this server's model")
    return keys, mat[[row[k] for k in keys]], ann


def train_head(store: AppStore, app: str, model: dict, key: str, model_sha256: str, model_name: str,
               prior: Callable[[str], tuple[np.ndarray, float] | None]) -> tuple[learn.Head, dict, int]:
    """A head for ``model``'s concepts from the app's annotations → (head, metadata, inputs used).
    The head's concept names are the model's concept ids. Raises :class:`ApiError` (2111x) with the reason."""
    concepts = list(model["concepts"])
    keys, emb, ann = training_data(store, app, concepts, key)
    by_norm = {}
    for c in concepts:
        n = learn.normalize_name(c)
        if n in by_norm:
            raise ApiError(clarifai.MODEL_TRAINING_INVALID_PARAMS, f"concepts {by_norm[n]!r} and {c!r} are one name")
        by_norm[n] = c
    t = learn.targets(keys, emb, ann)
    names = dict(store.concepts(app))
    priors = {}
    for n in t.concepts:
        cid = by_norm[n]
        p = prior(names.get(cid) or cid) or prior(cid)
        if p is not None:
            priors[n] = p
    try:
        head = learn.train(emb, t, model_sha256=model_sha256, model=model_name, priors=priors, name=model["id"],
                           provenance={"source": {"app": app, "inputs": len(keys)}})
    except learn.TooFewExamples as e:
        raise ApiError(clarifai.MODEL_TRAINING_INSUFFICIENT_DATA, str(e)) from None
    head.names = [by_norm[n] for n in t.concepts]
    meta = {"concepts": [{**c, "concept": by_norm[c["concept"]]} for c in head.meta["concepts"]],
            "contradictions": head.meta["contradictions"], "model": model_name, "model_sha256": model_sha256}
    return head, meta, len(keys)
