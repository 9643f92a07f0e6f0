"""Settings: CLI flags > environment (``LOCALTAG_*``) > defaults.

Every adapter (CLI, REST, gRPC, Directus) builds one :class:`Settings` and passes it down.
Flags override by passing keyword arguments: ``Settings(**flags)`` wins over the environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


def shipped(name: str) -> Path:
    """A vocabulary shipped in the package (``localtag/data/``), read through importlib.resources so an
    installed wheel finds it in site-packages like a checkout finds it in the tree."""
    from importlib.resources import files

    path = Path(str(files("localtag") / "data" / name))
    if not path.is_file():
        raise FileNotFoundError(f"{name}: not shipped with this localtag ({path.parent})")
    return path
DEFAULT_MODEL = "ViT-B-32-256.datacomp_s34b_b86k"


def default_models_dir() -> Path:
    """``./models`` of a source checkout, else ``~/.local/share/localtag/models``."""
    here = REPO_ROOT / "models"
    if here.is_dir():
        return here
    return Path.home() / ".local" / "share" / "localtag" / "models"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "localtag"


def default_heads_dir() -> Path:
    """Learnt heads are data a person made (not a cache): ``~/.local/share/localtag/heads``."""
    return Path.home() / ".local" / "share" / "localtag" / "heads"


class Settings(BaseSettings):
    # hide_input_in_errors: a bad value (an API key, a token) is never echoed in an error message
    model_config = SettingsConfigDict(env_prefix="LOCALTAG_", extra="ignore", hide_input_in_errors=True)

    # model store and vocabulary
    models_dir: Path = Field(default_factory=default_models_dir)
    model: str = DEFAULT_MODEL
    vocab: Path | None = None  # None: the model's own vocab.txt, else the shipped localtag/data/vocab.txt
    cache_dir: Path = Field(default_factory=default_cache_dir)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"  # the image tower's (localtag.core.precision)
    # learnt concepts (localtag.core.learn, docs/learn.md): where `learn` stores heads, and the head to score with
    heads_dir: Path = Field(default_factory=default_heads_dir)
    model_head: str | None = None  # a head name in heads_dir or a .npz path: it replaces the vocabulary

    # scoring
    scoring: str = "binary"
    max_concepts: int = 20
    min_value: float = 0.0
    language: str | None = None  # concept names in one of Clarifai's 23 languages (localtag.core.languages)

    # decoding limits
    max_pixels: int = 85_000_000
    max_bytes: int = 20_000_000
    fast_decode: bool = False

    # batching
    batch_size: int = 32  # <= 0: chosen automatically (32 on CPU, measured on CUDA)
    workers: int = 2
    compile: bool = False  # torch.compile the image tower (CUDA batch runs)
    embedding_cache: bool = True  # `tag`/`embed` keep image embeddings in cache_dir for `retag`

    # app store (localtag.app): None = <cache_dir>/apps
    app_dir: Path | None = None
    app_max_inputs: int = 1_000_000  # inputs per app
    app_max_blob_bytes: int = 20_000_000  # bytes of one stored image
    app_max_per_page: int = 1000  # hits or inputs per page
    app_ann_min_rows: int = 20_000  # an app this large searches a faiss PQ index (+ exact re-rank), not exactly
    app_max_inputs_per_call: int = 128  # inputs in one PostInputs call (Clarifai's cap)
    app_max_query_chars: int = 1000  # characters of a search's text query
    app_client_inputs_per_minute: int = 6000  # inputs one client address may add per minute (0: no cap)

    # server
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int | None = None
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)  # env: a JSON list
    api_keys_file: Path | None = None
    allow_public_bind: bool = False
    allow_hosts: list[str] = Field(default_factory=list)
    fetch_timeout: float = 10.0
    max_redirects: int = 5
    batch_window_ms: float = 5.0
    max_queue: int = 512
    max_request_bytes: int = 128_000_000
    # slow and hostile clients (docs/server.md "Limits and hardening")
    header_timeout: float = 10.0  # a request's headers must arrive within this many seconds
    body_timeout: float = 30.0  # a request's body must arrive in full within this many seconds
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1024  # open connections (uvicorn's limit_concurrency); past it 503
    max_body_readers: int = 768  # request bodies being read at once; past it 503
    max_header_bytes: int = 65_536  # request line and headers
    # per client (IP address), and budgets across all requests (docs/server.md "Limits and hardening"); 0: no cap
    max_client_connections: int = 128  # open HTTP connections from one address
    max_client_body_readers: int = 64  # request bodies being read at once from one address
    min_upload_rate: int = 10_000  # bytes/s a body must keep up after its first few seconds
    connection_max_age: float = 600.0  # a connection is closed after this (after its current answer)
    max_body_bytes: int = 512_000_000  # bytes of request bodies still arriving, all requests together
    max_client_body_bytes: int = 160_000_000  # the same, for one address
    max_spool_bytes: int = 256_000_000  # bytes of Filestack uploads spooled to temp files, all together
    max_client_spool_bytes: int = 64_000_000  # the same, for one address
    grpc_max_connections: int = 256  # open gRPC connections; past it new ones are closed at once
    grpc_idle_timeout: float = 300.0  # a gRPC connection with no call for this long is closed (GOAWAY)
    # decode work (docs/server.md "Limits and hardening"): pixels decoded per request, and being decoded at once
    max_request_pixels: int = 256_000_000
    max_decode_pixels: int = 100_000_000
    # more Clarifai model ids: {"id": ["model name or folder", "vocab file or null"]} (a bare string: model only)
    model_ids: dict[str, tuple[str, Path | None]] = Field(default_factory=dict)

    # directus
    directus_url: str | None = None
    directus_token: SecretStr | None = None
    flow_secret: SecretStr | None = None
    # what `directus sync` and the flow write by default: tags whose value is at least this (a calibrated
    # probability when the model has a calibration; the vocabulary's per-concept thresholds apply too)
    directus_min_value: float = 0.5
    directus_max_concepts: int = 10
    directus_retry_window: float = 300.0  # seconds `sync` waits for an unreachable Directus to come back
    directus_language: str | None = None  # the language of the tags `sync` and the flow write (None: English)
    directus_app: str | None = None  # the app `sync` fills and `directus search` searches (None: no app)

    @field_validator("language", "directus_language")
    @classmethod
    def _language(cls, v: str | None) -> str | None:
        from .languages import check

        return check(v)

    @field_validator("host", mode="before")
    @classmethod
    def _bare_host(cls, v: Any) -> Any:
        """``[::1]`` (the URL form) binds as ``::1``."""
        if isinstance(v, str) and v.startswith("[") and v.endswith("]"):
            return v[1:-1]
        return v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _key_list(cls, v: Any) -> Any:
        """A JSON list of non-empty strings; messages never show a key."""
        expected = 'LOCALTAG_API_KEYS must be a JSON list of strings, e.g. \'["key-1", "key-2"]\''
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                raise ValueError(expected) from None
        if not isinstance(v, list | tuple):
            raise ValueError(expected)
        for i, k in enumerate(v, 1):
            raw = k.get_secret_value() if isinstance(k, SecretStr) else k
            if not isinstance(raw, str):
                raise ValueError(f"{expected} (entry {i} is not a string)")
            if not raw.strip():
                raise ValueError(f"API key {i} of {len(v)} is empty: remove it, or set no keys at all")
        return v

    @field_validator("model_ids", mode="before")
    @classmethod
    def _model_id_pairs(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: (p, None) if isinstance(p, str) else (p.get("model"), p.get("vocab")) if isinstance(p, dict)
                    else p for k, p in v.items()}
        return v

    def resolved_vocab(self, model_vocab: Path | None) -> Path:
        """The vocabulary to use: explicit setting, else the model's own, else the shipped default."""
        if self.vocab is not None:
            return self.vocab
        if model_vocab is not None:
            return model_vocab
        return shipped("vocab.txt")

    def resolved_app_dir(self) -> Path:
        """Where the app store lives: ``app_dir``, else ``<cache_dir>/apps``."""
        return Path(self.app_dir) if self.app_dir else Path(self.cache_dir) / "apps"
