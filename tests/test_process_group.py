"""`sere pretrain` under torchrun leaves its process group before it returns: left to the
interpreter's exit, gloo's threads sometimes abort a rank ("terminate called without an active
exception"), which failed the 2-process DDP test once in CI under load."""

from __future__ import annotations

import socket

import torch.distributed as dist

from sere.cli import main

from conftest import TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pretrain_leaves_the_process_group_it_joined(tmp_path, monkeypatch):
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    try:
        code = main(["pretrain", *TINY, "train.max_steps=2", "train.save_every=100",
                     f"train.output_dir={tmp_path / 'run'}"])
        assert code == 0
        assert (tmp_path / "run" / "last.pt").is_file()  # it ran, inside a process group
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():  # leave nothing behind for the other tests
            dist.destroy_process_group()
