"""Weight and pose files are data: a file whose unpickling would run code is refused, and the code never runs.

Each malicious file carries a payload that creates a marker directory when unpickled. A control
test unpickles the payload object in memory to prove it is live and checks that every file carries
it; every loader must then refuse such a file with a DreamPoseError and leave the marker absent.
"""
from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from dreampose.pipeline import poses
from dreampose.files.weights import peek_keys, read_state_dict
from dreampose.errors import DreamPoseError
from dreampose.loaders.components import (load_authors_adapter, load_authors_unet, load_base_unet, load_clip_vision,
                                          load_vae)
from dreampose.loaders.load import convert_authors_checkpoint, load_dreampose


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: stands in for any code an attacker would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write_malicious(path: str, marker: str, writer: str) -> str:
    state = {"conv_in.weight": torch.zeros(2, 2), "vae2clip.weight": torch.zeros(2, 2), "x": Payload(marker)}
    if writer == "zip":
        torch.save(state, path)
    elif writer == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle renamed .pth
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=2)
    return path


WRITERS = ["zip", "legacy", "plain_pickle"]


@pytest.fixture()
def marker(tmp_path) -> str:
    path = str(tmp_path / "PAYLOAD_RAN")
    yield path
    assert not os.path.exists(path), "the malicious payload ran"


def test_control_the_payload_is_live_and_in_every_file(tmp_path):
    """The payload really runs code when unpickled (shown in memory, never through a loader), and
    every malicious file carries it."""
    marker = str(tmp_path / "control_marker")
    pickle.loads(pickle.dumps(Payload(marker)))  # our own object, unpickled on purpose
    assert os.path.isdir(marker)
    for writer in WRITERS:
        path = write_malicious(str(tmp_path / f"evil_{writer}.pth"), str(tmp_path / "never"), writer)
        with open(path, "rb") as f:
            assert b"mkdir" in f.read(), writer


@pytest.mark.parametrize("writer", WRITERS)
def test_read_state_dict_and_peek_refuse_code(tmp_path, marker, writer):
    path = write_malicious(str(tmp_path / "evil.pth"), marker, writer)
    with pytest.raises(DreamPoseError, match="refused to load.*could run code"):
        read_state_dict(path)
    if writer == "zip":  # the only kind that can be peeked at lazily
        with pytest.raises(DreamPoseError, match="refused to load"):
            peek_keys(path)
    else:
        assert peek_keys(path) is None


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("loader, name", [
    (load_authors_unet, "unet_epoch_1.pth"), (load_authors_adapter, "adapter_1.pth"), (load_vae, "vae_1.pth"),
    (load_base_unet, "sd15.ckpt"), (load_clip_vision, "pytorch_model.bin"),
])
def test_every_loader_refuses_code(tmp_path, marker, writer, loader, name):
    path = write_malicious(str(tmp_path / name), marker, writer)
    with pytest.raises(DreamPoseError, match="refused"):
        loader(path)


@pytest.mark.parametrize("writer", WRITERS)
def test_load_dreampose_and_convert_refuse_malicious_authors_files(tmp_path, marker, writer, authors_release,
                                                                   tiny_clip_folder, tiny_unet_config):
    folder = tmp_path / "release"
    folder.mkdir()
    unet = write_malicious(str(folder / "unet_epoch_1.pth"), marker, writer)
    shutil.copy(authors_release.adapter_path, folder / "adapter_1.pth")
    with pytest.raises(DreamPoseError, match="refused"):
        load_dreampose(dreampose=unet, vae=authors_release.vae_path, clip=tiny_clip_folder,
                       unet_config=tiny_unet_config)
    with pytest.raises(DreamPoseError, match="refused"):
        convert_authors_checkpoint(unet, str(tmp_path / "out.safetensors"), unet_config=tiny_unet_config)
    evil_vae = write_malicious(str(tmp_path / "vae_2.pth"), marker, writer)
    with pytest.raises(DreamPoseError, match="refused"):
        load_dreampose(dreampose=authors_release.unet_path, vae=evil_vae, clip=tiny_clip_folder,
                       unet_config=tiny_unet_config)
    assert not (tmp_path / "out.safetensors").exists()


def test_pose_npy_with_a_pickled_object_is_refused(tmp_path, marker):
    path = str(tmp_path / "frame_0_densepose.npy")
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(DreamPoseError, match="not a plain numeric"):
        poses.load_uv_file(path)
    with pytest.raises(DreamPoseError, match="not a plain numeric"):
        poses.load_uv_folder(str(tmp_path))
