"""Tag on upload: real Directus flows calling a live localtag server on 127.0.0.1; no mocks.

- the flow `localtag directus install-flow` makes: a real upload fires it, and the model's tags appear
  next to the person's;
- the Clarifai tutorial's own four-operation flow, pointed at localtag's Clarifai route;
- the endpoint's secret, non-images, and its background retries while Directus is down.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import numpy as np
import pytest
from directus_harness import DirectusClient
from live_server import LiveServer
from test_directus_sync import model_settings

from localtag import cli
from localtag.core.decode import decode
from localtag.core.loader import Loaded, load
from localtag.directus.client import FLOW_PATH, SECRET_HEADER
from localtag.directus.tag_merge import PROVENANCE_FIELD
from tests.directus_fixtures import wait_for

pytestmark = pytest.mark.directus

MARKER = f"flow-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def settings(request, tmp_path_factory, directus):
    return model_settings(request, tmp_path_factory.mktemp("flow"), directus_url=directus.url,
                          directus_token=directus.token, flow_secret=directus.flow_secret,
                          allow_hosts=[f"127.0.0.1:{directus.port}"])


@pytest.fixture(scope="module")
def loaded(settings):
    return load(settings)


@pytest.fixture(scope="module")
def tagger(loaded):
    return loaded.tagger


@pytest.fixture(scope="module")
def live(settings, loaded):
    with LiveServer(settings, loaded) as server:
        yield server


@pytest.fixture(scope="module")
def client(directus):
    with DirectusClient(directus.url, directus.token) as c:
        yield c


def model_values(loaded: Loaded, data: bytes) -> dict[str, float]:
    """The model's own value for every concept of one image, computed here, outside the server."""
    tagger, encoder = loaded
    values = tagger.values(encoder.embed([decode(data)]))[0]
    return {c.name: float(v) for c, v in zip(tagger.vocab, values, strict=True)}


def test_upload_fires_the_installed_flow_and_tags_appear(capsys, directus, client, live, loaded, tagger, coco_images):
    name = f"localtag {MARKER}"
    argv = ["directus", "install-flow", "--directus-url", directus.url, "--token", directus.token,
            "--localtag-url", live.base, "--name", name]
    try:
        assert cli.main(argv) == 0 and cli.main(argv) == 0  # a re-run updates in place
        out, err = capsys.readouterr()
        first, second = (json.loads(line) for line in out.splitlines())
        assert first["flow"] == second["flow"] and second["url"] == live.base + FLOW_PATH
        assert len(client.find_flows(name)) == 1
        assert directus.flow_secret not in out + err and directus.token not in out + err

        text = client.upload(b"not a picture\n", "readme.txt", title=MARKER)
        photo = coco_images[3].read_bytes()
        image = client.upload(photo, "upload.jpg", title=MARKER, tags=["my trip", "Cat"])
        row = wait_for(lambda: (r := client.get_file(image["id"])).get(PROVENANCE_FIELD) and r)
        prov = row[PROVENANCE_FIELD]
        assert row["tags"] == ["my trip", "Cat", *prov["tags"]]
        assert prov["run"] == "flow" and prov["model_sha256"] == tagger.info.sha256
        assert prov["vocab_sha256"] == tagger.vocab.sha256
        # the tags are the model's best for this photo (a person's "Cat" stays theirs), with its values
        expected = model_values(loaded, photo)
        best = [t.name for t in tagger.pick(np.array(list(expected.values())), max_concepts=3)]
        assert prov["tags"] == [n for n in best if n.casefold() != "cat"] and prov["tags"]
        for tag, value in prov["values"].items():
            assert value == pytest.approx(expected[tag], abs=2e-3)
        assert client.get_file(text["id"])["tags"] is None
        assert client.get_file(text["id"]).get(PROVENANCE_FIELD) is None
        # the flow's log (every run's revision), the activity and the operations never hold the secret
        runs = client._data("GET", "/revisions", params={"limit": -1, "fields": "data,delta", "filter": json.dumps(
            {"collection": {"_eq": "directus_flows"}})})
        steps = [st for r in runs if isinstance(r["data"], dict) for st in r["data"].get("steps") or []]
        assert any(st["key"] == "localtag" and st["status"] == "resolve" for st in steps), steps
        everything = json.dumps([runs, client._data("GET", "/revisions", params={"limit": -1}),
                                 client._data("GET", "/activity", params={"limit": -1}),
                                 client._data("GET", "/operations", params={"limit": -1})])
        assert directus.flow_secret not in everything
        assert "--redacted:LOCALTAG_FLOW_SECRET--" in everything
    finally:
        assert cli.main(["directus", "uninstall-flow", "--directus-url", directus.url, "--token", directus.token,
                         "--name", name]) == 0
        capsys.readouterr()
    assert client.find_flows(name) == []


