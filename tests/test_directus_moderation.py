"""The recipe docs/recipes/reject-explicit-uploads.json on a real Directus with a live localtag server.

The flow file is installed exactly as docs/directus.md says (POST /flows with its operations, URLs and
the threshold edited). Directus 11.3.5 fires no filter event on an upload (FilesService.uploadOne
creates the row with emitEvents false), so the recipe is an action flow on ``files.upload`` that
deletes the file, row and bytes, right after. The fixture model knows no "explicit": the test asks
localtag for two photos' explicit values first and puts the threshold between them, so the flow's
comparison, not a hard-coded answer, decides which upload goes.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import httpx
import pytest
from directus_harness import DirectusClient, DirectusServer
from live_server import LiveServer
from test_directus_sync import model_settings

from localtag.core.loader import load
from tests.directus_fixtures import wait_for

pytestmark = pytest.mark.directus

RECIPE = Path(__file__).resolve().parents[1] / "docs" / "recipes" / "reject-explicit-uploads.json"
TOKEN_ENV = "LOCALTAG_MODERATION_TOKEN"


@pytest.fixture(scope="module")
def directus_mod():
    """A Directus of its own: the recipe reads a token from Directus's environment (FLOWS_ENV_ALLOW_LIST)."""
    server = DirectusServer(extra_env={"FLOWS_ENV_ALLOW_LIST": f"LOCALTAG_FLOW_SECRET,{TOKEN_ENV}"})
    server.env[TOKEN_ENV] = server.token  # the admin's static token, made at bootstrap
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture(scope="module")
def live(request, tmp_path_factory, directus_mod):
    settings = model_settings(request, tmp_path_factory.mktemp("moderation"),
                              allow_hosts=[f"127.0.0.1:{directus_mod.port}"])
    with LiveServer(settings, load(settings)) as server:
        yield server


@pytest.fixture(scope="module")
def client(directus_mod):
    with DirectusClient(directus_mod.url, directus_mod.token) as c:
        yield c


def recipe(directus_url: str, localtag_url: str, threshold: float) -> dict:
    """The documented flow with its two URLs and the threshold edited, as a user does."""
    text = RECIPE.read_text()
    assert text.count("http://127.0.0.1:8055") == 2 and text.count("http://127.0.0.1:8080") == 1
    text = text.replace("http://127.0.0.1:8055", directus_url).replace("http://127.0.0.1:8080", localtag_url)
    assert text.count("const THRESHOLD = 0.5;") == 1
    return json.loads(text.replace("const THRESHOLD = 0.5;", f"const THRESHOLD = {threshold!r};"))


def install(client: DirectusClient, flow: dict) -> str:
    """docs/directus.md's two calls: POST /flows (operations nested), PATCH its first operation."""
    first = flow.pop("operation")
    flow_id = client._data("POST", "/flows", params={"fields": "id"}, json=flow)["id"]
    client._data("PATCH", f"/flows/{flow_id}", params={"fields": "id"}, json={"operation": first})
    return flow_id


def install_ready(client: DirectusClient, flow: dict) -> str:
    """`install`, then wait until Directus runs the new flow: it reloads its flows in the background after a
    change, and an upload in between goes to the flows it had (a deleted one included). A small text file is
    uploaded until its run shows in the new flow's log (not an image: the flow stops at its first step)."""
    flow_id = install(client, flow)

    def probe_ran() -> bool:
        probe = client.upload(b"probe\n", "probe.txt", title="probe")
        try:
            return bool(wait_for(lambda: probe["id"] in flow_runs(client, flow_id), timeout=5))
        except AssertionError:
            return False

    wait_for(probe_ran, timeout=90)
    return flow_id


def explicit_value(live: LiveServer, photo: bytes) -> float:
    answer = httpx.post(f"{live.base}/v2/models/moderation-recognition/outputs", timeout=60, json={
        "inputs": [{"data": {"image": {"base64": base64.b64encode(photo).decode()}}}],
        "model": {"output_info": {"output_config": {"min_value": 0, "max_concepts": 5}}}}).json()
    concepts = answer["outputs"][0]["data"]["concepts"]
    assert sum(c["value"] for c in concepts) == pytest.approx(1, abs=1e-4)
    return next(c["value"] for c in concepts if c["name"] == "explicit")


