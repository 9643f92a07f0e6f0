"""HEIC / HEIF photos (issue 10, item 16): decoded with pillow-heif; without it, the error says what to install."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from localtag.core import decode as decode_mod
from localtag.core import errors
from localtag.core.decode import decode
from localtag.core.errors import ImageError

pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif is not installed (pip install 'localtag[heic]')")


def heic_bytes(coco_image) -> bytes:
    img = Image.open(coco_image).convert("RGB").resize((160, 120))
    img.paste((255, 0, 0), (0, 0, 80, 120))  # left half red
    buf = io.BytesIO()
    pillow_heif.from_pillow(img).save(buf, format="HEIF", quality=90)
    return buf.getvalue()


def test_real_heic_decodes(coco_images, tmp_path):
    data = heic_bytes(coco_images[0])
    assert decode_mod.is_heif(data)
    path = tmp_path / "phone.HEIC"
    path.write_bytes(data)
    for source in (data, path):
        img = decode(source)
        assert img.mode == "RGB" and img.size == (160, 120)
        r, g, b = img.getpixel((20, 60))
        assert r > 200 and g < 60 and b < 60


def test_heic_pixel_limit_checked_before_decoding(coco_images):
    with pytest.raises(ImageError) as e:
        decode(heic_bytes(coco_images[0]), max_pixels=1000)
    assert e.value.kind == errors.TOO_MANY_PIXELS


def test_heic_without_pillow_heif_says_what_to_install(coco_images, monkeypatch):
    monkeypatch.setattr(decode_mod, "_heif", False)  # as if `import pillow_heif` failed
    monkeypatch.setattr(Image, "OPEN", {k: v for k, v in Image.OPEN.items() if "HEIF" not in k.upper()})
    with pytest.raises(ImageError) as e:
        decode(heic_bytes(coco_images[0]))
    assert "pip install 'localtag[heic]'" in e.value.message and "pillow-heif" in e.value.message


def test_cli_tags_a_heic(coco_images, tmp_path, capsys):
    from localtag import cli
    from tests.conftest import FIXTURE_MODEL

    (tmp_path / "IMG_0001.heic").write_bytes(heic_bytes(coco_images[0]))
    rc = cli.main(["tag", "--model", str(FIXTURE_MODEL), "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
                   str(tmp_path / "IMG_0001.heic")])
    out = capsys.readouterr().out
    assert rc == 0 and "ERROR" not in out, out
