#!/usr/bin/env python3
"""Run a probe script inside a real ComfyUI (no server, no prompt): core's modules imported as
ComfyUI itself imports them, the pack imported as a package (``dreampose_pack``), so a test can
compare what core computes with what the library computes on the same weights.

  python probe.py --comfy DIR --pack PACK_DIR SCRIPT.py [--flag ...]

Extra ``--flag`` values are passed to ComfyUI's own command line; ``--vram-state`` sets the memory
mode ``--lowvram``/``--novram`` would (ComfyUI allows neither with ``--cpu``). The script
runs with ``pack`` (the imported pack) in its globals and prints its result as the last line (JSON).
"""
import argparse
import importlib
import importlib.util
import os
import runpy
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--pack", required=True)
    ap.add_argument("script")
    ap.add_argument("--flag", action="append", default=[], help="a ComfyUI command-line flag, e.g. --fp16-unet")
    ap.add_argument("--vram-state", choices=["LOW_VRAM", "NO_VRAM"],
                    help="the memory mode --lowvram / --novram set on a GPU host (ComfyUI refuses them with --cpu): "
                         "core then loads models partially, casting the rest from the offload device")
    a = ap.parse_args()
    sys.path.insert(0, os.path.realpath(a.comfy))
    sys.argv = [sys.argv[0], "--cpu", *a.flag]
    import comfy.options
    comfy.options.enable_args_parsing()
    if a.vram_state:
        import comfy.model_management as mm
        mm.vram_state = mm.VRAMState[a.vram_state]
    import folder_paths  # noqa: F401  (the pack registers its folders with it)
    pack = os.path.realpath(a.pack)
    spec = importlib.util.spec_from_file_location("dreampose_pack", os.path.join(pack, "__init__.py"),
                                                  submodule_search_locations=[pack])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dreampose_pack"] = module
    spec.loader.exec_module(module)
    importlib.import_module("dreampose_pack.nodes")
    sys.path.insert(0, os.path.join(pack, "tests"))
    runpy.run_path(a.script, init_globals={"pack": module}, run_name="__probe__")


if __name__ == "__main__":
    main()
