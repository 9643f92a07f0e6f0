"""CUDA paths, checked against the CPU fp32 reference. Skipped without CUDA (run by bench/device_check.sh).

Not timed: speed is bench/bench_cuda.py's job.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import torch

from localtag.core import precision as P
from localtag.core.autotune import best_batch_size
from localtag.core.config import Settings
from localtag.core.encoder import ImageEncoder
from localtag.core.loader import load
from localtag.core.models import preprocess_for
from localtag.core.pipeline import Job, Pipeline

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run bench/device_check.sh)")]
CUDA = torch.device("cuda")
VOCAB = "cat\ndog\nbird\nairplane\ntruck\nperson\ncar\nboat\n"


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "vocab.txt"
    path.write_text(VOCAB)
    return path


@pytest.fixture(scope="module")
def taggers(random_store, cache_dir, vocab_file):
    """The same random-init tiny ViT loaded on the CPU (fp32 reference) and on CUDA: (tagger, encoder) each."""
    kw = dict(models_dir=random_store, model="tiny-random", vocab=vocab_file, cache_dir=cache_dir)
    return load(Settings(device="cpu", **kw)), load(Settings(device="cuda", **kw))


@pytest.fixture(scope="module")
def photos(coco_images):
    return coco_images[:48]


def _embed(pipe, files):
    out = list(pipe.run([Job(str(f), f) for f in files]))
    assert all(r.ok for r in out), [r.error for r in out if not r.ok]
    return np.stack([r.embedding for r in out])


def _cos(a, b):
    return (np.asarray(a) * np.asarray(b)).sum(1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_half_precision_matches_cpu_fp32(taggers, fixture_loaded, photos, precision):
    """The encoder on CUDA in bf16/fp16 against the CPU fp32 encoder: a random ViT and the trained ModifiedResNet."""
    from localtag.core import decode
    from localtag.core.models import build

    for tagger, cpu in (taggers[0], fixture_loaded):
        images = [decode.decode(f) for f in photos]
        ref = cpu.embed(images)
        gpu = ImageEncoder(build(tagger.info).to(CUDA), preprocess_for(tagger.info),
                           image_size=tagger.info.preprocess["size"], device=CUDA, precision=precision)
        assert gpu.precision == precision
        cos = _cos(ref, gpu.embed(images))
        assert cos.min() >= 0.999, (tagger.info.name, precision, float(cos.min()))


def test_auto_precision_on_cuda_is_half():
    assert P.resolve("auto", CUDA, "k") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_cuda_pipeline_pinned_non_blocking_matches_cpu(taggers, photos, monkeypatch):
    (_, cpu), (_, gpu) = taggers
    ref = _embed(Pipeline(cpu, batch_size=16), photos)
    pinned = []
    real_empty = torch.empty

    def spy(*a, **k):
        t = real_empty(*a, **k)
        if k.get("pin_memory"):
            pinned.append(t.is_pinned())
        return t

    monkeypatch.setattr(torch, "empty", spy)
    got = _embed(Pipeline(gpu, batch_size=16, device_decode=False), photos)
    monkeypatch.undo()
    assert pinned and all(pinned)  # the device → host copies land in pinned memory
    assert _cos(ref, got).min() >= 0.999


def test_gpu_jpeg_decode_agrees_with_cpu_decode(taggers, photos):
    (_, cpu), (_, gpu) = taggers
    ref = _embed(Pipeline(cpu, batch_size=16), photos)
    pipe = Pipeline(gpu, batch_size=16, device_decode=True)
    assert pipe.device_decode
    got = _embed(pipe, photos)
    cos = _cos(ref, got)
    assert cos.min() > 0.99 and cos.mean() > 0.997, (float(cos.min()), float(cos.mean()))


def test_gpu_decode_falls_back_for_what_nvjpeg_cannot_read(taggers, photos):
    import io

    from PIL import Image

    _, (_, gpu) = taggers
    cmyk = io.BytesIO()
    Image.open(photos[0]).convert("CMYK").save(cmyk, "JPEG")
    jobs = [Job("ok", photos[1].read_bytes()), Job("cmyk", cmyk.getvalue()), Job("bad", b"\xff\xd8\xff\xe0 broken")]
    out = list(Pipeline(gpu, batch_size=4, device_decode=True).run(jobs))
    assert [r.ok for r in out] == [True, True, False]


def test_auto_batch_size_is_a_power_of_two_that_runs(taggers, photos):
    _, (_, gpu) = taggers
    bs = best_batch_size(gpu.forward, gpu.device, gpu.image_size, limit=512)
    assert bs >= 8 and bs & (bs - 1) == 0
    gpu._batch_size = 0  # measured on first use
    pipe = Pipeline(gpu)
    assert pipe.batch_size == gpu.batch_size and gpu.batch_size & (gpu.batch_size - 1) == 0
    assert len(_embed(pipe, photos)) == len(photos)


def test_server_under_concurrency_on_cuda(taggers, photos, random_store, cache_dir, vocab_file):
    import httpx
    from live_server import LiveServer

    (cpu_tagger, cpu), gpu_loaded = taggers
    settings = Settings(models_dir=random_store, model="tiny-random", vocab=vocab_file, cache_dir=cache_dir,
                        device="cuda", batch_size=16, max_concepts=5)
    ref = {str(f): e for f, e in zip(photos, _embed(Pipeline(cpu, batch_size=16), photos), strict=True)}
    values = cpu_tagger.values(np.stack(list(ref.values())))
    expected = {k: [t.name for t in cpu_tagger.pick(v, max_concepts=5)] for k, v in zip(ref, values, strict=True)}
    url = "/v2/models/general-image-recognition/outputs"

    async def run(base: str) -> dict[str, list[str]]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async def one(f):
                body = {"inputs": [{"data": {"image": {"base64": base64.b64encode(f.read_bytes()).decode()}}}]}
                r = await http.post(url, json=body)
                assert r.status_code == 200, r.text
                return str(f), [c["name"] for c in r.json()["outputs"][0]["data"]["concepts"]]
            return dict(await asyncio.gather(*(one(f) for f in photos)))

    with LiveServer(settings, gpu_loaded) as server:
        got = asyncio.run(run(server.base))
    assert len(got) == len(photos) and all(len(v) == 5 for v in got.values())
    overlap = np.mean([len(set(got[k]) & set(expected[k])) / 5 for k in got])
    assert overlap >= 0.8, overlap  # bf16 on the device, fp32 on the CPU: a random model's near-ties may swap
