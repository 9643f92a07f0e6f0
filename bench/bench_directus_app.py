"""What does `directus sync --app` cost over a plain sync? Side by side, one Directus, one model load.

A real Directus on 127.0.0.1 (tests/directus_harness.py) holds the 128 COCO photos twice (sets A and B,
told apart by title). The fixture model (cifar10-tiny) tags them; no embedding cache, so every run
downloads, decodes and embeds. Timed (``run_sync``'s own elapsed seconds):

- ``sync`` vs ``sync --app``: the first sync of A without an app and of B with one, then a ``--retag``
  of A with the app and of B without (the order swapped, so warm-up does not favour one side);
- ``--app`` over a library tagged before (a new app): downloads and embeds for the app, tags nothing;
- ``--app`` again: the app holds every file, so nothing is downloaded (annotations refreshed only).

``app_writer_s``: the time spent in the app's writer itself (its one Directus read per batch and the store
write), the part of a ``--app`` run the plain sync does not do; the rest of the difference is noise on
a shared machine.

    .venv/bin/python bench/bench_directus_app.py
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import _common as C

sys.path.insert(0, str(C.REPO / "tests"))


def main() -> None:
    from directus_harness import DirectusClient, DirectusServer

    from localtag.app.local import store_of
    from localtag.app.store import NewInput, app_key
    from localtag.core.cache import cache_key
    from localtag.core.config import Settings
    from localtag.core.loader import load
    from localtag.directus.app_fill import AppFill
    from localtag.directus.sync import SyncOptions, run_sync

    photos = sorted(C.COCO_DIR.glob("*.jpg"))
    work = C.BENCH_DIR / f"dapp-{uuid.uuid4().hex[:6]}"
    settings = Settings(model=str(C.REPO / "models" / "cifar10-tiny"), device="cpu", cache_dir=work / "cache",
                        embedding_cache=False, batch_size=32)
    tagger, encoder = load(settings)
    tagger.text_embeddings  # noqa: B018 - built before anything is timed
    store = store_of(settings)
    key = cache_key(tagger.info.sha256, **encoder.variant(False))

    def fill(client, name: str) -> AppFill:
        app = app_key(None, name)

        def put(entries):
            return store.upsert(app, [NewInput(e.id, url=e.url, concepts=e.concepts, metadata=e.metadata,
                                               embedding=e.embedding) for e in entries], key)

        out = AppFill(client, put, held=store.embedded_ids(app, key))
        write, spent = out.write, [0.0]

        def timed(batch):  # the second writer's own share of the run: its Directus read and store write
            t0 = time.perf_counter()
            write(batch)
            spent[0] += time.perf_counter() - t0

        out.write, out.spent = timed, spent
        return out

    rows = {}
    with DirectusServer() as directus, DirectusClient(directus.url, directus.token) as client:
        directus.start()
        sets = {}
        for name in ("A", "B"):
            marker = f"bench-{name}-{uuid.uuid4().hex[:6]}"
            for p in photos:
                client.upload(p, title=marker)
            sets[name] = {"title": {"_eq": marker}}

        def sync(name: str, app: AppFill | None, retag: bool = False) -> dict:
            summary = run_sync(client, tagger, encoder, settings, SyncOptions(filter=sets[name], retag=retag),
                               app=app)
            if app is not None:
                app.close()
            assert summary.complete and summary.failed == 0, summary.to_json()
            return {"s": round(summary.elapsed_s, 2), "tagged": summary.tagged,
                    **({"app": dict(app.stats), "app_writer_s": round(app.spent[0], 2)} if app is not None else {})}

        rows["sync A (first)"] = sync("A", None)
        rows["sync --app B (first)"] = sync("B", fill(client, "b"))
        rows["sync --app A --retag"] = sync("A", fill(client, "a"), retag=True)
        rows["sync B --retag"] = sync("B", None, retag=True)
        rows["sync --app A, tagged before, new app"] = sync("A", fill(client, "a2"))
        rows["sync --app A, again"] = sync("A", fill(client, "a2"))
    plain = rows["sync A (first)"]["s"] + rows["sync B --retag"]["s"]
    with_app = rows["sync --app B (first)"]["s"] + rows["sync --app A --retag"]["s"]
    print(json.dumps({"machine": C.machine(), "photos": len(photos), "model": "cifar10-tiny", "runs": rows,
                      "ratio_app_over_plain": round(with_app / plain, 3)}, indent=1))


if __name__ == "__main__":
    main()
