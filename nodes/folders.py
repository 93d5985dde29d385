"""Model folders: registering ``models/dreampose`` and turning combo entries back into paths.

Combo entries are names relative to one of ComfyUI's search folders, so a workflow saved on one
machine loads on another. Folder-shaped models (a diffusers SD folder, a transformers CLIP folder)
are listed as the folder, never as the files inside it, so each model appears once.
"""
from __future__ import annotations

import os
import re

import folder_paths
from comfy_api.latest import io

from ..dreampose.errors import DreamPoseError
from ..dreampose.files.weights import is_ours, read_metadata

DREAMPOSE = "dreampose"
SUBJECTS = "dreampose_subjects"     # folder type of subject finetunes: <each dreampose folder>/subjects
SUBJECTS_DIR = "subjects"
SUBJECT_EXTENSIONS = {".safetensors"}
NONE_SUBJECT = "none"
NONE_WEIGHTS = "none (fresh from base)"
NONE_BASE = "none"
VAE_FROM_WEIGHTS = "from weights or base"
DREAMPOSE_TAG = " [dreampose]"   # marks a models/dreampose file in the VAE list (cf. ComfyUI's "name [output]")

# The authors' companion files load together with unet_epoch_N.pth; alone they are not a model.
_COMPANION = re.compile(r"^(adapter|vae)_\d+\.(pth|pt|bin|safetensors)$", re.IGNORECASE)
_AUTHORS_UNET = re.compile(r"^unet_epoch_\d+\.", re.IGNORECASE)


def extend_folder(name: str, paths: list[str], extensions) -> None:
    """Add ``paths`` (those not listed yet, in order) and ``extensions`` to ComfyUI's ``name`` folder type.

    ``extra_model_paths.yaml`` is applied before packs load and may already have created the entry
    (with an empty extension set, which lists every file): it is extended, never replaced, so the
    user's folders keep working and come first.
    """
    extensions = set(extensions)
    entry = folder_paths.folder_names_and_paths.get(name)
    if entry is None:
        folder_paths.folder_names_and_paths[name] = (list(dict.fromkeys(paths)), extensions)
        return
    current, known = entry
    current.extend(p for p in dict.fromkeys(paths) if p not in current)
    if not isinstance(known, set) or not extensions <= known:
        folder_paths.folder_names_and_paths[name] = (current, set(known) | extensions)


def register_model_folders() -> None:
    """``models/dreampose`` for weights, and its ``subjects`` sub-folder for saved finetunes."""
    extend_folder(DREAMPOSE, [os.path.join(folder_paths.models_dir, DREAMPOSE)], folder_paths.supported_pt_extensions)
    register_subject_folder()


def register_subject_folder() -> None:
    """``dreampose_subjects``: the ``subjects`` sub-folder of every ``dreampose`` folder, in the same order
    (so an ``extra_model_paths.yaml`` dreampose entry brings its subjects along), after any folder the
    yaml names for ``dreampose_subjects`` itself. Finetunes are saved into the first of them."""
    extend_folder(SUBJECTS, [os.path.join(p, SUBJECTS_DIR) for p in folder_paths.folder_names_and_paths[DREAMPOSE][0]],
                  SUBJECT_EXTENSIONS)


def _files(folder: str) -> list[str]:
    try:
        return folder_paths.get_filename_list(folder)
    except KeyError:  # a host without this folder type
        return []


def _search_paths(folder: str) -> list[str]:
    try:
        return folder_paths.get_folder_paths(folder)
    except KeyError:
        return []


