"""With the same weights, localtag's embeddings equal open_clip's reference pipeline (within 1e-4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_run import run_cli
from PIL import Image

from localtag.core.config import Settings
from localtag.core.loader import load
from localtag.core.models import ModelStore


@pytest.fixture(scope="module", params=["ViT-B-32", "RN50"])
def arch_weights(request, tmp_path_factory):
    import open_clip

    torch.manual_seed(1)
    model = open_clip.create_model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    del model
    store = ModelStore(tmp_path_factory.mktemp("store"))
    store.import_checkpoint(path, arch=request.param, name=request.param.lower())
    return request.param, path, store.root


def test_image_and_text_embeddings_match_open_clip(arch_weights, coco_images, tmp_path):
    import open_clip

    arch, path, root = arch_weights
    ref_model, _, ref_preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path))
    ref_model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    files = coco_images[:4]
    texts = ["a photo of a cat.", "a photo of a dog.", "a photo showing a red bus."]
    with torch.inference_mode():
        ref_img = ref_model.encode_image(torch.stack([ref_preprocess(Image.open(f)) for f in files]))
        ref_img = torch.nn.functional.normalize(ref_img, dim=-1).numpy()
        ref_txt = torch.nn.functional.normalize(ref_model.encode_text(tokenizer(texts)), dim=-1).numpy()

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\n")
    # exactness is the point: fp32 pinned (`auto` may pick bf16 on a CPU with AMX)
    tagger, encoder = load(Settings(models_dir=root, model=arch.lower(), device="cpu", cache_dir=tmp_path, vocab=vocab,
                                    precision="fp32"))
    from localtag.core.decode import decode

    ours_img = encoder.embed([decode(f) for f in files])
    ours_txt = tagger.encode_texts(texts).numpy()
    assert np.abs(ours_img - ref_img).max() < 1e-4
    assert np.abs(ours_txt - ref_txt).max() < 1e-4

    # the CLI's `embed` writes the same embeddings, float32, [N, D], in input order
    out = tmp_path / "emb.npy"
    r = run_cli("embed", *map(str, files), "--output", str(out), "--models-dir", str(root), "--model", arch.lower(),
                "--device", "cpu", "--cache-dir", str(tmp_path), "--vocab", str(vocab), "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    arr = np.load(out)
    assert arr.dtype == np.float32 and arr.shape == ref_img.shape
    assert np.abs(arr - ref_img).max() < 1e-4
    assert np.allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)
    assert (tmp_path / "emb.paths.txt").read_text().split() == [str(f) for f in files]
    assert json.loads(r.stdout)["shape"] == list(ref_img.shape)


def test_fp32_after_bf16_on_one_cache_folder_is_open_clips(arch_weights, coco_images, tmp_path):
    """Issue 15: the cache key holds the precision actually used. A bf16 `embed` fills the cache; an
    fp32 `embed` of the same files with the same cache folder must not be handed the bf16 embeddings
    (1e-3 away) but compute open_clip's own."""
    import open_clip

    arch, path, root = arch_weights
    ref_model, _, ref_preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path))
    files = coco_images[:3]
    with torch.inference_mode():
        ref = ref_model.eval().encode_image(torch.stack([ref_preprocess(Image.open(f)) for f in files]))
        ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\n")
    common = ["--models-dir", str(root), "--model", arch.lower(), "--device", "cpu", "--cache-dir",
              str(tmp_path / "cache"), "--vocab", str(vocab)]
    got = {}
    for p in ("bf16", "fp32"):
        r = run_cli("embed", *map(str, files), "--output", str(tmp_path / f"{p}.npy"), *common, "--precision", p)
        assert r.returncode == 0, r.stderr
        got[p] = np.load(tmp_path / f"{p}.npy")
    assert np.abs(got["bf16"] - ref).max() > 1e-4  # bf16 really differs, so the cache could have mixed them up
    assert np.abs(got["fp32"] - ref).max() < 1e-4
