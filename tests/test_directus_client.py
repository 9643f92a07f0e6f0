"""localtag.directus against a real Directus (tests/directus_fixtures.py); no mocks.

The small HTTP servers here are real sockets on 127.0.0.1: a flaky server for the retry tests and a
receiver that plays localtag for the flows.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import COCO_DIR
from directus_harness import DirectusClient
from PIL import Image

from localtag.directus.client import DirectusAuthError, DirectusError, DirectusNotFoundError
from tests.directus_fixtures import wait_for

pytestmark = pytest.mark.directus

COCO = COCO_DIR  # ../shared/data beside the project root, as conftest finds it
MARKER = f"localtag-test-{uuid.uuid4().hex[:8]}"  # title of this module's files
OURS = {"title": {"_eq": MARKER}}


# ---------------------------------------------------------------- a tiny local HTTP server

Reply = tuple[int, dict[str, str], bytes]


class LocalServer:
    """ThreadingHTTPServer on 127.0.0.1 that records requests and answers with `reply(n, request)`."""

    def __init__(self, reply: Callable[[int, dict], Reply]):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                outer.requests.append(req)
                status, headers, payload = reply(len(outer.requests), req)
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(data: object) -> bytes:
    return json.dumps({"data": data}).encode()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def client(directus) -> Iterator[DirectusClient]:
    with DirectusClient(directus.url, directus.token) as c:
        yield c


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def uploaded(client: DirectusClient) -> dict:
    """All of coco128 plus a PNG (images) and a text file, titled MARKER. {'images': {id: bytes}, 'text': id}."""
    images: dict[str, bytes] = {}
    for path in sorted(COCO.glob("*.jpg")):
        images[client.upload(path, title=MARKER)["id"]] = path.read_bytes()
    png = client.upload(png_bytes(), "red.png", title=MARKER)
    assert png["type"] == "image/png" and png["width"] == 40
    images[png["id"]] = png_bytes()
    text = client.upload(b"not an image\n", "notes.txt", title=MARKER)
    assert text["type"].startswith("text/")
    return {"images": images, "text": text["id"], "png": png["id"]}


# ---------------------------------------------------------------- files


def test_iter_files_pages_each_file_once_while_tags_are_written(client, uploaded):
    images = uploaded["images"]
    assert len(images) > 100
    untagged = {"_and": [OURS, {"tags": {"_null": True}}]}
    # Directus 12 fills `tags` at upload from keywords embedded in a photo: those files start tagged
    expected = {i for i, row in client.files_by_id(list(images), ["tags"]).items() if row.get("tags") is None}
    assert len(expected) > 100
    seen = []
    for f in client.iter_files(untagged, page_size=7):
        seen.append(f["id"])
        assert f["type"].startswith("image/") and {"tags", "filename_download", "width"} <= f.keys()
        client.set_tags(f["id"], ["walked"])  # the filter stops matching it: offsets would skip files
    assert len(seen) == len(set(seen)) == len(expected)
    assert set(seen) == expected and seen == sorted(seen)
    assert client.count_files(untagged) == 0


def test_images_only_and_count(client, uploaded):
    n = len(uploaded["images"])
    assert client.count_files(OURS) == n
    assert client.count_files(OURS, images_only=False) == n + 1
    all_ids = {f["id"] for f in client.iter_files(OURS, page_size=50, images_only=False)}
    assert uploaded["text"] in all_ids and uploaded["text"] not in {f["id"] for f in client.iter_files(OURS)}


def test_download_original_and_rendition(client, uploaded):
    for file_id in (uploaded["png"], next(iter(uploaded["images"]))):
        assert client.download(file_id) == uploaded["images"][file_id]
    jpg_id = next(iter(uploaded["images"]))
    small = client.download(jpg_id, width=96, height=96)
    assert len(small) < len(uploaded["images"][jpg_id])
    img = Image.open(io.BytesIO(small))
    img.load()
    assert img.format == "JPEG" and max(img.size) == 96
    with pytest.raises(DirectusError, match="limit"):
        client.download(jpg_id, max_bytes=1000)


def test_set_tags_round_trip(client, uploaded):
    file_id = uploaded["png"]
    client.set_tags(file_id, ["cat", "animal"])
    assert client.get_file(file_id)["tags"] == ["cat", "animal"]
    client.set_tags(file_id, [])
    assert client.get_file(file_id, fields=["tags"]) == {"tags": []}
    with pytest.raises(DirectusNotFoundError):
        client.set_tags(str(uuid.uuid4()), ["x"])


def test_wrong_token_is_an_auth_error_without_the_token(directus):
    token = "wrong-" + uuid.uuid4().hex
    with DirectusClient(directus.url, token, retries=0) as bad:
        with pytest.raises(DirectusAuthError) as err:
            bad.count_files()
    assert err.value.status == 401 and err.value.code == "INVALID_CREDENTIALS"
    assert "token" in str(err.value) and token not in str(err.value) and token not in repr(err.value)
    assert token not in repr(bad)


def test_other_4xx_is_a_directus_error_with_code(client):
    with pytest.raises(DirectusError) as err:
        client.count_files({"tags": {"_eq": "x"}})  # json fields allow only _null/_nnull
    assert not isinstance(err.value, DirectusAuthError)
    assert err.value.status == 400 and err.value.code == "INVALID_QUERY"


# ---------------------------------------------------------------- flows


def flows_named(client: DirectusClient, name: str) -> list[dict]:
    params = {"filter": json.dumps({"name": {"_eq": name}}), "fields": "*,operations.*"}
    return client._data("GET", "/flows", params=params)


def test_install_flow_is_idempotent_and_delivers_the_trigger(client, uploaded, directus):
    name = f"localtag {MARKER}"
    with LocalServer(lambda n, req: (202, {}, b'{"queued": true}')) as receiver:
        try:
            first = client.install_flow(name, receiver.url + "/hooks/directus", "SOME_OTHER_NAME")
            second = client.install_flow(name, receiver.url + "/hooks/directus")
            assert first == second
            (flow,) = flows_named(client, name)
            assert flow["status"] == "active" and flow["trigger"] == "event"
            assert flow["options"] == {"type": "action", "scope": ["files.upload"]}
            (op,) = flow["operations"]
            assert flow["operation"] == op["id"] and op["type"] == "request"
            # the secret comes from Directus's environment at each run; it is not stored in Directus
            assert op["options"]["headers"][0] == {"header": "X-Localtag-Secret",
                                                   "value": "{{$env.LOCALTAG_FLOW_SECRET}}"}

            new = client.upload(png_bytes(), "flow.png", title=MARKER)
            req = wait_for(lambda: receiver.requests and receiver.requests[-1])
            assert req["method"] == "POST" and req["path"] == "/hooks/directus"
            assert req["headers"]["X-Localtag-Secret"] == directus.flow_secret
            assert req["headers"]["Content-Type"].startswith("application/json")
            trigger = json.loads(req["body"])["trigger"]
            assert trigger["event"] == "files.upload" and trigger["key"] == new["id"]
            assert trigger["collection"] == "directus_files" and trigger["payload"]["type"] == "image/png"
        finally:
            assert client.uninstall_flow(name)
    assert flows_named(client, name) == []
    assert client._data("GET", "/operations", params={"filter": json.dumps({"flow": {"_eq": first}})}) == []
    assert client.uninstall_flow(name) is False


def test_tutorial_flow_tags_images_from_clarifai_answer(directus, client, uploaded):
    name = f"clarifai tutorial {MARKER}"
    concepts = [
        {"name": "cat", "value": 0.99},
        {"name": "dog", "value": 0.5},
        {"name": "animal", "value": 0.97},
    ]
    answer = json.dumps({"status": {"code": 10000}, "outputs": [{"data": {"concepts": concepts}}]}).encode()
    with LocalServer(lambda n, req: (200, {}, answer)) as clarifai:
        try:
            client.install_tutorial_flow(name, clarifai.url, "test-pat", directus.url, directus.token)
            (flow,) = flows_named(client, name)
            by_key = {op["key"]: op for op in flow["operations"]}
            assert {k: op["type"] for k, op in by_key.items()} == {
                "is_image": "condition",
                "clarifai": "request",
                "concepts": "exec",
                "set_tags": "item-update",
            }
            assert flow["operation"] == by_key["is_image"]["id"]
            assert by_key["is_image"]["resolve"] == by_key["clarifai"]["id"]
            assert by_key["concepts"]["resolve"] == by_key["set_tags"]["id"]

            text = client.upload(b"plain text\n", "skip.txt", title=MARKER)
            image = client.upload(png_bytes(), "tutorial.png", title=MARKER)
            wait_for(lambda: client.get_file(image["id"])["tags"] == ["cat", "animal"])
            (req,) = clarifai.requests  # the condition stopped the text file
            assert req["path"] == "/v2/models/general-image-recognition/outputs"
            assert req["headers"]["Authorization"] == "key test-pat"
            url = json.loads(req["body"])["inputs"][0]["data"]["image"]["url"]
            assert url.startswith(f"{directus.url}/assets/{image['id']}?access_token=")
            assert httpx.get(url).content == png_bytes()
            assert client.get_file(text["id"])["tags"] is None
        finally:
            client.uninstall_flow(name)


# ---------------------------------------------------------------- retries (local flaky server)


def test_retries_503_then_succeeds():
    def reply(n: int, req: dict) -> Reply:
        return (503, {}, b'{"errors":[{"message":"busy"}]}') if n <= 2 else (200, {}, ok({"id": "abc"}))

    with LocalServer(reply) as srv, DirectusClient(srv.url, "t", backoff=0.01) as c:
        assert c.get_file("abc") == {"id": "abc"}
        assert len(srv.requests) == 3
        assert srv.requests[0]["headers"]["Authorization"] == "Bearer t"


def test_retry_after_is_honoured_and_auth_errors_are_not_retried():
    def reply(n: int, req: dict) -> Reply:
        if req["path"].startswith("/files/denied"):
            return (
                401,
                {},
                b'{"errors":[{"message":"Invalid user credentials.","extensions":{"code":"INVALID_CREDENTIALS"}}]}',
            )
        return (429, {"Retry-After": "1"}, b"{}") if n == 1 else (200, {}, ok({"id": "x"}))

    with LocalServer(reply) as srv, DirectusClient(srv.url, "secret-token", backoff=0.01) as c:
        t0 = time.monotonic()
        assert c.get_file("x") == {"id": "x"}
        assert time.monotonic() - t0 >= 0.9 and len(srv.requests) == 2
        with pytest.raises(DirectusAuthError) as err:
            c.get_file("denied")
        assert len(srv.requests) == 3 and "secret-token" not in str(err.value)


def test_gives_up_after_retries():
    with (
        LocalServer(lambda n, req: (500, {}, b"boom")) as srv,
        DirectusClient(srv.url, "t", retries=2, backoff=0.01) as c,
    ):
        with pytest.raises(DirectusError, match="after 3 attempts"):
            c.get_file("x")
        assert len(srv.requests) == 3
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with DirectusClient(f"http://127.0.0.1:{port}", "t", retries=2, backoff=0.01) as c:
        with pytest.raises(DirectusError, match="ConnectError after 3 attempts"):
            c.get_file("x")


# ---------------------------------------------------------------- crash and restart (keep last)


def test_killed_directus_restarts_with_its_files(directus, client, uploaded):
    before = client.count_files(OURS)
    kept = client.upload(png_bytes(), "kept.png", title=MARKER)
    directus.kill()
    with (
        pytest.raises(DirectusError),
        DirectusClient(directus.url, directus.token, retries=1, backoff=0.01) as c,
    ):
        c.count_files()
    port = directus.port
    directus.restart()
    assert directus.port == port
    assert client.count_files(OURS) == before + 1
    assert client.download(kept["id"]) == png_bytes()
