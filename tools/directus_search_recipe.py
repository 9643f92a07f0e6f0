"""The real run behind docs/directus.md's search recipe.

A fresh Directus 12 (tests/directus_harness.py) with 36 CIFAR-10 test JPEGs (12 ships, 8 cats, 8 trucks,
8 frogs), `localtag directus sync --app library`, `localtag directus search ship`, `localtag serve`
(PostInputsSearches) and a Directus webhook flow that sends the text there and answers file ids.
Run from the repository root:

    PYTHONPATH=$PWD .venv/bin/python tools/directus_search_recipe.py [WORK_DIR]
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402
from conftest import extract_cifar  # noqa: E402
from directus_harness import DirectusClient, DirectusServer  # noqa: E402
from live_server import LiveServer  # noqa: E402

from localtag import cli  # noqa: E402
from localtag.core.config import Settings  # noqa: E402

MODEL = str(REPO / "models" / "cifar10-tiny")
LIBRARY = {"ship": 12, "cat": 8, "truck": 8, "frog": 8}

BUILD = """module.exports = async function(data) {
  const q = data.$trigger.query;
  return { query: { ranks: [{ annotation: { data: { text: { raw: String(q.q || '') } } } }] },
           pagination: { page: 1, per_page: Number(q.limit || 10) } };
};
"""
IDS = """module.exports = async function(data) {
  const hits = data.search.data.hits || [];
  return hits.map((h) => ({ id: h.input.id, title: h.input.data.metadata.title, score: h.score }));
};
"""


def cli_out(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(argv)
    return rc, out.getvalue()


def install_search_flow(client: DirectusClient, search_url: str) -> tuple[str, dict]:
    """The recipe's flow: webhook (GET ?q=&limit=) → build the search → POST it to localtag → file ids."""
    ops = [
        {"key": "body", "name": "Build the search", "type": "exec", "options": {"code": BUILD}},
        {"key": "search", "name": "Search localtag", "type": "request",
         "options": {"method": "POST", "url": search_url,
                     "headers": [{"header": "Content-Type", "value": "application/json"}], "body": "{{body}}"}},
        {"key": "ids", "name": "File ids", "type": "exec", "options": {"code": IDS}},
    ]
    flow = {"name": "localtag: search", "icon": "search", "status": "active", "trigger": "webhook",
            "accountability": "all", "options": {"method": "GET", "async": False, "return": "$last"}}
    flow_id = client._data("POST", "/flows", params={"fields": "id"}, json=flow)["id"]
    next_id = None
    for i, op in reversed(list(enumerate(ops))):  # last first, so each can point to the next
        next_id = client._data("POST", "/operations", params={"fields": "id"},
                               json={**op, "flow": flow_id, "resolve": next_id, "reject": None,
                                     "position_x": 19 + 18 * i, "position_y": 1})["id"]
    client._data("PATCH", f"/flows/{flow_id}", params={"fields": "id"}, json={"operation": next_id})
    return flow_id, {"flow": flow, "operations": ops}


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/localtag-recipe")
    work.mkdir(parents=True, exist_ok=True)
    cifar = extract_cifar(work / "cifar")
    model = ["--model", MODEL, "--device", "cpu", "--cache-dir", str(work / "cache")]
    with DirectusServer() as directus, DirectusClient(directus.url, directus.token) as client:
        directus.start()
        classes = {}
        for cls, n in LIBRARY.items():
            for i, path in enumerate(cifar[cls][:n]):
                classes[client.upload(path, f"{cls}-{path.name}", title=f"{cls} {i}")["id"]] = cls
        rc, out = cli_out(["directus", "sync", "--directus-url", directus.url, "--token", directus.token,
                           "--app", "library", *model])
        print("SYNC rc", rc, out)
        print("CLI SEARCH\n" + cli_out(["directus", "search", "ship", "--app", "library", "--limit", "5", *model])[1])
        with LiveServer(Settings(model=MODEL, device="cpu", cache_dir=work / "cache")) as srv:
            url = f"{srv.base}/v2/users/me/apps/library/inputs/searches"
            body = {"query": {"ranks": [{"annotation": {"data": {"text": {"raw": "ship"}}}}]},
                    "pagination": {"page": 1, "per_page": 3}}
            r = httpx.post(url, json=body, timeout=60)
            print("REST", r.status_code, json.dumps(r.json(), indent=1))
            flow_id, flow = install_search_flow(client, url)
            print("FLOW", json.dumps(flow, indent=1))
            r = httpx.get(f"{directus.url}/flows/trigger/{flow_id}", params={"q": "ship", "limit": 5},
                          headers={"Authorization": f"Bearer {directus.token}"}, timeout=60)
            print("FLOW CALL", r.status_code, r.text)
            hits = r.json()
            print(f"ships in the top {len(hits)}: {sum(classes.get(h['id']) == 'ship' for h in hits)}")


if __name__ == "__main__":
    main()
