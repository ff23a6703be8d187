"""The layer rule, read from the source (ast): imports run server -> adapters -> engine -> olora_core only,
and no module of the project imports another module's `_private` name."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("olora_core", "app")
WEB = ("fastapi", "starlette", "sse_starlette", "uvicorn", "fastapi_offline")

# layer (module prefix) -> imports it must never make (module prefixes)
FORBIDDEN = {
    "olora_core": ("app",) + WEB,
    "app.engine": ("app.adapters", "app.server") + WEB,
    "app.adapters": ("app.server",) + WEB,
}

# Cross-module private imports still allowed: none (every module imports only public names of the others). The
# test fails on any new one and on an entry here that no longer exists, so this list can only shrink.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()  # keep empty: make the helper public instead


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from X import ...` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names imported from it) for every import statement, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((resolve(module, path.name == "__init__.py", node), [a.name for a in node.names]))
    return found


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(modules: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(module, module it imports, the forbidden prefix it falls under) for every import against the rule."""
    bad = []
    for module, path in modules.items():
        for layer, forbidden in FORBIDDEN.items():
            if not within(module, layer):
                continue
            for imported, names in imports_of(module, path):
                # `from app import __version__` / `from app.adapters import service` name the submodule imported
                targets = [imported] + [f"{imported}.{n}" for n in names]
                for prefix in forbidden:
                    if any(within(t, prefix) for t in targets):
                        bad.append((module, imported, prefix))
    return bad


def private_imports(modules: dict[str, Path]) -> set[tuple[str, str, str]]:
    found = set()
    for module, path in modules.items():
        for imported, names in imports_of(module, path):
            if imported == module or imported not in modules:
                continue  # a module's own names; third-party modules are not this rule's business
            for name in names:
                if name.startswith("_") and not name.startswith("__") and f"{imported}.{name}" not in modules:
                    found.add((module, imported, name))
    return found


def test_imports_run_one_way_server_adapters_engine_core():
    modules = project_modules()
    assert {"app.server.main", "app.adapters.service", "app.engine.engine", "olora_core.cli"} <= set(modules)
    assert layer_violations(modules) == []
    assert {"app.adapters.served", "app.server.routers.generate"} <= set(modules)


def test_no_module_imports_another_modules_private_name():
    found = private_imports(project_modules())
    assert found - KNOWN_PRIVATE_IMPORTS == set(), "new cross-module private imports"
    assert KNOWN_PRIVATE_IMPORTS - found == set(), "fixed: remove them from KNOWN_PRIVATE_IMPORTS"


@pytest.mark.parametrize("source, module, expected", [
    ("from app.server.deps import AppState", "app.adapters.demo",
     [("app.adapters.demo", "app.server.deps", "app.server")]),
    ("import fastapi.responses", "app.engine.x", [("app.engine.x", "fastapi.responses", "fastapi")]),
    ("from ..server import errors", "app.adapters.x", [("app.adapters.x", "app.server", "app.server")]),
    ("from app import server", "app.adapters.x", [("app.adapters.x", "app", "app.server")]),
    ("from . import engine", "app", []),
    ("from app.engine import Engine", "app.adapters.x", []),
    ("from app.adapters.store import adapter_store", "app.server.x", []),
])
def test_the_checker_catches_what_it_should(tmp_path, source, module, expected):
    """The rule's own check, on small sources: it must see absolute, relative and `from package import module`."""
    path = tmp_path / "x.py"
    path.write_text(source + "\n")
    assert layer_violations({module: path}) == expected


def test_the_checker_sees_private_imports(tmp_path):
    (tmp_path / "x.py").write_text("from .convert import _split_keys, KEY_PREFIX\nimport torch._dynamo\n")
    (tmp_path / "convert.py").write_text("from .x import __doc__\n")
    modules = {"olora_core.x": tmp_path / "x.py", "olora_core.convert": tmp_path / "convert.py"}
    assert private_imports(modules) == {("olora_core.x", "olora_core.convert", "_split_keys")}
