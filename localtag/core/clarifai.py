"""Clarifai's JSON schema and status codes: what a drop-in endpoint and ``tag --json`` emit.

The shapes follow Clarifai's public protos (``PostModelOutputs``, ``MultiOutputResponse``): a top-level
``status`` and, per input, an ``output`` with its own ``status``, ``model``, ``input`` and
``data.concepts[]``. Values are always present (the official clients read a missing value as 1.0).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from . import errors

# status codes (clarifai/api/status/status_code.proto)
SUCCESS = 10000
MIXED_STATUS = 10010
FAILURE = 10020
CONN_KEY_INVALID = 11008
CONN_KEY_NOT_FOUND = 11009
CONN_BAD_REQUEST_FORMAT = 11100
CONN_DOES_NOT_EXIST = 11101
CONN_INVALID_REQUEST = 11102
MODEL_DOES_NOT_EXIST = 21200
MODEL_INVALID_ARGUMENT = 21202
MODEL_TRAINED = 21100
# custom models (status_code.proto): a version's training states and why training failed
MODEL_TRAINING = 21101
MODEL_UNTRAINED = 21102
MODEL_QUEUED_FOR_TRAINING = 21103
MODEL_TRAINING_FAILED = 21106
MODEL_TRAINING_NO_DATA = 21110
MODEL_TRAINING_NO_POSITIVES = 21111
MODEL_TRAINING_INSUFFICIENT_DATA = 21117
MODEL_TRAINING_INVALID_PARAMS = 21118
INPUT_DOWNLOAD_FAILED = 30002  # INPUT_FAILED in the proto; Clarifai sends it for failed downloads
INPUT_UNSUPPORTED_FORMAT = 30101
INPUT_INVALID_ARGUMENT = 30104
INPUT_OVER_LIMIT = 30105
INPUT_INVALID_URL = 30106
PREDICT_INVALID_REQUEST = 40001
INTERNAL_SERVER_ISSUE = 98004
MODEL_BUSY = 21354  # MODEL_BUSY_PLEASE_RETRY: the official SDK retries it
CONN_THROTTLED = 11005
SEARCH_BY_NOT_FULLY_INDEXED_INPUT = 43004

DESCRIPTIONS = {
    SUCCESS: "Ok",
    MIXED_STATUS: "Mixed Success",
    FAILURE: "Failure",
    CONN_KEY_INVALID: "API key is invalid",
    CONN_KEY_NOT_FOUND: "API key not found",
    CONN_BAD_REQUEST_FORMAT: "Bad request format",
    CONN_DOES_NOT_EXIST: "Resource does not exist",
    CONN_INVALID_REQUEST: "Invalid request",
    MODEL_DOES_NOT_EXIST: "Model does not exist",
    MODEL_INVALID_ARGUMENT: "Invalid model argument",
    MODEL_TRAINED: "Model is trained and ready for deployment",
    MODEL_TRAINING: "Model is currently training",
    MODEL_UNTRAINED: "Model has not yet been trained",
    MODEL_QUEUED_FOR_TRAINING: "Model is currently in queue for training",
    MODEL_TRAINING_FAILED: "Model training had an error",
    MODEL_TRAINING_NO_DATA: "Custom model training had no data",
    MODEL_TRAINING_NO_POSITIVES: "Custom model training had no positive examples",
    MODEL_TRAINING_INSUFFICIENT_DATA: "Custom model training had insufficient data",
    MODEL_TRAINING_INVALID_PARAMS: "Invalid parameters for model training",
    INPUT_DOWNLOAD_FAILED: "Download failed; check URL",
    INPUT_UNSUPPORTED_FORMAT: "Input data format is not supported",
    INPUT_INVALID_ARGUMENT: "Invalid input argument",
    INPUT_OVER_LIMIT: "Input is over the size limit",
    INPUT_INVALID_URL: "Invalid URL",
    PREDICT_INVALID_REQUEST: "Invalid request",
    INTERNAL_SERVER_ISSUE: "Internal server issue",
    MODEL_BUSY: "Model is busy; please retry",
    CONN_THROTTLED: "Making too many requests",
    SEARCH_BY_NOT_FULLY_INDEXED_INPUT: "Input is not fully indexed yet",
}

# how a failed image maps to an output status
IMAGE_ERROR_CODES = {
    errors.NOT_IMAGE: INPUT_UNSUPPORTED_FORMAT,
    errors.CORRUPT: INPUT_INVALID_ARGUMENT,
    errors.TOO_MANY_PIXELS: INPUT_OVER_LIMIT,
    errors.TOO_MANY_BYTES: INPUT_OVER_LIMIT,
    errors.FETCH_FAILED: INPUT_DOWNLOAD_FAILED,
    errors.NOT_FOUND: INPUT_DOWNLOAD_FAILED,
    errors.URL_REFUSED: INPUT_INVALID_URL,
    errors.INTERNAL: INTERNAL_SERVER_ISSUE,
}

GENERAL_MODEL_ID = "general-image-recognition"
GENERAL_MODEL_VERSION = "aa7f35c01e0642fda5cf400f543e7c40"
LEGACY_GENERAL_MODEL_ID = "aaa03c23b3724a16a56b629203edc62c"
APP_ID = "main"
USER_ID = "clarifai"
EPOCH = "2016-06-06T00:00:00Z"


def now() -> str:
    """RFC 3339 with nanosecond-style precision, as Clarifai writes it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id() -> str:
    return secrets.token_hex(16)


