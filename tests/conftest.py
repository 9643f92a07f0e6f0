"""Shared fixtures: real models (random-init or the trained CIFAR fixture) and real images."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from tests.directus_fixtures import directus  # noqa: F401  (the real Directus, session-scoped)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LOCALTAG_SHARED_DATA", REPO.parent / "shared" / "data"))
COCO_DIR = SHARED_DATA / "coco128" / "images"
CIFAR_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"
FIXTURE_MODEL = REPO / "models" / "cifar10-tiny"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# One rule for the suite on every CPU (issue 15): tests run the image tower at fp32 unless they ask for
# another precision. Exact figures (open_clip parity, snapshots, cache round trips, two paths compared)
# are their point, and `auto` picks bf16 on a CPU with AMX. The subprocesses tests start (CLI, server,
# Ray workers) inherit it. tests/test_precision.py tests `auto` and the other precisions explicitly.
os.environ["LOCALTAG_PRECISION"] = "fp32"

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_random_checkpoint(folder: Path, cfg: dict = TINY_CFG, seed: int = 0) -> Path:
    """A random-init open_clip CLIP saved as open_clip's local-dir layout (config + safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    size = cfg["vision_cfg"]["image_size"]
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"size": size}}))
    return folder


@pytest.fixture(scope="session")
def random_store(tmp_path_factory) -> Path:
    """A model store holding ``tiny-random``: a small random-init CLIP (no signal, real code paths)."""
    from localtag.core.models import ModelStore

    root = tmp_path_factory.mktemp("store")
    ckpt = make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-random")
    ModelStore(root).import_checkpoint(ckpt, name="tiny-random")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def fixture_model() -> Path:
    """The tiny CLIP trained on CIFAR-10 by tools/train_tiny_clip.py (committed, real signal)."""
    assert (FIXTURE_MODEL / "manifest.json").is_file(), "models/cifar10-tiny is missing"
    return FIXTURE_MODEL


@pytest.fixture(scope="session")
def fixture_loaded(fixture_model, cache_dir):
    """The fixture model's tagger and image encoder (:func:`localtag.core.loader.load`), on CPU."""
    from localtag.core.config import Settings
    from localtag.core.loader import load

    return load(Settings(model=str(fixture_model), cache_dir=cache_dir, device="cpu"))


@pytest.fixture(scope="session")
def fixture_tagger(fixture_loaded):
    return fixture_loaded.tagger


@pytest.fixture(scope="session")
def fixture_encoder(fixture_loaded):
    return fixture_loaded.encoder


def tag_images(loaded, images, **pick) -> list:
    """Decoded PIL images → each image's tags, straight through the encoder and the tagger (no pipeline)."""
    tagger, encoder = loaded
    return [tagger.pick(row, **pick) for row in tagger.values(encoder.embed(images))]


@pytest.fixture(scope="session")
def coco_images() -> list[Path]:
    files = sorted(COCO_DIR.glob("*.jpg"))
    assert len(files) == 128, f"expected 128 COCO photos in {COCO_DIR}"
    return files


def extract_cifar(dest: Path, split: str = "test", per_class: int = 20) -> dict[str, list[Path]]:
    """The first ``per_class`` JPEGs of each class (sorted names), extracted to ``dest``."""
    wanted: dict[str, list[str]] = {c: [] for c in CIFAR_CLASSES}
    with tarfile.open(CIFAR_TAR) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile() and m.name.startswith(f"{split}/"))
    for name in names:
        cls = name.split("/")[1]
        if len(wanted[cls]) < per_class:
            wanted[cls].append(name)
    keep = {n for names_ in wanted.values() for n in names_}
    # one sequential pass: extracting members out of order would re-read the gzip stream from its
    # start for each one (minutes for a few hundred files)
    with tarfile.open(CIFAR_TAR) as tar:
        for m in tar:
            if m.name in keep:
                target = dest / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
    out = {c: [dest / n for n in wanted[c]] for c in CIFAR_CLASSES}
    return out


@pytest.fixture(scope="session")
def cifar_test(tmp_path_factory) -> dict[str, list[Path]]:
    """20 real CIFAR-10 test JPEGs per class."""
    return extract_cifar(tmp_path_factory.mktemp("cifar"))


# -- the fast tier ------------------------------------------------------------------------------------
#: `bin/test -m "not directus and not ray and not slow"` leaves these out: modules that start servers,
#: download through a local hub, or run whole models over many photos, and single tests measured at
#: over ~1.5 s on the 2-core machine. `bin/test` with no arguments runs them all.
SLOW_MODULES = {"test_parity", "test_device_check", "test_hardening", "test_hardening2", "test_schemathesis",
                "test_calibrate", "test_clarifai_clients", "test_batch", "test_models", "test_text_store",
                "test_evaluate", "test_grpc", "test_snapshot", "test_heic", "test_learn", "test_family",
                "test_languages", "test_workflows", "test_app_clients", "test_app_store", "test_app_cli",
                "test_custom_models", "test_batch_head", "test_head_mix"}
SLOW_TESTS = {"test_a_precision_auto_may_pick_keeps_fp32s_answers", "test_unreadable_subfolder_is_reported",
              "test_tag_coco_json_all_128", "test_startup_loads_only_what_the_command_needs",
              "test_overload_answers_503_and_stays_bounded", "test_binary_values_do_not_depend_on_the_rest_of_the_vocabulary",
              "test_stall_and_slow_drip_time_out", "test_tag_takes_urls_through_the_guarded_fetcher",
              "test_cifar_top1_through_localtag_tag", "test_retag_gives_the_tags_of_a_fresh_run_without_the_image_model",
              "test_concurrent_readers_and_writers_in_threads_and_processes", "test_retag_fast_reads_and_fills_the_fast_entries",
              "test_retag_reports_uncached_content_and_can_embed_it", "test_int8_skips_linears_read_as_weights",
              "test_the_encoder_runs_the_precision_it_was_given", "test_device_selection",
              "test_text_cache_is_built_once_and_rebuilt_on_change"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
