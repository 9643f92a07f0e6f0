"""Clarifai's 23 concept languages: the codes ``output_config.language`` and ``--language`` take.

English is each concept's own name; the other 22 are ``lang.XX`` columns of a vocabulary (built from
``tools/vocab/sources/lang/<code>.tsv``). A leaf module: no localtag imports.
"""

from __future__ import annotations

LANGUAGES = ("ar", "bn", "da", "de", "en", "es", "fi", "fr", "hi", "hu", "it", "ja", "ko", "nl", "no", "pa",
             "pl", "pt", "ru", "sv", "tr", "zh", "zh-TW")
_BY_KEY = {code.lower(): code for code in LANGUAGES}


def canonical(language: str) -> str | None:
    """The code as listed (``zh-tw``/``zh_TW`` → ``zh-TW``, ``de-AT`` → ``de``), or None when unknown."""
    key = language.strip().lower().replace("_", "-")
    return _BY_KEY.get(key) or _BY_KEY.get(key.split("-")[0]) if key else None


def check(language: str | None) -> str | None:
    """``language`` as :func:`canonical` gives it (None stays None); ValueError when not one of the 23."""
    if language is None or not language.strip():
        return None
    code = canonical(language)
    if code is None:
        raise ValueError(f"language {language!r} is not one of Clarifai's {len(LANGUAGES)}: {', '.join(LANGUAGES)}")
    return code
