"""The offline Clarifai app through Clarifai's official JSON client (clarifai-grpc) against a live server with
the CIFAR fixture model: PostInputs, GetInputCount, searches by text / image / concept, deletion, restart."""

from __future__ import annotations

import base64
import time

import httpx
import pytest
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import resources_pb2 as r
from clarifai_grpc.grpc.api import service_pb2 as s
from clarifai_grpc.grpc.api import service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2 as sc
from conftest import CIFAR_CLASSES, extract_cifar
from live_server import ImageServer, LiveServer
from pydantic import SecretStr

from localtag.app.store import STATUS_IN_PROGRESS, STATUS_PENDING, AppStore, NewInput
from localtag.core.config import Settings

KEY = "app-key-1234"
MD = (("authorization", f"Key {KEY}"),)
APP = r.UserAppIDSet(user_id="me", app_id="photos")


@pytest.fixture(scope="module")
def cifar21(tmp_path_factory):
    return extract_cifar(tmp_path_factory.mktemp("cifar21"), per_class=30)


@pytest.fixture(scope="module")
def settings(fixture_model, cache_dir, tmp_path_factory):
    return Settings(model=str(fixture_model), cache_dir=cache_dir, device="cpu", api_keys=[SecretStr(KEY)],
                    app_dir=tmp_path_factory.mktemp("apps"))


def stub(server):
    return service_pb2_grpc.V2Stub(ClarifaiChannel.get_json_channel(base_url=server.base))


def _search(st, query: r.Query, per_page: int = 10, app: r.UserAppIDSet = APP):
    resp = st.PostInputsSearches(s.PostInputsSearchesRequest(
        user_app_id=app, searches=[r.Search(query=query)], pagination=s.Pagination(page=1, per_page=per_page)),
        metadata=MD)
    assert resp.status.code == sc.SUCCESS, resp.status
    return resp.hits


def wait_processed(st, app, total: int, timeout: float = 180.0):
    """Poll GetInputCount until every input is processed or failed (what Clarifai's docs advise after an
    async PostInputs); returns the last counts."""
    deadline = time.monotonic() + timeout
    while True:
        counts = st.GetInputCount(s.GetInputCountRequest(user_app_id=app), metadata=MD).counts
        if counts.processed + counts.errors >= total and not counts.to_process and not counts.processing:
            return counts
        assert time.monotonic() < deadline, f"inputs not processed in {timeout} s: {counts}"
        time.sleep(0.2)