def status(code: int, description: str | None = None, details: str | None = None,
           req_id: str | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {"code": code, "description": description or DESCRIPTIONS.get(code, "")}
    if details:
        s["details"] = details
    if req_id:
        s["req_id"] = req_id
    return s


def image_error_status(err: errors.ImageError) -> dict[str, Any]:
    return status(IMAGE_ERROR_CODES.get(err.kind, INPUT_INVALID_ARGUMENT), details=err.message)


def model_json(model_id: str = GENERAL_MODEL_ID, version_id: str = GENERAL_MODEL_VERSION,
               name: str = "Image Recognition", app_id: str = APP_ID, user_id: str = USER_ID,
               **extra: Any) -> dict[str, Any]:
    m = {
        "id": model_id,
        "name": name,
        "created_at": EPOCH,
        "app_id": app_id,
        "user_id": user_id,
        "model_type_id": "visual-classifier",
        "model_version": {"id": version_id, "created_at": EPOCH, "status": status(MODEL_TRAINED)},
    }
    m.update(extra)
    return m


def concept_json(tag: Any, app_id: str = APP_ID, user_id: str = USER_ID) -> dict[str, Any]:
    return {"id": tag.id, "name": tag.name, "value": round(float(tag.value), 7), "app_id": app_id,
            "user_id": user_id}


def output_json(
    input_id: str,
    input_data: dict[str, Any],
    model: dict[str, Any],
    tags: Sequence[Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One output. ``error`` is a status dict for a failed input; ``tags`` the concepts otherwise."""
    out: dict[str, Any] = {
        "id": new_id(),
        "status": error or status(SUCCESS),
        "created_at": now(),
        "model": model,
        "input": {"id": input_id, "data": input_data},
        "data": {} if error else {"concepts": [concept_json(t, model.get("app_id", APP_ID),
                                                             model.get("user_id", USER_ID)) for t in tags or ()]},
    }
    return out


def batch_code(total: int, failed: int) -> int:
    """Clarifai's rule for a response's own status: Ok, Failure when every input failed, else Mixed."""
    if not total or not failed:
        return SUCCESS
    return FAILURE if failed == total else MIXED_STATUS


def overall_status(outputs: Iterable[dict[str, Any]], req_id: str | None = None) -> dict[str, Any]:
    codes = [o["status"]["code"] for o in outputs]
    return status(batch_code(len(codes), sum(c != SUCCESS for c in codes)), req_id=req_id)


def response(outputs: list[dict[str, Any]], req_id: str | None = None) -> dict[str, Any]:
    return {"status": overall_status(outputs, req_id or new_id()), "outputs": outputs}


def error_response(code: int, details: str | None = None, description: str | None = None,
                   req_id: str | None = None) -> dict[str, Any]:
    return {"status": status(code, description, details, req_id or new_id())}
