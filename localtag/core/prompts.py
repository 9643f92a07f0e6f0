"""Zero-shot prompts (a leaf module: constants only).

``TEMPLATES`` are averaged per concept (CLIP's prompt ensembling); ``NEUTRAL_PROMPTS`` are the fixed
"no particular concept" side of binary scoring (see :mod:`localtag.core.tagger`). A model folder may ship
its own ``templates.txt``, which replaces ``TEMPLATES``.
"""

TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a photo showing {}.",
    "an image of {}.",
)
NEUTRAL_PROMPTS = ("a photo.", "an image.", "a picture.", "a photo of something.", "a photo of an object.")
