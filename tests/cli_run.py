"""Run ``localtag`` in-process (``localtag.cli.main``), the way a shell would see it: exit status,
stdout, and stderr with the log lines and progress bar in it.

A real process costs ~10 s of imports per call; only tests where the process itself is the point
(the entry point, the hub's environment read at import) use ``subprocess``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def environment(env: dict[str, str] | None):
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_cli(*args: str, env: dict[str, str] | None = None) -> CliResult:
    from localtag import cli

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:  # argparse: usage errors and --help
                code = e.code if isinstance(e.code, int) else 2
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return CliResult(code, out.getvalue(), err.getvalue())