def flow_runs(client: DirectusClient, flow_id: str) -> dict[str, dict]:
    """{file key: that run's keyed data} from the flow's log (one revision per run)."""
    revs = client._data("GET", "/revisions", params={"limit": -1, "fields": "data", "filter": json.dumps(
        {"_and": [{"collection": {"_eq": "directus_flows"}}, {"item": {"_eq": flow_id}}]})})
    return {r["data"]["data"]["$trigger"]["key"]: r["data"] for r in revs
            if isinstance(r["data"], dict) and "steps" in r["data"]}  # not the flow's own edits


def gone(client: DirectusClient, key: str) -> bool:
    """No row (a GET of a missing file id is 403 in Directus, so ask with a filter)."""
    return client.files_by_id([key], ["id"]).get(key) is None


def test_the_recipe_deletes_the_upload_judged_explicit_and_keeps_the_other(directus_mod, client, live, coco_images):
    values = {p: explicit_value(live, p.read_bytes()) for p in coco_images[:8]}
    ranked = sorted(values, key=values.get)
    low, high = ranked[0], ranked[-1]
    assert values[high] - values[low] > 1e-4, values  # two photos the threshold can tell apart
    threshold = (values[low] + values[high]) / 2
    flow_id = install_ready(client, recipe(directus_mod.url, live.base, threshold))
    marker = uuid.uuid4().hex[:8]
    kept = client.upload(low, title=marker)
    rejected = client.upload(high, title=marker)
    text = client.upload(b"not a picture\n", "notes.txt", title=marker)

    ours = {kept["id"], rejected["id"], text["id"]}
    runs = wait_for(lambda: ours <= set(r := flow_runs(client, flow_id)) and r, timeout=90)
    judged = {key: run["data"]["judge"] for key, run in runs.items() if "judge" in run["data"]}
    assert judged[kept["id"]] == {"explicit": pytest.approx(values[low], abs=2e-3), "threshold": threshold,
                                  "reject": False}
    assert judged[rejected["id"]] == {"explicit": pytest.approx(values[high], abs=2e-3), "threshold": threshold,
                                      "reject": True}
    assert text["id"] not in judged  # not an image: the flow stops at its first condition
    steps = {key: [(s["key"], s["status"]) for s in run["steps"]] for key, run in runs.items()}
    assert steps[rejected["id"]][-1] == ("delete_file", "resolve")
    assert ("delete_file", "resolve") not in steps[kept["id"]]

    assert wait_for(lambda: gone(client, rejected["id"]))
    uploads = Path(directus_mod.env["STORAGE_LOCAL_ROOT"])
    assert not list(uploads.glob(f"{rejected['id']}*"))  # the bytes went with the row
    assert client.get_file(kept["id"])["id"] == kept["id"] and list(uploads.glob(f"{kept['id']}*"))
    assert client.get_file(text["id"])["id"] == text["id"]
    everything = json.dumps([client._data("GET", "/revisions", params={"limit": -1}),
                             client._data("GET", "/operations", params={"limit": -1})])
    assert directus_mod.token not in everything  # the token comes from Directus's environment, redacted


def test_threshold_above_one_keeps_everything_and_zero_rejects_everything(directus_mod, client, live, coco_images):
    photo = coco_images[2]
    for threshold, stays in ((1.01, True), (0.0, False)):
        client.uninstall_flow(recipe(directus_mod.url, live.base, 0.5)["name"])
        flow_id = install_ready(client, recipe(directus_mod.url, live.base, threshold))
        image = client.upload(photo, title=f"t{threshold}")
        run = wait_for(lambda: flow_runs(client, flow_id).get(image["id"]), timeout=90)  # noqa: B023
        assert run["data"]["judge"]["reject"] is not stays
        if stays:
            assert client.get_file(image["id"])["id"] == image["id"]
        else:
            assert wait_for(lambda: gone(client, image["id"]))  # noqa: B023
