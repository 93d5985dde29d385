"""Packaging rules a registry install depends on."""
import ast
import os
import re
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def test_pyproject_dependencies_mirror_requirements_and_omit_torch():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    reqs = _requirements()
    assert project["project"]["dependencies"] == reqs
    assert not [r for r in reqs if re.match(r"^(torch|torchvision|torchaudio|xformers)\b", r)]
    comfy = project["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"] and comfy["Icon"] and comfy["requires-comfyui"]


def test_pack_entrypoint_is_v3_only():
    tree = ast.parse(open(os.path.join(ROOT, "__init__.py")).read())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert "comfy_entrypoint" in names
    assert "NODE_CLASS_MAPPINGS" not in assigned


def test_library_never_imports_comfyui():
    code = ("import importlib, pkgutil, sys, dreampose; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(dreampose.__path__, 'dreampose.') "
            "if not m.name.endswith('__main__')]; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_unsafe_torch_load_or_downloads_in_shipped_code():
    offenders = []
    for folder in ("dreampose", "nodes"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    text = open(os.path.join(dirpath, name)).read()
                    for m in re.finditer(r"torch\.load\((.*)\)", text):
                        if "weights_only=True" not in m.group(1):
                            offenders.append(f"{name}: {m.group(0)}")
                    for bad in (r"hf_hub_download", r"snapshot_download", r"urlretrieve",
                                r"(?<![\w.])eval\(", r"(?<![\w.])exec\("):
                        if re.search(bad, text):
                            offenders.append(f"{name}: {bad}")
    assert offenders == []


def test_readme_first_screen_gives_the_two_commands_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()[:25]
    assert any("scripts/setup.sh" in line and "dreampose demo" in line for line in readme)
    assert any(line.strip() == "bash scripts/test.sh" for line in readme)
    assert "bash scripts/test.sh" in open(os.path.join(ROOT, ".ci", "run")).read()


def test_registry_validation_rules_pass():
    """`comfy node validate` runs ruff S102 (exec), S307 (eval), E702 (several statements on a line)."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "S102,S307,E702",
                             "--exclude", ".venv", "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_comfy_node_validate_passes(tmp_path):
    """The registry's own pre-publish check, `comfy node validate` (comfy-cli, installed by scripts/setup.sh).

    It parses pyproject.toml ([project] version, license, classifiers, `requires-comfyui`; bad values are
    printed as "Warning: ..." and the field dropped, an empty version is an error) and runs
    `ruff check . --select S102,S307,E702 --exit-zero`, which prints findings but never fails. So exit 0
    alone proves little: the output must also carry the all-clear line and no warning. Offline, no prompt,
    no telemetry, no workspace needed; HOME points at tmp_path so the user's comfy-cli config is untouched.
    """
    import importlib.util

    assert importlib.util.find_spec("comfy_cli") is not None, (
        f"comfy-cli is not installed for {sys.executable}: run `bash scripts/setup.sh`")
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"),
               DO_NOT_TRACK="1", COMFY_NO_TELEMETRY="1", RUFF_NO_CACHE="true",
               NO_COLOR="1", TERM="dumb", COLUMNS="200", PYTHONIOENCODING="utf-8")
    env.pop("COMFY_OUTPUT", None)
    result = subprocess.run([sys.executable, "-m", "comfy_cli", "--skip-prompt", "--no-enable-telemetry", "--no-json",
                             "node", "validate"],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", timeout=120)
    out = result.stdout
    assert result.returncode == 0, out
    assert "Running security checks" in out and "All validation checks passed successfully" in out, out
    problems = [line for line in out.splitlines() if re.search(r"warning|error|invalid|S102|S307|E702", line, re.I)]
    assert problems == [], out
