"""The architecture, checked from the source with ``ast``: wings by job (``core`` knows no adapter, only
``__main__`` imports the CLI, no cycles between modules or wings), one module runs the image tower,
one module scores, the web/gRPC/Ray stacks only where they are served, commands only in ``localtag.cli``,
and a start-up that loads only what the command needs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "localtag"
WINGS = ("core", "serve", "directus", "batch", "cli", "app")
#: the wings each wing may import (besides itself); core imports none
MAY_IMPORT = {
    "core": set(),
    "directus": {"core"},
    "batch": {"core", "directus"},
    "app": {"core"},
    "serve": {"core", "directus", "app"},
    "cli": {"core", "serve", "directus", "batch", "app"},
}
#: modules allowed at the top level of the package
TOP_LEVEL = {"__init__", "__main__"}
#: the only modules that may import these (top level or inside a function)
ALLOWED = {
    "fastapi": {"serve.server", "serve.flow_route", "serve.app_routes", "serve.model_routes"},
    "starlette": {"serve.server", "serve.app_routes"},
    "uvicorn": {"cli.serve", "serve.http_config"},
    "h11": {"serve.http_config"},
    "grpc": {"serve.grpc_service"},
    "clarifai_grpc": {"serve.grpc_service"},
    "prometheus_client": {"serve.server", "serve.metrics"},
    "ray": {"batch.ray_engine"},
}
LEAVES = ("core.prompts", "core.errors", "core.tag", "core.numeric", "core.limits", "core.addresses",
          "core.labels", "core.devices", "core.files", "serve.budgets", "serve.logthrottle")


def name_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {name_of(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _package_of(name: str, mods: dict) -> list[str]:
    parts = name.split(".")
    is_pkg = (PACKAGE.joinpath(*parts) / "__init__.py").is_file() if name not in TOP_LEVEL else False
    return parts if is_pkg else parts[:-1]


def imports(name: str, tree: ast.Module, mods: dict) -> tuple[set[str], set[str]]:
    """(localtag modules, third-party top-level packages) a module imports anywhere in its body."""
    local, external = set(), set()
    here = _package_of(name, mods)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and (node.module == "localtag" or node.module.startswith("localtag.")):
                target = node.module.split(".")[1:]
            else:
                if node.module:
                    external.add(node.module.split(".")[0])
                continue
            dotted = ".".join(target)
            subs = [".".join([*target, a.name]) for a in node.names]
            found = [s for s in subs if s in mods]
            local |= set(found) if found else ({dotted} if dotted in mods else set())
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("localtag."):
                    local.add(a.name.split(".", 1)[1])
                else:
                    external.add(a.name.split(".")[0])
    local.discard(name)
    return local, external


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, tree, mods)[0] & set(mods) for name, tree in mods.items()}


def wing(name: str) -> str:
    return name.split(".")[0]


def test_wings_exist_and_few_modules_stay_at_the_top():
    for w in ("core", "serve", "directus", "batch", "cli"):
        assert (PACKAGE / w / "__init__.py").is_file(), w
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= TOP_LEVEL, f"modules at the top level: {sorted(top - TOP_LEVEL)}"


def test_no_import_cycles():
    g = graph()
    cycles = []
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(g[n]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, [*path, d])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_wings_import_only_the_wings_below_them():
    bad = []
    for name, deps in graph().items():
        w = wing(name)
        if w in TOP_LEVEL:
            continue
        for d in deps:
            if wing(d) != w and wing(d) not in MAY_IMPORT[w]:
                bad.append(f"{name} -> {d}")
    assert not bad, "wing rules broken: " + "; ".join(sorted(bad))


def test_only_main_imports_the_cli():
    importers = sorted(n for n, deps in graph().items() if wing(n) != "cli" and any(wing(d) == "cli" for d in deps))
    assert importers == ["__main__"]


def test_leaf_modules_import_nothing_of_localtag():
    g = graph()
    for leaf in LEAVES:
        assert g[leaf] == set(), leaf


def _callers(attr: str) -> list[str]:
    return sorted(name for name, tree in modules().items()
                  if any(isinstance(n, ast.Attribute) and n.attr == attr for n in ast.walk(tree)))


def test_one_module_runs_the_image_tower():
    """The encoder runs the tower precision.prepare_image_tower builds (the one `auto` times); nothing
    calls open_clip's encode_image, a second path with its own precision."""
    def callers(attr: str) -> list[str]:
        return sorted(name for name, tree in modules().items()
                      if any(isinstance(n, ast.Attribute | ast.Name) and getattr(n, "attr", getattr(n, "id", None)) == attr
                             for n in ast.walk(tree)))
    assert callers("encode_image") == []
    assert callers("prepare_image_tower") == ["core.encoder", "core.precision"]


def test_the_scoring_loop_exists_once():
    """Picking tags from values happens in the scorer and the one loop that applies it to results."""
    assert len(_callers("pick")) <= 2, _callers("pick")


def test_heavy_stacks_only_where_they_are_served():
    mods = modules()
    for name, tree in mods.items():
        for package in imports(name, tree, mods)[1]:
            if package in ALLOWED:
                assert name in ALLOWED[package], f"localtag.{name} imports {package}"


def test_commands_live_in_the_cli_wing():
    mods = modules()
    for name, tree in mods.items():
        if wing(name) == "cli" or name == "__main__":
            continue
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert not calls & {"add_parser", "add_subparsers", "add_argument"}, f"localtag.{name} defines a command"
        assert "argparse" not in imports(name, tree, mods)[1], f"localtag.{name} imports argparse"


def test_every_command_module_is_registered():
    from localtag import cli

    registered = {m.__name__.rsplit(".", 1)[1] for m in cli.COMMANDS}
    on_disk = {p.stem for p in (PACKAGE / "cli").glob("*.py")} - {"__init__", "common"}
    assert registered == on_disk


def test_the_rules_catch_a_broken_layout(tmp_path, monkeypatch):
    """The graph sees relative imports across wings: a core module importing serve is caught."""
    mods = modules()
    tree = ast.parse("from ..serve import service\nfrom . import encoder\n")
    deps = imports("core.fake", tree, mods)[0]
    assert deps == {"serve.service", "core.encoder"}


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
