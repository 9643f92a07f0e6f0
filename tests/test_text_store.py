"""Text embeddings computed at `models import` / `pull`, stored in the model folder and verified."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_random_checkpoint

from localtag.core import text_store
from localtag.core import vocab as vocab_mod
from localtag.core.loader import precompute_text
from localtag.core.models import ModelStore
from localtag.core.tagger import Tagger
from localtag.core.text_index import TextIndex


@pytest.fixture()
def model_with_vocab(tmp_path):
    """A tiny random model imported with its own vocab.txt (a copy per test: the tests edit it)."""
    ckpt = make_random_checkpoint(tmp_path / "ckpt" / "tiny-own", seed=3)
    (ckpt / "vocab.txt").write_text("cat | syn=kitten\ndog\ncar\n")
    return ModelStore(tmp_path / "store").import_checkpoint(ckpt, name="tiny-own")


def _fresh(info, vocab):
    return Tagger(info, vocab, device="cpu")


def test_precompute_stores_verified_embeddings_the_tagger_uses(model_with_vocab, monkeypatch):
    info = model_with_vocab
    vocab = vocab_mod.load(info.vocab_path)
    expected = _fresh(info, vocab).build_text()
    new = precompute_text(info, [info.vocab_path])
    assert len(new) == 1 and new[0]["concepts"] == 3 and new[0]["vocab_sha256"] == vocab.sha256
    manifest = json.loads((info.path / "manifest.json").read_text())
    (entry,) = manifest["text_embeddings"]
    assert (info.path / entry["file"]).is_file()
    assert precompute_text(info, [info.vocab_path]) == []  # already there: nothing redone
    reread = ModelStore(info.path.parent).resolve("tiny-own")
    monkeypatch.setattr(TextIndex, "build", lambda self: pytest.fail("the text tower ran"))
    t = _fresh(reread, vocab)  # no cache_dir: only the model folder can serve it
    assert torch.equal(t.text_embeddings, expected[0]) and torch.equal(t.neutral_embedding, expected[1])


def test_other_vocab_or_templates_do_not_match(model_with_vocab, tmp_path):
    info = model_with_vocab
    precompute_text(info, [info.vocab_path])
    other = tmp_path / "other.txt"
    other.write_text("cat\ndog\ntruck\n")
    t = _fresh(ModelStore(info.path.parent).resolve("tiny-own"), vocab_mod.load(other))
    assert text_store.load(t.info, t.text_key(), 3) is None
    t.text.templates = ("a {}.",)
    assert text_store.load(t.info, t.text_key(), 3) is None


def test_tampered_file_is_refused_and_reported(model_with_vocab, caplog):
    info = model_with_vocab
    precompute_text(info, [info.vocab_path])
    info = ModelStore(info.path.parent).resolve("tiny-own")
    vocab = vocab_mod.load(info.vocab_path)
    t = _fresh(info, vocab)
    good = t.text_embeddings.clone()
    (entry,) = text_store.entries(info)
    path = info.path / entry["file"]
    import numpy as np

    with np.load(path) as z:
        concepts, neutral = z["concepts"] * 0 + 1, z["neutral"]
    np.savez(path, concepts=concepts, neutral=neutral)  # a valid file with other values
    with caplog.at_level("WARNING"):
        assert text_store.load(info, t.text_key(), 3) is None
    assert "does not match the manifest" in caplog.text
    t2 = _fresh(info, vocab)
    assert torch.allclose(t2.text_embeddings, good, atol=1e-6)  # rebuilt by the text tower, not the bad file
    assert text_store.verify(info) and "sha256" in text_store.verify(info)[0]
    r = subprocess.run([sys.executable, "-m", "localtag", "models", "verify", "--models-dir", str(info.path.parent)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "stored text embeddings" in r.stdout
    path.unlink()
    assert "missing" in text_store.verify(info)[0]


def test_cli_import_stores_the_model_vocab_with_a_bar(tmp_path, monkeypatch):
    """`models import` encodes the shipped vocabularies (vocab.txt, the family's) and the model's own; here the shipped
    vocab.txt is swapped for a small file to keep the test short."""
    import localtag.core.config as config

    ckpt = make_random_checkpoint(tmp_path / "ckpt" / "tiny-cli", seed=4)
    (ckpt / "vocab.txt").write_text("cat\ndog\n")
    fake_root = tmp_path / "root"
    fake_root.mkdir()
    (fake_root / "vocab.txt").write_text("".join(f"thing {i}\n" for i in range(120)))  # 600 prompts: a bar
    real_shipped = config.shipped
    monkeypatch.setattr(config, "shipped", lambda name: fake_root / name if name == "vocab.txt" else real_shipped(name))
    from localtag import cli

    code = cli.main(["models", "import", str(ckpt), "--models-dir", str(tmp_path / "store"), "--progress"])
    assert code == 0
    info = ModelStore(tmp_path / "store").resolve("tiny-cli")
    from localtag.core import vocab as vocab_mod
    from localtag.core.family import shipped_vocabularies

    family = [len(vocab_mod.load(real_shipped(n))) for n in shipped_vocabularies()]  # nsfw, moderation, food, …
    assert sorted(e["concepts"] for e in text_store.entries(info)) == sorted([2, 120, *family])
    shutil.rmtree(tmp_path / "store")
    assert cli.main(["models", "import", str(ckpt), "--models-dir", str(tmp_path / "store"), "--no-text"]) == 0
    assert text_store.entries(ModelStore(tmp_path / "store").resolve("tiny-cli")) == []


def test_progress_range_counts_items(capsys):
    assert list(text_store.progress_range(600, 256, True, "text embeddings")) == [0, 256, 512]
    err = capsys.readouterr().err
    assert "600/600" in err and "prompt" in err
    assert list(text_store.progress_range(10, 4, False, "x")) == [0, 4, 8]
    assert capsys.readouterr().err == ""
