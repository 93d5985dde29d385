"""The library's layering (CONTRIBUTING.md), checked on the import graph read from the source with ``ast``.

Folders of ``dreampose/`` are layers; a module may import from its own folder or a lower one, never
upward, never in a circle; imports of the package's own modules sit at the top of a module, except in
``cli/`` (which keeps ``--help`` instant); ``nodes/`` uses only the library's public names.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "dreampose"
# bottom to top; the foundation modules are top-level files
LAYERS = [("errors", "settings", "configs"), ("files",), ("models",), ("loaders",), ("pipeline",), ("data",),
          ("training",), ("evaluation",), ("demo",), ("cli",)]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
ENTRY = {"dreampose.__main__", "dreampose.demo_model"}   # forward to cli/ and demo/ only
LOCAL_IMPORTS_ALLOWED = ("dreampose.cli",)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in LIB.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute targets of a ``from … import …`` (a name may be a submodule: both are returned)."""
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def imports(path: Path) -> list[tuple[str, list[str], bool, list[str]]]:
    """(target module, candidate names, inside a function?, imported names) for each import of ``dreampose``."""
    module = module_name(path)
    tree = ast.parse(path.read_text())
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            targets = _resolve(module, path.name == "__init__.py", node)
            found.append((targets[0], targets, id(node) in local, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, [alias.name], id(node) in local, []))
    return [f for f in found if f[0] == "dreampose" or f[0].startswith("dreampose.")]


def layer(module: str) -> int | None:
    parts = module.split(".")
    return RANK.get(parts[1]) if len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    mods = library_modules()
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        for _, targets, _, _ in imports(path):
            edges[m].update(t for t in targets if t in mods and t != m)
    return edges


def test_every_module_is_in_a_layer():
    for m in library_modules():
        assert m == "dreampose" or m in ENTRY or layer(m) is not None, f"{m}: not in a layer of LAYERS"


def test_no_upward_imports():
    bad = []
    for m, path in library_modules().items():
        if m in ENTRY or m == "dreampose":
            continue
        for target, targets, _, names in imports(path):
            if target == "dreampose":   # the package root: only its version string
                assert names == ["__version__"], f"{m} imports {names} from the package root"
                continue
            t = next((x for x in reversed(targets) if x in library_modules()), target)
            if layer(t) > layer(m):
                bad.append(f"{m} → {t}")
    assert bad == []


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" → ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_function_local_imports_outside_the_cli():
    bad = [f"{m}: {target}" for m, path in library_modules().items()
           if not m.startswith(LOCAL_IMPORTS_ALLOWED) and m not in ENTRY
           for target, _, local, _ in imports(path) if local]
    assert bad == []


def test_entry_modules_only_forward():
    for m in ENTRY:
        path = library_modules()[m]
        targets = [t for t, _, _, _ in imports(path)]
        assert targets and all(layer(t) in (RANK["cli"], RANK["demo"]) for t in targets), (m, targets)
        tree = ast.parse(path.read_text())
        assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], m


def test_nodes_use_only_public_library_names():
    bad = []
    for path in (ROOT / "nodes").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and (node.module or "").startswith("dreampose"):
                if any(part.startswith("_") for part in node.module.split(".")):
                    bad.append(f"{path.name}: {node.module}")
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert bad == []


def test_layering_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a models/ module that imports pipeline/ is reported."""
    fake = tmp_path / "dreampose" / "models"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from ..pipeline.sampling import sample\n\n\ndef f():\n"
                                 "    from ..loaders import load\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = imports(fake / "bad.py")
    assert [(t, local) for t, _, local, _ in found] == [("dreampose.pipeline.sampling", False),
                                                        ("dreampose.loaders", True)]
    assert layer("dreampose.pipeline.sampling") > layer("dreampose.models.bad")


HELP_PROBE = r"""
import sys
sys.argv = ["python -m dreampose"]
from dreampose.cli.main import COMMANDS, build_parser, main
names = [None] + sorted(build_parser()._subparsers._group_actions[0].choices)
for name in names:
    try:
        main(["--help"] if name is None else [name, "--help"])
    except SystemExit as exc:
        assert exc.code == 0, (name, exc.code)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "numpy", "cv2"))
print(len(names) - 1, "commands;", "heavy:", heavy[:5])
sys.exit(1 if heavy else 0)
"""


def test_help_imports_neither_torch_nor_diffusers():
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("11 commands; heavy: []")


@pytest.mark.parametrize("name", ["dreampose", "dreampose.settings", "dreampose.cli.main"])
def test_importing_the_package_is_light(name):
    code = (f"import sys, {name}; heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers')]; "
            "sys.exit(1 if heavy else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def test_the_public_api_resolves():
    import dreampose

    for name in dreampose.__all__:
        assert getattr(dreampose, name) is not None, name
    with pytest.raises(AttributeError):
        dreampose.no_such_thing  # noqa: B018


def test_the_repository_cites_only_its_own_files():
    """Docs and docstrings point at files inside the repository, never at notes or data outside it."""
    outside = ["official-code" + "-notes", "comfyui" + "-notes", "design" + ".md", "/work" + "/shared",
               "../" + "shared/"]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for rel in tracked:
        path = ROOT / rel
        if path.suffix not in (".py", ".md", ".sh", ".toml", ".yml", ".yaml", ".json", ".txt") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        bad += [f"{rel}: {word}" for word in outside if word in text]
    assert bad == []
