"""Clarifai's request bodies as pydantic models: documentation and validation. Unknown fields are
ignored, as Clarifai's clients send many."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Lenient(BaseModel):
    """A request part that ignores unknown fields (Clarifai's clients send many)."""

    model_config = ConfigDict(extra="ignore")


class ImageIn(Lenient):
    url: str | None = None
    base64: str | None = Field(None, description="standard base64 of the image bytes")


class DataIn(Lenient):
    image: ImageIn | None = None


class InputIn(Lenient):
    id: str | None = None
    data: DataIn | None = None


class ConceptSelector(Lenient):
    id: str | None = None
    name: str | None = None


class OutputConfig(Lenient):
    max_concepts: int | None = Field(None, ge=0)
    min_value: float | None = Field(None, ge=0.0, le=1.0)
    select_concepts: list[ConceptSelector] | None = None
    language: str | None = None


class OutputInfo(Lenient):
    output_config: OutputConfig | None = None


class ModelVersionIn(Lenient):
    id: str | None = None
    output_info: OutputInfo | None = None


class ModelIn(Lenient):
    id: str | None = None
    output_info: OutputInfo | None = None
    model_version: ModelVersionIn | None = None


class UserAppId(Lenient):
    user_id: str | None = None
    app_id: str | None = None


class PredictRequest(Lenient):
    user_app_id: UserAppId | None = None
    model_id: str | None = None
    version_id: str | None = None
    inputs: list[InputIn] = Field(default_factory=list)
    model: ModelIn | None = None


