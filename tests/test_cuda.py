"""CUDA paths, checked against the CPU fp32 reference. Skipped without CUDA (run by bench/device_check.sh).

Not timed: speed is bench/bench_cuda.py's job.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import torch

from localtag import precision as P
from localtag.config import Settings
from localtag.pipeline import Job, Pipeline, auto_batch_size
from localtag.tagger import Tagger

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
    """The same random-init tiny ViT on the CPU (fp32 reference) and on CUDA."""
    kw = dict(models_dir=random_store, model="tiny-random", vocab=vocab_file, cache_dir=cache_dir)
    return Tagger.load(Settings(device="cpu", **kw)), Tagger.load(Settings(device="cuda", **kw))


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
def test_cuda_half_precision_matches_cpu_fp32(taggers, fixture_tagger, photos, precision):
    from localtag import images

    for cpu in (taggers[0], fixture_tagger):  # a random ViT and the trained ModifiedResNet
        x = torch.stack([cpu.preprocess(images.decode(f)) for f in photos])
        ref = torch.nn.functional.normalize(cpu.model.encode_image(x), dim=-1)
        model = Tagger(cpu.info, cpu.vocab, device="cuda").model
        tower = P.prepare_image_tower(model, precision, CUDA)
        with torch.inference_mode():
            got = torch.nn.functional.normalize(tower(x.to(CUDA)), dim=-1).cpu()
        cos = (ref * got).sum(1)
        assert cos.min() >= 0.999, (cpu.info.name, precision, float(cos.min()))


def test_auto_precision_on_cuda_is_half():
    assert P.resolve("auto", CUDA, "k") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_cuda_pipeline_pinned_non_blocking_matches_cpu(taggers, photos, monkeypatch):
    cpu, gpu = taggers
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
    cpu, gpu = taggers
    ref = _embed(Pipeline(cpu, batch_size=16), photos)
    pipe = Pipeline(gpu, batch_size=16, device_decode=True)
    assert pipe.device_decode
    got = _embed(pipe, photos)
    cos = _cos(ref, got)
    assert cos.min() > 0.99 and cos.mean() > 0.997, (float(cos.min()), float(cos.mean()))


def test_gpu_decode_falls_back_for_what_nvjpeg_cannot_read(taggers, photos):
    import io

    from PIL import Image

    _, gpu = taggers
    cmyk = io.BytesIO()
    Image.open(photos[0]).convert("CMYK").save(cmyk, "JPEG")
    jobs = [Job("ok", photos[1].read_bytes()), Job("cmyk", cmyk.getvalue()), Job("bad", b"\xff\xd8\xff\xe0 broken")]
    out = list(Pipeline(gpu, batch_size=4, device_decode=True).run(jobs))
    assert [r.ok for r in out] == [True, True, False]


def test_auto_batch_size_is_a_power_of_two_that_runs(taggers, photos):
    _, gpu = taggers
    bs = auto_batch_size(gpu, limit=512)
    assert bs >= 8 and bs & (bs - 1) == 0
    pipe = Pipeline(gpu, batch_size=0)
    assert pipe.batch_size == bs or pipe.batch_size & (pipe.batch_size - 1) == 0
    assert len(_embed(pipe, photos)) == len(photos)


def test_server_under_concurrency_on_cuda(taggers, photos, random_store, cache_dir, vocab_file):
    import httpx
    from live_server import LiveServer

    cpu, gpu = taggers
    settings = Settings(models_dir=random_store, model="tiny-random", vocab=vocab_file, cache_dir=cache_dir,
                        device="cuda", batch_size=16, max_concepts=5)
    ref = {str(f): e for f, e in zip(photos, _embed(Pipeline(cpu, batch_size=16), photos), strict=True)}
    expected = {k: [t.name for t in cpu.pick(v, max_concepts=5)] for k, v in zip(ref, cpu.scores(np.stack(list(ref.values()))), strict=True)}
    url = "/v2/models/general-image-recognition/outputs"

    async def run(base: str) -> dict[str, list[str]]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async def one(f):
                body = {"inputs": [{"data": {"image": {"base64": base64.b64encode(f.read_bytes()).decode()}}}]}
                r = await http.post(url, json=body)
                assert r.status_code == 200, r.text
                return str(f), [c["name"] for c in r.json()["outputs"][0]["data"]["concepts"]]
            return dict(await asyncio.gather(*(one(f) for f in photos)))

    with LiveServer(settings, gpu) as server:
        got = asyncio.run(run(server.base))
    assert len(got) == len(photos) and all(len(v) == 5 for v in got.values())
    overlap = np.mean([len(set(got[k]) & set(expected[k])) / 5 for k in got])
    assert overlap >= 0.8, overlap  # bf16 on the device, fp32 on the CPU: a random model's near-ties may swap