def test_app_through_the_official_client(settings, fixture_loaded, cifar21):
    labels = {}
    inputs = []
    for cls in CIFAR_CLASSES:
        for n, path in enumerate(cifar21[cls][:20]):
            iid = f"{cls}-{n}"
            labels[iid] = cls
            concepts = [r.Concept(id="vehicle", value=1.0)] if cls in ("ship", "truck") and n < 5 else []
            inputs.append(r.Input(id=iid, data=r.Data(image=r.Image(base64=path.read_bytes()), concepts=concepts)))
    with LiveServer(settings, fixture_loaded) as server:
        st = stub(server)
        for i in range(0, len(inputs), 128):  # async, as Clarifai: each input answers pending at once
            resp = st.PostInputs(s.PostInputsRequest(user_app_id=APP, inputs=inputs[i : i + 128]), metadata=MD)
            assert resp.status.code == sc.SUCCESS, resp.status
            assert all(x.status.code == sc.INPUT_DOWNLOAD_PENDING for x in resp.inputs)
        counts = wait_processed(st, APP, 200)
        assert (counts.processed, counts.errors) == (200, 0)
        got = st.GetInput(s.GetInputRequest(user_app_id=APP, input_id="ship-3"), metadata=MD)
        assert got.input.status.code == sc.INPUT_DOWNLOAD_SUCCESS
        # text search
        hits = _search(st, r.Query(ranks=[r.Rank(annotation=r.Annotation(data=r.Data(text=r.Text(raw="ship"))))]))
        text_ships = sum(labels[h.input.id] == "ship" for h in hits)
        assert all(0 <= h.score <= 1 for h in hits) and len(hits) == 10
        # image searches with the 10 held-out ships: the bar (>= 6 ships in the top 10) for the fixed
        # held-out ship the rest of this test queries with (ship #21), and for 8 of the 10 (measured with
        # the fixture model: 2, 9, 8, 10, 9, 9, 10, 10, 9, 8; ship #20 is an outlier no ranking tried in
        # bench/bench_app_quality.py lifts to 6 (at best 5); per-class figures over 8,000 queries: docs/app.md)
        image_ships = []
        for path in cifar21["ship"][20:30]:
            hits = _search(st, r.Query(ranks=[r.Rank(annotation=r.Annotation(data=r.Data(
                image=r.Image(base64=path.read_bytes()))))]))
            image_ships.append(sum(labels[h.input.id] == "ship" for h in hits))
        print(f"text 'ship': {text_ships}/10 ships; held-out ship images: {image_ships} ships in the top 10")
        assert text_ships >= 7
        assert image_ships[1] >= 6 and sum(x >= 6 for x in image_ships) >= 8 and sorted(image_ships)[5] >= 8
        held = cifar21["ship"][21].read_bytes()
        # a concept filter answers exactly the annotated inputs
        annotated = {f"{c}-{n}" for c in ("ship", "truck") for n in range(5)}
        flt = r.Filter(annotation=r.Annotation(data=r.Data(concepts=[r.Concept(id="vehicle", value=1.0)])))
        hits = _search(st, r.Query(filters=[flt]), per_page=100)
        assert {h.input.id for h in hits} == annotated
        neg = r.Filter(negate=True, annotation=r.Annotation(data=r.Data(concepts=[r.Concept(id="vehicle", value=1.0)])))
        hits = _search(st, r.Query(filters=[neg]), per_page=1000)
        assert len(hits) == 190 and not {h.input.id for h in hits} & annotated
        # deletion
        resp = st.DeleteInputs(s.DeleteInputsRequest(user_app_id=APP, ids=["ship-0", "ship-1"]), metadata=MD)
        assert resp.status.code == sc.SUCCESS
        got = st.GetInput(s.GetInputRequest(user_app_id=APP, input_id="ship-0"), metadata=MD)
        assert got.status.code != sc.SUCCESS
        hits = _search(st, r.Query(ranks=[r.Rank(annotation=r.Annotation(data=r.Data(image=r.Image(base64=held))))]),
                       per_page=200)
        assert len(hits) == 198 and not {"ship-0", "ship-1"} & {h.input.id for h in hits}
        before = [(h.input.id, round(h.score, 5)) for h in hits]
    # a crash left one input in progress and one pending in another app: the restarted server's worker
    # takes both up
    store = AppStore(settings.resolved_app_dir())
    store.add("me/crashed", [NewInput("c1", data=cifar21["cat"][25].read_bytes(), status=STATUS_IN_PROGRESS),
                             NewInput("c2", data=cifar21["dog"][25].read_bytes(), status=STATUS_PENDING)], "k")
    store.close()
    crashed = r.UserAppIDSet(user_id="me", app_id="crashed")
    with ImageServer({"ship.jpg": cifar21["ship"][29].read_bytes()}) as web, \
            LiveServer(settings.model_copy(update={"allow_hosts": [web.host]}), fixture_loaded) as server:
        st = stub(server)  # restart: nothing else lost
        assert wait_processed(st, crashed, 2).processed == 2
        assert len(_search(st, r.Query(ranks=[r.Rank(annotation=r.Annotation(data=r.Data(
            text=r.Text(raw="cat"))))]), per_page=10, app=crashed)) == 2
        assert st.GetInputCount(s.GetInputCountRequest(user_app_id=APP), metadata=MD).counts.processed == 198
        hits = _search(st, r.Query(ranks=[r.Rank(annotation=r.Annotation(data=r.Data(image=r.Image(base64=held))))]),
                       per_page=200)
        assert [(h.input.id, round(h.score, 5)) for h in hits] == before
        got = st.GetInput(s.GetInputRequest(user_app_id=APP, input_id="truck-3"), metadata=MD)
        assert got.status.code == sc.SUCCESS and [c.id for c in got.input.data.concepts] == ["vehicle"]
        listed = st.ListInputs(s.ListInputsRequest(user_app_id=APP, page=2, per_page=50), metadata=MD)
        assert len(listed.inputs) == 50
        # patch: merge a concept and metadata, then filter by metadata
        resp = st.PatchInputs(s.PatchInputsRequest(user_app_id=APP, action="merge", inputs=[r.Input(
            id="cat-0", data=r.Data(concepts=[r.Concept(id="pet", value=1.0)]))]), metadata=MD)
        assert resp.status.code == sc.SUCCESS
        flt = r.Filter(annotation=r.Annotation(data=r.Data(concepts=[r.Concept(id="pet", value=1.0)])))
        assert [h.input.id for h in _search(st, r.Query(filters=[flt]))] == ["cat-0"]
        concepts = st.ListConcepts(s.ListConceptsRequest(user_app_id=APP), metadata=MD)
        assert {c.id for c in concepts.concepts} == {"vehicle", "pet"}
        # an empty app answers empty; errors are Clarifai statuses
        empty = r.UserAppIDSet(user_id="me", app_id="empty")
        resp = st.PostInputsSearches(s.PostInputsSearchesRequest(user_app_id=empty, searches=[r.Search(query=r.Query(
            ranks=[r.Rank(annotation=r.Annotation(data=r.Data(text=r.Text(raw="ship"))))]))]), metadata=MD)
        assert resp.status.code == sc.SUCCESS and len(resp.hits) == 0
        # bad inputs: refused at once (not base64) or failed in the background with the reason (not an
        # image, a URL that answers 404); the good URL in the same call is processed
        bad = r.UserAppIDSet(user_id="me", app_id="bad")
        raw = httpx.post(f"{server.base}/v2/users/me/apps/bad/inputs", headers={"Authorization": f"Key {KEY}"},
                         json={"inputs": [
                             {"id": "no-image", "data": {"image": {"base64": base64.b64encode(b"no").decode()}},
                              "unknown_field": 1},
                             {"id": "not-b64", "data": {"image": {"base64": "%%% not base64 %%%"}}},
                             {"id": "gone", "data": {"image": {"url": f"{web.base}/img/gone.jpg"}}},
                             {"id": "ship-url", "data": {"image": {"url": f"{web.base}/img/ship.jpg"}}}]})
        body = raw.json()
        assert [x["status"]["code"] for x in body["inputs"]] == [30001, 30104, 30001, 30001]
        assert body["status"]["code"] == sc.MIXED_STATUS and raw.status_code == 200
        counts = wait_processed(st, bad, 3)
        assert (counts.processed, counts.errors) == (1, 2)
        for iid, code, reason in (("no-image", sc.INPUT_DOWNLOAD_FAILED, "image"),
                                  ("gone", sc.INPUT_DOWNLOAD_FAILED, "404"),
                                  ("ship-url", sc.INPUT_DOWNLOAD_SUCCESS, "")):
            got = st.GetInput(s.GetInputRequest(user_app_id=bad, input_id=iid), metadata=MD).input
            assert got.status.code == code and reason in got.status.details, (iid, got.status)
        assert st.GetInput(s.GetInputRequest(user_app_id=bad, input_id="not-b64"), metadata=MD).status.code \
            == sc.CONN_DOES_NOT_EXIST
        hits = _search(st, r.Query(ranks=[r.Rank(annotation=r.Annotation(data=r.Data(text=r.Text(raw="ship"))))]),
                       app=bad)
        assert [h.input.id for h in hits] == ["ship-url"]  # searches see processed inputs only
        unauth = httpx.get(f"{server.base}/v2/users/me/apps/photos/inputs/status")
        assert unauth.status_code == 401 and "code" in unauth.json()["status"]


