"""A reported tag (a leaf module): what the tagger picks and every sink writes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tag:
    id: str
    name: str
    value: float
