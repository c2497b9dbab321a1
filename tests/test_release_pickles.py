"""Full training checkpoints as the SERE, iBOT and DINO releases write them (weights next to an
argparse Namespace and numpy scalars) load with `weights_only` and an allowlist of exactly those
types; any other object still needs `trust_pickle`."""

from __future__ import annotations

import argparse
import zipfile

import numpy as np
import pytest
import torch

import sere
from sere.io.pretrained import UntrustedPickle, load_pretrained_weights
from sere.models.backbone import ViTBackbone


def release_checkpoint(path, cfg, extra=None) -> dict:
    """A DINO-style full checkpoint: `module.backbone.*` student and teacher, the run's
    arguments with numpy values in them, a numpy epoch."""
    torch.manual_seed(3)
    vit = ViTBackbone(cfg.model, img_size=16, drop_path=0.0).vit.state_dict()
    network = {f"module.backbone.{k}": v for k, v in vit.items()}
    args = argparse.Namespace(lr=np.float64(5e-4), momentum_teacher=np.float32(0.996),
                              batch_size_per_gpu=np.int64(64), use_fp16=np.bool_(True),
                              arch="vit_small")
    torch.save({"student": network, "teacher": network, "args": args, "epoch": np.int64(100),
                **(extra or {})}, path)
    return vit


def as_numpy1_file(path, out):
    """The same file as numpy 1 writes it: its scalars under `numpy.core.multiarray`."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)


@pytest.mark.parametrize("numpy1", [False, True])
def test_release_checkpoint_loads_without_trusting_pickle(tiny, tmp_path, numpy1):
    cfg = tiny()
    path = tmp_path / "checkpoint.pth"
    vit = release_checkpoint(path, cfg)
    if numpy1:
        as_numpy1_file(path, tmp_path / "numpy1.pth")
        path = tmp_path / "numpy1.pth"
        assert "numpy.core.multiarray.scalar" in \
            torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    network = sere.SERENetwork(cfg, is_student=True)
    report = load_pretrained_weights(path, network.backbone)
    assert report.entry == "teacher" and report.backbone_complete
    assert torch.equal(network.backbone.vit.blocks[1].attn.qkv.weight,
                       vit["blocks.1.attn.qkv.weight"])


@pytest.mark.parametrize("other,name", [
    (np.zeros(3), "numpy"),  # an array is not on the list, only scalars are
    (np.array(object(), dtype=object)[()], "object"),  # a plain Python object
])
def test_any_other_object_still_needs_trust(tiny, tmp_path, other, name):
    cfg = tiny()
    path = tmp_path / "checkpoint.pth"
    release_checkpoint(path, cfg, extra={"other": other})
    network = sere.SERENetwork(cfg, is_student=True)
    with pytest.raises(UntrustedPickle, match=f"{name}.*trust_pickle"):
        load_pretrained_weights(path, network.backbone)
    report = load_pretrained_weights(path, network.backbone, trust_pickle=True)
    assert report.backbone_complete