def test_app_over_grpc(settings, fixture_loaded, cifar21, tmp_path):
    from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel as Channel

    s2 = settings.model_copy(update={"grpc_port": 0, "app_dir": tmp_path / "apps"})
    with LiveServer(s2, fixture_loaded) as server:
        st = service_pb2_grpc.V2Stub(Channel.get_insecure_grpc_channel(base="127.0.0.1", port=server.grpc_port))
        inputs = [r.Input(id=f"{c}-{n}", data=r.Data(image=r.Image(base64=p.read_bytes())))
                  for c in ("ship", "cat") for n, p in enumerate(cifar21[c][:5])]
        resp = st.PostInputs(s.PostInputsRequest(user_app_id=APP, inputs=inputs), metadata=MD)
        assert resp.status.code == sc.SUCCESS and len(resp.inputs) == 10
        assert {x.status.code for x in resp.inputs} == {sc.INPUT_DOWNLOAD_PENDING}
        assert wait_processed(st, APP, 10).processed == 10
        hits = _search(st, r.Query(ranks=[r.Rank(annotation=r.Annotation(data=r.Data(text=r.Text(raw="ship"))))]),
                       per_page=5)
        assert {h.input.id for h in hits} == {f"ship-{n}" for n in range(5)}
        assert st.DeleteInputs(s.DeleteInputsRequest(user_app_id=APP, ids=["ship-0"]), metadata=MD).status.code \
            == sc.SUCCESS
        assert st.GetInput(s.GetInputRequest(user_app_id=APP, input_id="ship-0"), metadata=MD).status.code \
            == sc.CONN_DOES_NOT_EXIST
        denied = st.GetInputCount(s.GetInputCountRequest(user_app_id=APP))
        assert denied.status.code != sc.SUCCESS


