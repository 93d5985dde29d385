"""Node help pages: web/docs/<NodeId>.md for every node, served where the 0.3.75 frontend fetches them.

comfyui_frontend_package 1.32 (NodeHelpService.fetchCustomNodeHelp) asks for
/extensions/<pack>/docs/<NodeId>/<locale>.md, then /extensions/<pack>/docs/<NodeId>.md, where
<pack> is python_module's second part ("custom_nodes.<pack>", cut at "@"). ComfyUI serves a pack's
WEB_DIRECTORY under /extensions/<folder name>; the host test resolves those paths through the real
server's router (tests/comfy_host/headless.py --resolve) and checks they reach our files.
"""
from __future__ import annotations

import json
import re

import pytest

from host_helpers import COMFY_DIR, PACK, ROOT, Env, log

DOCS = ROOT / "web" / "docs"


def node_ids() -> list[str]:
    """The IDs in nodes/*.py (node_id="..."), read without importing ComfyUI."""
    ids = []
    for path in sorted((ROOT / "nodes").glob("*.py")):
        ids += re.findall(r'node_id="([A-Za-z0-9_]+)"', path.read_text())
    return ids


def test_every_node_has_a_help_page():
    ids = node_ids()
    assert len(ids) >= 10
    for node_id in ids:
        page = DOCS / f"{node_id}.md"
        assert page.exists(), f"no help page for {node_id}"
        text = page.read_text()
        assert text.startswith("# ") and "## Inputs" in text and "## Outputs" in text, node_id
    assert {p.stem for p in DOCS.glob("*.md")} == set(ids), "a page for a node that does not exist"


@pytest.mark.host
def test_help_pages_are_served_where_the_frontend_looks(tmp_path):
    if COMFY_DIR is None:
        pytest.skip("no ComfyUI host installed: run tests/comfy_host/setup_host.sh (scripts/test.sh does)")
    env = Env(tmp_path)
    oi_path, served_path = tmp_path / "oi.json", tmp_path / "served.json"
    ours = sorted(node_ids())
    urls = [f"/extensions/{PACK}/docs/{n}.md" for n in ours]
    proc = env.run("docs", None, "--object-info", str(oi_path), "--resolve", *urls, "--resolve-log", str(served_path))
    assert proc.returncode == 0, log(proc)
    oi = json.loads(oi_path.read_text())
    in_host = sorted(k for k, v in oi.items() if v["python_module"] == f"custom_nodes.{PACK}")
    assert in_host == ours
    served = json.loads(served_path.read_text())
    for node_id in in_host:
        pack = oi[node_id]["python_module"].split(".")[1].split("@")[0]  # the frontend's extractCustomNodeName
        url = f"/extensions/{pack}/docs/{node_id}.md"
        assert served[url] is not None, f"{url} is not served"
        assert (DOCS / f"{node_id}.md").samefile(served[url])