def _model_dirs(folder: str, is_model_dir) -> list[str]:
    """Sub-folders of ``folder``'s search paths that ``is_model_dir`` accepts (not descended into)."""
    found = set()
    for root in _search_paths(folder):
        if not os.path.isdir(root):
            continue
        for here, subdirs, _ in os.walk(root, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            if here != root and is_model_dir(here):
                found.add(os.path.relpath(here, root).replace(os.sep, "/"))
                subdirs[:] = []
    return sorted(found)


def _is_diffusers_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json")) or \
        os.path.isfile(os.path.join(path, "unet", "config.json"))


def _is_config_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _inside(name: str, dirs: list[str]) -> bool:
    return any(name.replace(os.sep, "/").startswith(d + "/") for d in dirs)


def _is_subject(name: str) -> bool:
    """A file under models/dreampose/subjects: a finetune applied on top of a model, not a model."""
    return name.replace(os.sep, "/").startswith(SUBJECTS_DIR + "/")


def dreampose_weight_options() -> list[str]:
    names = [n for n in _files(DREAMPOSE) if not _COMPANION.match(os.path.basename(n)) and not _is_subject(n)]
    return names + [NONE_WEIGHTS]


def subject_options() -> list[str]:
    return [NONE_SUBJECT] + _files(SUBJECTS)


def base_model_options() -> list[str]:
    return [NONE_BASE] + _files("checkpoints") + _model_dirs("diffusers", _is_diffusers_dir)


def clip_vision_options() -> list[str]:
    dirs = _model_dirs("clip_vision", _is_config_dir)
    files = [n for n in _files("clip_vision") if not _inside(n, dirs)]
    return sorted(files + dirs)


def vae_options() -> list[str]:
    ours = [n + DREAMPOSE_TAG for n in _files(DREAMPOSE) if "vae" in os.path.basename(n).lower()
            and not _AUTHORS_UNET.match(os.path.basename(n)) and not _is_subject(n)]
    return [VAE_FROM_WEIGHTS] + _files("vae") + ours


def _find_dir(folder: str, name: str, is_model_dir) -> str | None:
    for root in _search_paths(folder):
        root = os.path.abspath(root)
        path = os.path.normpath(os.path.join(root, name))
        if os.path.commonpath([root, path]) == root and path != root and os.path.isdir(path) and is_model_dir(path):
            return path
    return None


def _not_found(what: str, name: str, folder: str) -> DreamPoseError:
    where = ", ".join(_search_paths(folder)) or f"models/{folder}"
    return DreamPoseError(f"{what} {name!r} not found in {where}; refresh the node list (R) or put it there")


def frame_folder_inputs(files: str, items: str) -> list:
    """The inputs every frame-folder loader starts with, in this order: ``folder``, ``start``, ``count``.
    ``files`` names what the folder holds, ``items`` what one of them is called (frames, pictures)."""
    return [
        io.String.Input("folder", default="", tooltip=f"Folder of {files}: an absolute path, or relative to "
                                                      "ComfyUI's input folder."),
        io.Int.Input("start", default=0, min=0, max=1_000_000,
                     tooltip=f"Skip this many {items} from the start of the sequence."),
        io.Int.Input("count", default=0, min=0, max=1_000_000,
                     tooltip=f"Load at most this many {items}; 0 loads all the rest."),
    ]


def check_frame_folder(folder: str | None, list_files) -> bool | str:
    """Queue-time check of a typed frame folder (``list_files`` raises on a wrong one); a linked
    folder (``None``) is checked when the node runs."""
    if folder is None:
        return True
    try:
        list_files(resolve_folder(folder))
    except DreamPoseError as exc:
        return str(exc)
    return True


def frame_folder_fingerprint(folder, list_files, *settings) -> tuple:
    """What a frame-folder loader's output depends on: its settings and each file's mtime, so adding,
    removing or rewriting a frame reloads."""
    try:
        files = list_files(resolve_folder(folder))
        return (folder, *settings, tuple((f, os.path.getmtime(f)) for f in files))
    except (DreamPoseError, OSError, TypeError):
        return (folder, *settings)


def resolve_dreampose_weights(name: str) -> str | None:
    if name == NONE_WEIGHTS:
        return None
    path = folder_paths.get_full_path(DREAMPOSE, name)
    if path is None:
        raise _not_found("DreamPose weights", name, DREAMPOSE)
    return path


def resolve_base_model(name: str) -> str | None:
    if name == NONE_BASE:
        return None
    path = folder_paths.get_full_path("checkpoints", name) or _find_dir("diffusers", name, _is_diffusers_dir)
    if path is None:
        raise _not_found("Stable Diffusion 1.x model", name, "checkpoints")
    return path


def resolve_clip_vision(name: str) -> str:
    path = _find_dir("clip_vision", name, _is_config_dir) or folder_paths.get_full_path("clip_vision", name)
    if path is None:
        raise _not_found("CLIP vision model", name, "clip_vision")
    return path


def resolve_vae(name: str) -> str | None:
    if name == VAE_FROM_WEIGHTS:
        return None
    if name.endswith(DREAMPOSE_TAG):
        stripped = name[:-len(DREAMPOSE_TAG)]
        path = folder_paths.get_full_path(DREAMPOSE, stripped)
        folder = DREAMPOSE
    else:
        stripped, folder = name, "vae"
        path = folder_paths.get_full_path("vae", name)
    if path is None:
        raise _not_found("VAE", stripped, folder)
    return path


def resolve_subject(name: str) -> str | None:
    if name == NONE_SUBJECT:
        return None
    path = folder_paths.get_full_path(SUBJECTS, name)
    if path is None:
        raise _not_found("Subject finetune", name, SUBJECTS)
    return path


def export_path(folder: str, name: str, what: str) -> str:
    """Where an export named ``name`` goes in core's ``folder`` (``loras``, ``vae``): its first path.
    A file of that name that is not one of our exports is never replaced: the user did not ask for it."""
    dirs = _search_paths(folder)
    if not dirs:
        raise DreamPoseError(f"ComfyUI has no models/{folder} folder registered")
    path = os.path.join(dirs[0], name)
    if os.path.exists(path):
        try:
            meta = read_metadata(path)
        except DreamPoseError:
            meta = {}
        if not (is_ours(meta) and meta.get("kind") == what):
            raise DreamPoseError(f"models/{folder}/{name} exists and was not written by DreamPose: give the finetune "
                                 "another name, or move that file away")
    os.makedirs(dirs[0], exist_ok=True)
    return path


def subject_dirs() -> list[str]:
    """Where saved finetunes are looked for; the first is where new ones are written."""
    return _search_paths(SUBJECTS)


def resolve_folder(path: str) -> str:
    """A user-typed folder: quotes and ``~`` handled, relative paths taken from ComfyUI's input folder."""
    path = os.path.expanduser(path.strip().strip('"').strip("'"))
    if not path:
        raise DreamPoseError("no folder given: type the folder of frame_N_densepose.npy files (absolute, or "
                             "relative to ComfyUI's input folder)")
    if not os.path.isabs(path):
        path = os.path.join(folder_paths.get_input_directory(), path)
    return os.path.normpath(path)