def test_app_guards_answer_clarifai_statuses(settings, fixture_loaded, cifar21, coco_images, tmp_path):
    """Each of the app routes' caps, set by settings, answered with a clear Clarifai status by the live server."""
    s2 = settings.model_copy(update={"app_dir": tmp_path / "apps", "max_request_bytes": 200_000,
                                     "app_max_blob_bytes": 5_000, "app_max_query_chars": 40,
                                     "app_max_inputs_per_call": 8, "app_client_inputs_per_minute": 12})
    auth = {"Authorization": f"Key {KEY}"}
    small = [base64.b64encode(p.read_bytes()).decode() for p in cifar21["ship"][:9]]
    big = next(p for p in coco_images if 5_000 < p.stat().st_size < 100_000)

    def inputs(datas, prefix):
        return {"inputs": [{"id": f"{prefix}-{i}", "data": {"image": {"base64": d}}} for i, d in enumerate(datas)]}

    with LiveServer(s2, fixture_loaded) as server:
        url = f"{server.base}/v2/users/me/apps/guards/inputs"
        # inputs per call: 9 > 8
        resp = httpx.post(url, headers=auth, json=inputs(small[:9], "a"))
        assert resp.status_code == 400 and resp.json()["status"]["code"] == sc.INPUT_INVALID_ARGUMENT
        assert "at most 8 per call" in resp.json()["status"]["details"]
        # blob bytes: a 5 kB+ photo is refused (its own status), the small one in the same call goes on
        resp = httpx.post(url, headers=auth, json=inputs([base64.b64encode(big.read_bytes()).decode(), small[0]], "b"))
        body = resp.json()
        assert resp.status_code == 200 and body["status"]["code"] == sc.MIXED_STATUS
        assert [x["status"]["code"] for x in body["inputs"]] == [sc.INPUT_OVER_LIMIT, sc.INPUT_DOWNLOAD_PENDING]
        assert "5000-byte limit" in body["inputs"][0]["status"]["details"]
        # request body bytes: over max_request_bytes, before any parsing
        resp = httpx.post(url, headers=auth, content=b'{"inputs": [' + b" " * 250_000 + b"]}")
        assert resp.status_code == 413 and resp.json()["status"]["code"] == sc.CONN_INVALID_REQUEST
        # query size: a text query over 40 characters
        resp = httpx.post(f"{server.base}/v2/users/me/apps/guards/inputs/searches", headers=auth, json={
            "searches": [{"query": {"ranks": [{"annotation": {"data": {"text": {"raw": "a ship " * 10}}}}]}}]})
        assert resp.status_code == 400 and resp.json()["status"]["code"] == sc.INPUT_INVALID_ARGUMENT
        assert "40 characters" in resp.json()["status"]["details"]
        # the client's upload rate: 12 inputs a minute; 2 spent above, 8 more pass, the next 8 do not
        resp = httpx.post(url, headers=auth, json=inputs(small[1:9], "c"))
        assert resp.status_code == 200 and resp.json()["status"]["code"] == sc.SUCCESS
        resp = httpx.post(url, headers=auth, json=inputs(small[1:9], "d"))
        assert resp.status_code == 429 and resp.json()["status"]["code"] == sc.CONN_THROTTLED
        assert int(resp.headers["Retry-After"]) >= 1 and "12 inputs added per minute" in resp.json()["status"]["details"]
        st = stub(server)
        guards = r.UserAppIDSet(user_id="me", app_id="guards")
        counts = wait_processed(st, guards, 9)
        assert (counts.processed, counts.errors) == (9, 0)  # nothing refused was stored