def test_the_clarifai_tutorial_flow_works_unchanged(directus, client, live, loaded, tagger, coco_images):
    name = f"tutorial {MARKER}"
    try:
        client.install_tutorial_flow(name, live.base, "any-pat", directus.url, directus.token, threshold=0.0)
        photo = coco_images[5].read_bytes()
        image = client.upload(photo, "tutorial.jpg", title=MARKER)
        tags = wait_for(lambda: client.get_file(image["id"])["tags"])
    finally:
        client.uninstall_flow(name)
    # what localtag's Clarifai route says for the same asset URL, asked directly
    url = f"{directus.url}/assets/{image['id']}?access_token={directus.token}"
    answer = httpx.post(f"{live.base}/v2/models/general-image-recognition/outputs",
                        json={"inputs": [{"data": {"image": {"url": url}}}]}, timeout=30).json()
    concepts = answer["outputs"][0]["data"]["concepts"]
    assert tags == [c["name"] for c in concepts] and tags
    expected = model_values(loaded, photo)
    assert [c["value"] for c in concepts] == pytest.approx([expected[t] for t in tags], abs=2e-3)


def test_endpoint_checks_the_secret_and_skips_non_images(live, directus):
    SECRET = directus.flow_secret
    trigger = {"event": "files.upload", "key": str(uuid.uuid4()), "collection": "directus_files",
               "payload": {"type": "application/pdf", "filename_download": "a.pdf"}}
    with httpx.Client(base_url=live.base) as http:
        refused = http.get("/readyz").json()["directus_flow"]["refused_secret"]
        for headers in ({}, {SECRET_HEADER: "wrong"}, {SECRET_HEADER: SECRET + "x"}):
            r = http.post(FLOW_PATH, json={"trigger": trigger}, headers=headers)
            assert r.status_code == 401 and SECRET not in r.text
        # a Directus whose .env lost the secret is visible from outside, not only in its own logs
        assert http.get("/readyz").json()["directus_flow"]["refused_secret"] == refused + 3
        r = http.post(FLOW_PATH, json={"trigger": trigger}, headers={SECRET_HEADER: SECRET})
        assert r.status_code == 200 and r.json() == {"skipped": [trigger["key"]], "reason": "not an image (application/pdf)"}
        r = http.post(FLOW_PATH, content=b"{not json", headers={SECRET_HEADER: SECRET})
        assert r.status_code == 400
        r = http.post(FLOW_PATH, json={"trigger": {"event": "files.upload"}}, headers={SECRET_HEADER: SECRET})
        assert r.status_code == 400


def test_background_work_retries_while_directus_is_down(directus, client, live, coco_images):
    """The endpoint answers 202 at once; the download fails while Directus is stopped and is retried."""
    image = client.upload(coco_images[9], title=MARKER)  # no flow installed: we play the flow here
    trigger = {"event": "files.upload", "key": image["id"], "collection": "directus_files",
               "payload": {"type": "image/jpeg"}}
    SECRET = directus.flow_secret
    directus.stop()
    try:
        t0 = time.monotonic()
        r = httpx.post(live.base + FLOW_PATH, json={"trigger": trigger}, headers={SECRET_HEADER: SECRET})
        assert r.status_code == 202 and r.json() == {"queued": [image["id"]]}
        assert time.monotonic() - t0 < 2
        time.sleep(3)  # let the first attempts fail
    finally:
        directus.start()
    row = wait_for(lambda: (r := client.get_file(image["id"])).get(PROVENANCE_FIELD) and r, timeout=120)
    assert row["tags"] == row[PROVENANCE_FIELD]["tags"] and row["tags"]
