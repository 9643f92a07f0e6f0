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
    tagger, encoder = load(Settings(models_dir=root, model=arch.lower(), device="cpu", cache_dir=tmp_path, vocab=vocab))
    from localtag.core.decode import decode

    ours_img = encoder.embed([decode(f) for f in files])
    ours_txt = tagger.encode_texts(texts).numpy()
    assert np.abs(ours_img - ref_img).max() < 1e-4
    assert np.abs(ours_txt - ref_txt).max() < 1e-4

    # the CLI's `embed` writes the same embeddings, float32, [N, D], in input order
    out = tmp_path / "emb.npy"
    r = run_cli("embed", *map(str, files), "--output", str(out), "--models-dir", str(root), "--model", arch.lower(),
                "--device", "cpu", "--cache-dir", str(tmp_path), "--vocab", str(vocab))
    assert r.returncode == 0, r.stderr
    arr = np.load(out)
    assert arr.dtype == np.float32 and arr.shape == ref_img.shape
    assert np.abs(arr - ref_img).max() < 1e-4
    assert np.allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)
    assert (tmp_path / "emb.paths.txt").read_text().split() == [str(f) for f in files]
    assert json.loads(r.stdout)["shape"] == list(ref_img.shape)
