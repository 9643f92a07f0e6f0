"""Clarifai's public model family as localtag serves it: ids → what answers them. A leaf module.

Every concept model is a vocabulary shipped in ``localtag/data/`` scored on the one CLIP model the
server loads (one image embedding serves them all); ``general`` is the configured vocabulary itself.
``embedding`` answers the image embedding, ``color`` dominant colours from the pixels,
``image-properties`` (localtag's own) brightness, sharpness, contrast and 12 simplified colours.
Ids: the legacy v2 ids (as the npm ``clarifai`` client's constants name them) and today's string ids.
"""

from __future__ import annotations

from dataclasses import dataclass

CONCEPTS, EMBEDDING, COLOR, PROPERTIES = "concepts", "embedding", "color", "properties"


@dataclass(frozen=True)
class FamilyModel:
    key: str  # localtag's short name (workflow node ids, docs)
    id: str  # Clarifai's string id
    legacy_id: str  # the v2 id of the npm client's constants
    name: str
    kind: str  # CONCEPTS | EMBEDDING | COLOR
    vocab: str | None = None  # a file in localtag/data/ (None for general: the server's vocabulary)
    scoring: str = "binary"  # softmax: single-label, values sum to 1
    model_type_id: str = "visual-classifier"
    output_field: str = "concepts"


FAMILY: tuple[FamilyModel, ...] = (
    FamilyModel("general", "general-image-recognition", "aaa03c23b3724a16a56b629203edc62c", "Image Recognition",
                CONCEPTS),
    FamilyModel("nsfw", "nsfw-recognition", "e9576d86d2004ed1a38ba0cf39ecb4b1", "NSFW Recognition", CONCEPTS,
                "nsfw.txt", "softmax"),
    FamilyModel("moderation", "moderation-recognition", "d16f390eb32cad478c7ae150069bd2c6",
                "Moderation Recognition", CONCEPTS, "moderation.txt", "softmax"),
    FamilyModel("food", "food-item-recognition", "bd367be194cf45149e75f01d59f77ba7", "Food Item Recognition",
                CONCEPTS, "food.txt"),
    FamilyModel("travel", "travel-recognition", "eee28c313d69466f836ab83287a54ed9", "Travel Recognition",
                CONCEPTS, "travel.txt"),
    FamilyModel("apparel", "apparel-recognition", "e0be3b9d6a454f0493ac3a30784001ff", "Apparel Recognition",
                CONCEPTS, "apparel.txt"),
    FamilyModel("weddings", "wedding-recognition", "c386b7a870114f4a87477c0824499348", "Wedding Recognition",
                CONCEPTS, "weddings.txt"),
    FamilyModel("textures", "texture-recognition", "fbefb47f9fdb410e8ce14f24f54b47ff",
                "Textures & Patterns Recognition", CONCEPTS, "textures.txt"),
    FamilyModel("landscape-quality", "landscape-quality", "bec14810deb94c40a05f1f0eb3c91403", "Landscape Quality",
                CONCEPTS, "landscape-quality.txt"),
    FamilyModel("portrait-quality", "portrait-quality", "de9bd05cfdbf4534af151beb2a5d0953", "Portrait Quality",
                CONCEPTS, "portrait-quality.txt"),
    FamilyModel("embedding", "general-image-embedding", "bbb5f41425b8468d9b7a554ff10f8581",
                "General Image Embedding", EMBEDDING, model_type_id="visual-embedder", output_field="embeddings"),
    FamilyModel("color", "color-recognition", "eeed0b6733a644cea07cf4c60f87ebb7", "Color Recognition", COLOR,
                model_type_id="color-recognizer", output_field="colors"),
    # localtag's own (Rekognition's extras; no Clarifai id): brightness, sharpness, contrast, 12 colour names
    FamilyModel("image-properties", "image-properties", "image-properties", "Image Properties", PROPERTIES,
                model_type_id="image-properties", output_field="metadata"),
)

_BY_ID = {i: m for m in FAMILY for i in (m.id, m.legacy_id, m.key)}


def by_id(model_id: str | None) -> FamilyModel | None:
    """The family model a string id, a legacy v2 id or a localtag key names."""
    return _BY_ID.get(model_id or "")


def shipped_vocabularies() -> list[str]:
    """The vocabulary files of the concept models (in localtag/data/), for ``models import``/``pull``."""
    return [m.vocab for m in FAMILY if m.vocab]
