"""ComfyUI-DreamPose: DreamPose (Karras et al., ICCV 2023) for ComfyUI, as V3 nodes.

ComfyUI imports this package, then calls ``comfy_entrypoint``. Importing registers the
``models/dreampose`` and ``models/densepose`` folders and nothing else: no downloads, no checks for
weights. Outside ComfyUI (pytest collects the repository root as a package) importing does nothing.
"""
import importlib.util

# web/docs/<NodeId>.md: the frontend's node help pages, fetched from /extensions/<this folder's name>/docs/.
# WEB_DIRECTORY (not [tool.comfy] web, which ComfyUI serves under the pyproject name "dreampose") is
# registered under the folder name that the frontend derives from python_module.
WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes.folders import register_model_folders

    register_model_folders()  # before the first /object_info, so the loader lists models/dreampose
    from .nodes.densepose import register_densepose_folder

    register_densepose_folder()  # models/densepose (+ comfyui_controlnet_aux's downloaded exports)


async def comfy_entrypoint():
    """The extension ComfyUI asks for: it lists our nodes (V3 API; no NODE_CLASS_MAPPINGS)."""
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES

    class DreamPoseExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return DreamPoseExtension()
