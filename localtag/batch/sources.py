"""Batch sources: what a ``batch run SOURCE...`` names, as a stream of items, and each item's bytes.

A SOURCE is one of:

- a folder or an image file (walked as ``localtag tag`` walks them: sorted, image suffixes);
- a list file: ``.txt`` (one path or URL a line, ``#`` comments), ``.csv`` (the ``uri``, ``url`` or
  ``path`` column, else the first), ``.parquet`` (a ``uri``, ``url`` or ``path`` column). Relative
  paths are relative to the list file;
- a WebDataset ``.tar`` shard: each image member is an item, read by offset, never unpacked;
- ``s3://bucket/prefix`` (or any pyarrow filesystem URI such as ``gs://``): the objects under the
  prefix with an image suffix. The endpoint and keys come from the usual ``AWS_*`` variables
  (``AWS_ENDPOINT_URL`` for an S3-compatible server);
- ``directus://`` (optionally ``directus://?filter=<JSON filter on directus_files>``): the images of
  the Directus at ``--directus-url`` / ``LOCALTAG_DIRECTUS_URL``.

An item is ``{"id", "uri", "offset", "length"}``. ``uri`` is a path, an http(s) URL (fetched through
the server's guarded fetcher, so private addresses are refused), ``s3://…``, ``tar-path#member`` or
``directus://files/<id>``. Items stream: planning 10 M items never holds them all.

Local paths follow the one rule ``tag`` follows: **symlinks are never resolved**; an image is named by
the path it was found under. A batch run makes that path absolute (:func:`local_path`: the working
directory prepended, ``.`` and ``..`` collapsed as text) because it is resumed, exported and read by
workers from other working directories; ``tag`` prints it as given.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..core import errors
from ..core.errors import ImageError
from ..core.fetch import redact
from ..core.sources import IMAGE_SUFFIXES, walk
from ..directus.client import DirectusClient, DirectusError

URI_COLUMNS = ("uri", "url", "path")
DIRECTUS_PREFIX = "directus://files/"


class SourceError(ValueError):
    """A SOURCE argument that cannot be read at all (the run does not start)."""


def _item(uri: str, offset: int | None = None, length: int | None = None, id: str | None = None) -> dict:
    return {"id": id or uri, "uri": uri, "offset": offset, "length": length}


def _is_remote(s: str) -> bool:
    return "://" in s


def local_path(path: str | Path) -> str:
    """A local path as an item's uri: absolute, symlinks kept (the module docstring's rule)."""
    return os.path.abspath(path)


def normalize(source: str) -> str:
    """The SOURCE as the plan records it (an absolute path for local ones, symlinks kept)."""
    return source if _is_remote(source) else local_path(source)


def iter_items(sources: list[str], settings: Any) -> Iterator[dict]:
    """Every item of every source, in order."""
    for s in sources:
        if s.startswith("directus:"):
            yield from _directus(s, settings)
        elif _is_remote(s):
            yield from _object_store(s)
        else:
            p = Path(s)
            if not p.exists():
                raise SourceError(f"{s}: no such file or folder")
            suffix = p.suffix.lower()
            if p.is_dir() or suffix in IMAGE_SUFFIXES:
                for job in walk([p]):  # an entry that cannot be read fails when it is read
                    yield _item(local_path(job.key))
            elif suffix == ".tar":
                yield from _tar(p)
            elif suffix in (".txt", ".lst"):
                yield from _lines(p)
            elif suffix == ".csv":
                yield from _csv(p)
            elif suffix == ".parquet":
                yield from _parquet(p)
            else:
                raise SourceError(f"{s}: not a folder, an image, a .txt/.csv/.parquet list or a .tar shard")


def _entry(value: str, base: Path) -> dict | None:
    value = value.strip()
    if not value or value.startswith("#"):
        return None
    if _is_remote(value):
        return _item(value)
    p = Path(value)
    return _item(local_path(p if p.is_absolute() else base / p))


def _lines(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if (it := _entry(line, path.parent)) is not None:
                yield it


def _csv(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip().lower() for h in header]
        col = next((names.index(c) for c in URI_COLUMNS if c in names), None)
        if col is None:  # no header: the first column, first row included
            col = 0
            if (it := _entry(header[0], path.parent)) is not None:
                yield it
        for row in reader:
            if len(row) > col and (it := _entry(row[col], path.parent)) is not None:
                yield it


def _parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    col = next((c for c in URI_COLUMNS if c in names), None)
    if col is None:
        raise SourceError(f"{path}: no {'/'.join(URI_COLUMNS)} column (it has {names[:8]})")
    for batch in pf.iter_batches(columns=[col], batch_size=8192):
        for value in batch.column(0).to_pylist():
            if value and (it := _entry(str(value), path.parent)) is not None:
                yield it


def _tar(path: Path) -> Iterator[dict]:
    """WebDataset: members with an image suffix, addressed by their data offset (read without unpacking)."""
    path = Path(local_path(path))
    with tarfile.open(path, "r:") as tar:  # plain tar only: an offset into a compressed one means nothing
        for m in tar:
            if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES:
                yield _item(f"{path}#{m.name}", m.offset_data, m.size)


def _object_store(uri: str) -> Iterator[dict]:
    from pyarrow import fs as pafs

    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
        raise SourceError(f"{redact(uri)}: {e}") from None
    scheme = urlsplit(uri).scheme
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        yield _item(uri)
        return
    selector = pafs.FileSelector(root.rstrip("/"), recursive=True, allow_not_found=False)
    try:
        infos = filesystem.get_file_info(selector)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"{redact(uri)}: {e}") from None
    for fi in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        if Path(fi.path).suffix.lower() in IMAGE_SUFFIXES:
            yield _item(f"{scheme}://{fi.path}")


def _directus(source: str, settings: Any) -> Iterator[dict]:
    query = parse_qs(urlsplit(source).query)
    filt = None
    if "filter" in query:
        try:
            filt = json.loads(query["filter"][0])
        except ValueError as e:
            raise SourceError(f"directus source: the filter is not JSON: {e}") from None
    with _directus_client(settings) as client:
        for file_id in (row["id"] for row in client.iter_files(filt, 100, ["id"])):
            yield _item(DIRECTUS_PREFIX + file_id, id=file_id)


def _directus_client(settings: Any) -> Any:
    if not settings.directus_url:
        raise SourceError("a directus:// source needs --directus-url or LOCALTAG_DIRECTUS_URL")
    if settings.directus_token is None:
        raise SourceError("a directus:// source needs --token or LOCALTAG_DIRECTUS_TOKEN")
    return DirectusClient(settings.directus_url, settings.directus_token.get_secret_value())


class Opener:
    """Item → the pipeline's job source: a path (read by a decode worker) or a callable giving the bytes
    (run in the pipeline's fetch threads). One per worker; connections are made on first use."""

    def __init__(self, settings: Any):
        self.settings = settings
        self._fetch_url: Callable[[str], bytes] | None = None
        self._directus: Any = None
        self._filesystems: dict[str, Any] = {}

    def source(self, item: dict) -> Any:
        uri = item["uri"]
        if uri.startswith(DIRECTUS_PREFIX):
            return lambda: self._read_directus(uri[len(DIRECTUS_PREFIX):])
        if uri.startswith(("http://", "https://")):
            if self._fetch_url is None:
                self._fetch_url = url_fetcher(self.settings)
            fetch = self._fetch_url
            return lambda: fetch(uri)
        if _is_remote(uri):
            return lambda: self._read_object(uri)
        if item.get("offset") is not None:
            return lambda: self._read_member(uri, int(item["offset"]), int(item["length"]))
        return uri

    def _read_member(self, uri: str, offset: int, length: int) -> bytes:
        path = uri.rsplit("#", 1)[0]
        if length > self.settings.max_bytes:
            raise ImageError("too_many_bytes", f"{uri}: {length} bytes is over the limit")
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError as e:
            raise ImageError(errors.NOT_FOUND, f"{path}: {e.strerror}") from None
        if len(data) != length:
            raise ImageError(errors.FETCH_FAILED, f"{uri}: the tar ends inside the member")
        return data

    def _read_object(self, uri: str) -> bytes:
        from pyarrow import fs as pafs

        scheme = urlsplit(uri).scheme
        try:
            if scheme not in self._filesystems:
                self._filesystems[scheme] = pafs.FileSystem.from_uri(uri)[0]
            filesystem = self._filesystems[scheme]
            path = uri.split("://", 1)[1]
            with filesystem.open_input_stream(path) as f:
                data = f.read(self.settings.max_bytes + 1)
        except FileNotFoundError:
            raise ImageError(errors.NOT_FOUND, f"{redact(uri)}: no such object") from None
        except Exception as e:  # noqa: BLE001 - pyarrow's own errors
            raise ImageError(errors.FETCH_FAILED, f"{redact(uri)}: {type(e).__name__}: {e}") from None
        if len(data) > self.settings.max_bytes:
            raise ImageError("too_many_bytes", f"{redact(uri)}: over the byte limit")
        return data

    def _read_directus(self, file_id: str) -> bytes:
        if self._directus is None:
            self._directus = _directus_client(self.settings)
        try:
            return self._directus.download(file_id, max_bytes=self.settings.max_bytes)
        except DirectusError as e:  # one file's failure is its own error row
            kind = (errors.NOT_FOUND if e.status in (403, 404) else
                    errors.TOO_MANY_BYTES if e.code == "TOO_LARGE" else errors.FETCH_FAILED)
            raise ImageError(kind, f"directus file {file_id}: {e}") from None


def url_fetcher(settings: Any) -> Callable[[str], bytes]:
    """``url → bytes`` through the server's guarded fetcher (public addresses only, caps, timeouts)."""
    import asyncio

    from ..core.fetch import FetchPolicy, fetch

    policy = FetchPolicy.from_settings(settings)
    return lambda url: asyncio.run(fetch(url, policy))  # in a pipeline fetch thread: its own event loop
