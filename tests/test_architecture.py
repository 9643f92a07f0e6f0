"""The architecture, checked from the source: no import cycles, one module runs the image tower, the
web and gRPC stacks only where they are served, commands only in ``cli_*`` modules, and a start-up
that loads only what the command needs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "localtag"
#: the only modules that may import these (top level or inside a function)
ALLOWED = {
    "fastapi": {"server", "directus_flow", "service"},
    "starlette": {"server"},
    "uvicorn": {"cli_serve", "http_config"},
    "h11": {"http_config"},
    "grpc": {"grpc_service"},
    "clarifai_grpc": {"grpc_service"},
    "prometheus_client": {"server", "service"},
    "ray": {"batch_ray"},
}


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def imports(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(localtag modules, third-party top-level packages) a module imports anywhere in its body."""
    local, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                local |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.level == 0 and node.module:
                (local if node.module.startswith("localtag") else external).add(
                    node.module.split(".")[1] if node.module.startswith("localtag.") else node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                external.add(a.name.split(".")[0])
    return local, external


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports(tree)[0] & set(mods) for name, tree in mods.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, [*path, d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_leaf_modules_import_nothing_of_localtag():
    mods = modules()
    for leaf in ("prompts", "errors", "tag", "numeric", "limits", "addresses", "labels", "devices"):
        assert imports(mods[leaf])[0] == set(), leaf


def test_one_module_runs_the_image_tower():
    """The encoder runs the tower precision.prepare_image_tower builds (the one `auto` times); nothing
    calls open_clip's encode_image, a second path with its own precision."""
    def callers(attr: str) -> list[str]:
        return sorted(name for name, tree in modules().items()
                      if any(isinstance(n, ast.Attribute | ast.Name) and getattr(n, "attr", getattr(n, "id", None)) == attr
                             for n in ast.walk(tree)))
    assert callers("encode_image") == []
    assert callers("prepare_image_tower") == ["encoder", "precision"]


def test_heavy_stacks_only_where_they_are_served():
    for name, tree in modules().items():
        for package in imports(tree)[1]:
            if package in ALLOWED:
                assert name in ALLOWED[package], f"localtag.{name} imports {package}"


def test_commands_live_in_cli_modules():
    for name, tree in modules().items():
        if name.startswith("cli") or name == "__main__":
            continue
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert not calls & {"add_parser", "add_subparsers", "add_argument"}, f"localtag.{name} defines a command"
        assert "argparse" not in imports(tree)[1], f"localtag.{name} imports argparse"


def test_every_command_module_is_registered():
    from localtag import cli

    registered = {m.__name__.rsplit(".", 1)[1] for m in cli.COMMANDS}
    on_disk = {p.stem for p in PACKAGE.glob("cli_*.py")} - {"cli_common"}
    assert registered == on_disk


def _loaded_after(code: str) -> list[str]:
    probe = ("import sys\n" + code + "\nprint(__import__('json').dumps(sorted(m for m in "
             "('torch', 'numpy', 'fastapi', 'starlette', 'uvicorn', 'grpc', 'prometheus_client', 'ray') "
             "if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_startup_loads_only_what_the_command_needs():
    """A real process is the point: what `localtag --help` and `localtag tag` import."""
    assert _loaded_after("from localtag import cli\ncli.build_parser().format_help()") == []
    loaded = _loaded_after("from localtag import cli\nimport contextlib, io\n"
                           "with contextlib.redirect_stdout(io.StringIO()):\n"
                           "    assert cli.main(['tag', 'samples/000000000309.jpg', '--model', 'cifar10-tiny',"
                           " '--no-cache', '--device', 'cpu']) == 0")
    assert loaded == ["numpy", "torch"]
