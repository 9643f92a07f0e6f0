"""Sources: what to tag, as :class:`~localtag.core.pipeline.Job` s, lazily (a folder of millions stays flat).

:func:`walk` takes files and folders. Folders are walked in sorted order and give their image-suffixed
files; only regular files are read. An entry that cannot be read (a dangling or looping symlink, a
socket or FIFO named ``*.jpg``, an unreadable subfolder) becomes a job whose source is the
:class:`~localtag.core.errors.ImageError` saying why: it fails alone, with its message, and the walk goes on.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

from .errors import NOT_FOUND, NOT_IMAGE, URL_REFUSED, ImageError
from .pipeline import Job

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".jfif", ".heic", ".heif",
                  ".avif"}


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")


def _entry(path: Path) -> Job:
    """A job for one walked file: its path, or the error that says why it cannot be read."""
    try:
        st = os.stat(path)
    except OSError as e:
        return Job(str(path), ImageError(NOT_FOUND, f"cannot read: {e.strerror or e}"))
    if not stat.S_ISREG(st.st_mode):
        return Job(str(path), ImageError(NOT_IMAGE, f"not a regular file ({file_kind(st.st_mode)})"))
    return Job(str(path), path)


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def walk(paths: Iterable[str | Path]) -> Iterator[Job]:
    """Jobs for files and (walked, sorted) folders; see the module docstring."""
    for p in paths:
        p = Path(p)
        if not p.is_dir():
            yield Job(str(p), p)  # named explicitly: read as it is (decode says what is wrong)
            continue
        unreadable: list[OSError] = []
        for root, dirs, files in os.walk(p, onerror=unreadable.append):
            while unreadable:
                e = unreadable.pop(0)
                yield Job(str(e.filename or root), ImageError(NOT_FOUND, f"folder not read: {e.strerror or e}"))
            dirs.sort()
            for name in sorted(files):
                if is_image_name(name):
                    yield _entry(Path(root) / name)
        for e in unreadable:
            yield Job(str(e.filename or p), ImageError(NOT_FOUND, f"folder not read: {e.strerror or e}"))


def is_url(text: str | Path) -> bool:
    return isinstance(text, str) and text.lower().startswith(("http://", "https://"))


def inputs(items: Iterable[str | Path], settings=None) -> Iterator[Job]:
    """Jobs for what a command line names: files, folders (walked) and ``http(s)://`` URLs, fetched by
    the server's guarded fetcher (public addresses only unless allowed, byte cap, timeouts) on the
    pipeline's event loop. Without ``settings`` a URL is refused."""
    policy = None
    for item in items:
        if not is_url(item):
            yield from walk([item])
            continue
        if settings is None:
            yield Job(str(item), ImageError(URL_REFUSED, "URLs are not taken here"))
            continue
        from .fetch import FetchPolicy, fetch

        policy = policy or FetchPolicy.from_settings(settings)
        yield Job(str(item), partial(fetch, str(item), policy))
