"""The batch pipeline on real photos with a real (tiny, random-init) open_clip model."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from localtag.core import decode, errors
from localtag.core.cache import EmbeddingCache
from localtag.core.config import Settings
from localtag.core.device_decode import orient
from localtag.core.encoder import ImageEncoder
from localtag.core.loader import load
from localtag.core.pipeline import Job, Pipeline
from localtag.core.preprocess import Preprocess
from localtag.core.sources import walk


@pytest.fixture(scope="module")
def loaded(random_store, tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("cat\ndog\nperson\ncar\npizza\n")
    return load(Settings(models_dir=random_store, model="tiny-random", device="cpu", vocab=vocab,
                         cache_dir=tmp_path_factory.mktemp("tcache")))


@pytest.fixture(scope="module")
def encoder(loaded) -> ImageEncoder:
    return loaded.encoder


@pytest.fixture(scope="module")
def model_sha(loaded) -> str:
    return loaded.tagger.model_sha256


@pytest.fixture(scope="module")
def photos(coco_images):
    return coco_images[:12]


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def test_split_preprocess_is_open_clips_transform_bit_for_bit(encoder, photos):
    pre = Preprocess(encoder.pre.transform)
    assert pre.split
    imgs = [decode.decode(f) for f in photos[:6]]
    imgs.append(decode.decode(photos[0]).convert("L").convert("RGB"))
    ours = pre.normalize(torch.stack([pre.pixels(im) for im in imgs]).permute(0, 3, 1, 2))
    ref = torch.stack([encoder.pre.transform(im) for im in imgs])
    assert ours.shape == ref.shape and ours.is_contiguous()
    assert torch.equal(ours, ref)


def test_embeddings_equal_the_taggers_own_and_keep_input_order(encoder, photos):
    jobs = list(walk(photos))
    got = list(Pipeline(encoder, batch_size=5, workers=2).run(jobs))
    assert [r.job.key for r in got] == [j.key for j in jobs]
    ref = encoder.embed([decode.decode(f) for f in photos])
    assert np.abs(np.stack([r.embedding for r in got]) - ref).max() < 1e-6


def test_bad_inputs_fail_alone_and_every_source_kind_works(encoder, photos, tmp_path):
    good = photos[0].read_bytes()

    def broken_fetcher() -> bytes:
        raise ConnectionError("connection reset")

    async def async_fetcher() -> bytes:
        return good

    jobs = [
        Job("path", photos[0]),
        Job("garbage", b"this is not an image"),
        Job("missing", tmp_path / "nope.jpg"),
        Job("fetch-fails", broken_fetcher),
        Job("not-bytes", lambda: 42),
        Job("truncated", good[: len(good) // 3]),
        Job("callable", lambda: good),
        Job("async", async_fetcher),
        Job("bytes", good),
    ]
    out = {r.job.key: r for r in Pipeline(encoder, batch_size=3).run(jobs)}
    assert list(out) == [j.key for j in jobs]
    kinds = {k: (r.error.kind if r.error else None) for k, r in out.items()}
    assert kinds == {"path": None, "garbage": errors.NOT_IMAGE, "missing": errors.NOT_FOUND,
                     "fetch-fails": errors.FETCH_FAILED, "not-bytes": errors.FETCH_FAILED,
                     "truncated": errors.CORRUPT, "callable": None, "async": None, "bytes": None}
    assert "connection reset" in out["fetch-fails"].error.message
    for k in ("callable", "async", "bytes"):
        assert np.abs(out[k].embedding - out["path"].embedding).max() < 1e-5  # same image, other batch slot


def test_work_in_flight_is_bounded_and_an_early_stop_ends_the_threads(encoder, photos):
    small = _jpeg(decode.decode(photos[1]).resize((64, 48)))
    pulled = 0

    def jobs():
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield Job(str(i), small)

    bs, workers = 4, 2
    run = Pipeline(encoder, batch_size=bs, workers=workers).run(jobs())
    ahead = []
    for i, r in enumerate(run):
        assert r.ok
        ahead.append(pulled - (i + 1))
        if i == 150:
            break
    run.close()
    assert pulled < 300  # nowhere near the 10,000 offered
    assert max(ahead) <= 2 * bs + workers + 5 * bs  # decode window + pending + two batches at the model
    deadline = time.time() + 10
    while any(t.name.startswith("localtag-") for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("localtag-")]


def test_fast_decoding_drafts_large_jpegs_and_stays_close(encoder, photos):
    big = [_jpeg(decode.decode(f).resize((2048, 1536), Image.BICUBIC)) for f in photos[:4]]
    exact = Pipeline(encoder, fast=False)
    fast = Pipeline(encoder, fast=True)
    assert fast.draft == 2 * encoder.image_size and exact.draft is None
    assert decode.decode(big[0], draft=fast.draft).size == (256, 192)  # 1/8 scale, short side ≥ 2 × 32
    e = np.stack([r.embedding for r in exact.run([Job(str(i), b) for i, b in enumerate(big)])])
    f = np.stack([r.embedding for r in fast.run([Job(str(i), b) for i, b in enumerate(big)])])
    assert not np.array_equal(e, f)
    assert (e * f).sum(1).min() > 0.99


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillows_exif_transpose(orientation, photos):
    from torchvision.io import ImageReadMode, decode_jpeg

    src = decode.decode(photos[2]).resize((96, 64))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(src, exif=exif.tobytes())
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB")), dtype=np.int16)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    ours = orient(decode_jpeg(raw, mode=ImageReadMode.RGB), orientation).permute(1, 2, 0).numpy().astype(np.int16)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).mean() < 1.5  # two JPEG decoders: same geometry, tiny rounding differences


def test_device_decode_path_runs_on_cpu_and_agrees(encoder, photos):
    """The CUDA path (batched decode_jpeg → orient → resize/crop → normalise on the device), on CPU."""
    exif = Image.Exif()
    exif[0x0112] = 6
    datas = [p.read_bytes() for p in photos[:5]]
    datas.append(_jpeg(decode.decode(photos[5]), exif=exif.tobytes()))
    cmyk = io.BytesIO()
    decode.decode(photos[6]).convert("CMYK").save(cmyk, "JPEG")
    datas.append(cmyk.getvalue())  # not for the device decoder: Pillow takes it
    datas.append(b"\xff\xd8\xff\xe0 broken jpeg")
    jobs = [Job(str(i), d) for i, d in enumerate(datas)]
    dev = list(Pipeline(encoder, batch_size=4, device_decode=True).run(jobs))
    ref = list(Pipeline(encoder, batch_size=4).run(jobs))
    assert [r.ok for r in dev] == [True] * 7 + [False]
    assert dev[-1].error.kind in (errors.CORRUPT, errors.NOT_IMAGE)
    cos = [float(a.embedding @ b.embedding) for a, b in zip(dev[:-1], ref[:-1], strict=True)]
    assert min(cos) > 0.99, cos


def test_cache_hits_skip_decoding_and_the_model(encoder, model_sha, photos, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path, model_sha)
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in photos[:6]:
        (folder / f.name).write_bytes(f.read_bytes())
    first = list(Pipeline(encoder, batch_size=4, cache=cache).run(walk([folder])))
    assert all(r.ok and not r.cached and len(r.digest) == 64 for r in first)
    assert len(cache) == 6

    calls = []
    real_forward = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda x: calls.append(len(x)) or real_forward(x))
    changed = sorted(folder.iterdir())[2]
    changed.write_bytes(photos[7].read_bytes())  # new content under an old name
    second = list(Pipeline(encoder, batch_size=4, cache=cache).run(walk([folder])))
    assert [r.cached for r in second] == [True, True, False, True, True, True]
    assert calls == [1]  # only the changed file went through the model
    for a, b in zip(first, second, strict=True):
        if b.cached:
            assert np.array_equal(a.embedding, b.embedding) and a.digest == b.digest
    assert second[2].digest != first[2].digest


def test_a_broken_cache_slows_the_run_but_never_fails_it(encoder, model_sha, photos, tmp_path, caplog):
    cache = EmbeddingCache(tmp_path, model_sha)
    cache.put_many([("ab" * 32, np.ones(7, dtype=np.float32))])  # a cache holding other-sized embeddings
    results = list(Pipeline(encoder, batch_size=2, cache=cache).run(walk(photos[:3])))
    assert all(r.ok for r in results)
    assert "embedding cache failed" in caplog.text


def test_a_bug_is_told_as_one_not_as_a_corrupt_image(encoder, photos, monkeypatch, caplog):
    """An exception no input can cause (here: the resize step breaks) fails that input as an internal
    error, with its traceback in the log, and the run goes on."""
    real = Preprocess.pixels
    calls = []

    def broken(self, img):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in the resize step")
        return real(self, img)

    monkeypatch.setattr(Preprocess, "pixels", broken)
    with caplog.at_level("ERROR"):
        results = list(Pipeline(encoder, workers=1).run([Job(str(p), p) for p in photos[:3]]))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error.kind == errors.INTERNAL and "a bug in the resize step" in results[1].error.message
    assert "Traceback" in caplog.text and "RuntimeError: a bug in the resize step" in caplog.text
