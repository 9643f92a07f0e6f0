"""`localtag models verify` and the model-not-found messages (issue 10, items 17 and 19)."""

from __future__ import annotations

import shutil
from pathlib import Path

from localtag import cli

REPO = Path(__file__).resolve().parent.parent
FIXTURE_MODEL = REPO / "models" / "cifar10-tiny"


def store_with_broken(tmp_path: Path) -> Path:
    store = tmp_path / "models"
    store.mkdir()
    shutil.copytree(FIXTURE_MODEL, store / "good")
    (store / "broken").mkdir()
    (store / "broken" / "manifest.json").write_text('{"arch": "ViT-B-32", "weights": ')  # cut short
    return store


def test_verify_fails_on_a_corrupt_manifest(tmp_path, capsys):
    store = store_with_broken(tmp_path)
    rc = cli.main(["models", "verify", "--models-dir", str(store)])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "ok      cifar10-tiny" in out or "ok      good" in out, out
    assert "FAILED" in out and "broken" in out and "corrupt manifest" in out, out


def test_verify_by_name_fails_on_a_corrupt_manifest(tmp_path, capsys, caplog):
    store = store_with_broken(tmp_path)
    assert cli.main(["models", "verify", "--models-dir", str(store), "broken"]) != 0


def test_verify_all_good_is_zero(tmp_path, capsys):
    store = tmp_path / "models"
    shutil.copytree(FIXTURE_MODEL, store / "good")
    assert cli.main(["models", "verify", "--models-dir", str(store)]) == 0


def test_missing_model_path_message(tmp_path, capsys, caplog):
    missing = tmp_path / "no" / "such-model"
    rc = cli.main(["tag", "--model", str(missing), "--device", "cpu", str(FIXTURE_MODEL)])
    err = capsys.readouterr().err + caplog.text
    assert rc == 2
    assert f"{missing} does not exist" in err, err
    assert "models//" not in err and f"models/{missing}" not in err, err
