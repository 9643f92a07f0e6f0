"""Image-tower precision (localtag.core.precision): exact fp32, int8 on a copy, auto that never slows a CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_CFG

from localtag.core import precision as P
from localtag.core.config import Settings

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_vit():
    import open_clip

    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_CFG).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g)


def test_fp32_is_open_clip_bit_for_bit(tiny_vit, batch):
    tower = P.prepare_image_tower(tiny_vit, "fp32", CPU)
    with torch.inference_mode():
        assert torch.equal(tower(batch), tiny_vit.encode_image(batch))


def test_int8_quantises_a_copy_of_the_visual_tower_only(tiny_vit, batch):
    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    tower = P.prepare_image_tower(tiny_vit, "int8", CPU)
    assert tower.module is not tiny_vit.visual
    assert any("quantized" in type(m).__module__ for m in tower.module.modules())
    # the model itself is untouched: its text path (get_cast_dtype reads c_fc.weight.dtype) still works
    assert all(torch.equal(v, tiny_vit.state_dict()[k]) for k, v in before.items())
    assert tiny_vit.transformer.get_cast_dtype() == torch.float32
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(tiny_vit.encode_image(batch), dim=-1)
        got = torch.nn.functional.normalize(tower(batch), dim=-1)
        tiny_vit.encode_text(torch.zeros(2, 16, dtype=torch.long))
    assert got.dtype == torch.float32
    cos = (ref * got).sum(-1)
    assert cos.min() > 0.99 and not torch.equal(ref, got)


def test_int8_skips_linears_read_as_weights(fixture_tagger, batch):
    """ModifiedResNet's attention pool reads q/k/v_proj.weight directly: those stay fp32 (and it runs)."""
    visual = fixture_tagger.model.visual
    assert P.called_linears(visual) == []
    assert P.quantised_fraction(visual) == {"params": 0.0, "macs": 0.0}
    tower = P.prepare_image_tower(fixture_tagger.model, "int8", CPU)
    with torch.inference_mode():
        assert torch.equal(tower(batch), fixture_tagger.model.encode_image(batch))


def test_quantised_fraction_of_a_vit(tiny_vit):
    frac = P.quantised_fraction(tiny_vit.visual)
    assert 0.3 < frac["macs"] < 0.9 and 0.3 < frac["params"] < 0.9


def test_bf16_autocast_is_close(tiny_vit, batch):
    tower = P.prepare_image_tower(tiny_vit, "bf16", CPU)
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(tiny_vit.encode_image(batch), dim=-1)
        got = torch.nn.functional.normalize(tower(batch), dim=-1)
    assert got.dtype == torch.float32 and (ref * got).sum(-1).min() > 0.99


def test_explicit_choices_and_errors(tmp_path):
    for p in ("fp32", "bf16", "fp16", "int8"):
        assert P.resolve(p, CPU, "k", tmp_path) == p
    with pytest.raises(ValueError, match="precision must be one of"):
        P.resolve("int4", CPU, "k")
    with pytest.raises(ValueError, match="CPU path"):
        P.resolve("int8", torch.device("cuda"), "k")
    with pytest.raises(ValueError, match="resolve"):
        P.prepare_image_tower(torch.nn.Identity(), "auto", CPU)


def test_auto_without_native_bf16_is_fp32_and_measures_nothing(tiny_vit, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "native_bf16", lambda: False)
    monkeypatch.setattr(P, "measure", lambda *a, **k: pytest.fail("nothing to measure"))
    assert not P.AUTO_INT8  # int8 missed the 99 % top-5 bar (bench/RESULTS.md)
    assert P.resolve("auto", CPU, "k", tmp_path, model=tiny_vit) == "fp32"


@pytest.mark.parametrize("speed, expected", [({"fp32": 1.0, "int8": 1.4}, "int8"),
                                             ({"fp32": 1.0, "int8": 1.05}, "fp32"),
                                             ({"fp32": 1.0, "int8": 0.5}, "fp32")])
def test_auto_measures_once_and_caches_per_model_and_cpu(tiny_vit, tmp_path, monkeypatch, speed, expected):
    monkeypatch.setattr(P, "AUTO_INT8", True)
    monkeypatch.setattr(P, "native_bf16", lambda: False)
    calls = []
    monkeypatch.setattr(P, "measure", lambda v, ps, size, **k: calls.append(ps) or {p: speed[p] for p in ps})
    assert P.resolve("auto", CPU, "sha-a", tmp_path, model=tiny_vit) == expected
    assert P.resolve("auto", CPU, "sha-a", tmp_path, model=tiny_vit) == expected
    assert calls == [["fp32", "int8"]]  # the second answer came from the cache
    (cached,) = (tmp_path / "precision").glob("*.json")
    assert json.loads(cached.read_text())["choice"] == expected
    P.resolve("auto", CPU, "sha-b", tmp_path, model=tiny_vit)  # another model: measured again
    assert len(calls) == 2


def test_measure_reports_ratios_to_fp32(tiny_vit):
    speed = P.measure(tiny_vit.visual, ["fp32", "int8"], 32, batch=2, rounds=1)
    assert speed["fp32"] == 1.0 and speed["int8"] > 0


def test_settings_and_flag(monkeypatch):
    from localtag.cli import build_parser
    from localtag.cli.common import settings_from
    from localtag.core.config import Settings

    assert Settings().precision == "auto"
    monkeypatch.setenv("LOCALTAG_PRECISION", "int8")
    assert Settings().precision == "int8"
    with pytest.raises(ValueError):
        Settings(precision="int4")
    args = build_parser().parse_args(["tag", "x.jpg", "--precision", "fp32"])
    assert settings_from(args).precision == "fp32"


def test_the_encoder_runs_the_precision_it_was_given(random_store, tmp_path, coco_images):
    """`--precision int8` reaches the image encoder: quantised Linear layers, close to fp32, not equal."""
    from localtag.core import decode
    from localtag.core.loader import load

    (tmp_path / "v.txt").write_text("cat\ndog\n")
    kw = dict(models_dir=random_store, model="tiny-random", vocab=tmp_path / "v.txt", cache_dir=tmp_path, device="cpu")
    fp32 = load(Settings(precision="fp32", **kw)).encoder
    int8 = load(Settings(precision="int8", **kw)).encoder
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert any("quantized" in type(m).__module__ for m in int8._tower.modules())
    images = [decode.decode(p) for p in coco_images[:6]]
    a, b = fp32.embed(images), int8.embed(images)
    assert (a * b).sum(1).min() > 0.99 and not np.array_equal(a, b)
    if not P.native_bf16() and not P.AUTO_INT8:  # nothing can beat fp32 here: auto measures nothing
        assert load(Settings(precision="auto", **kw)).encoder.precision == "fp32"
