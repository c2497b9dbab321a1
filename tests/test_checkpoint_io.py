"""Atomic, checksummed checkpoints; finding the newest valid one; pruning."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sere.errors import SereError
from sere.io.checkpoint import (
    latest_valid_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_checkpoints,
)

MARKER = b"SERE-CHECKPOINT-TEST-MARKER-" * 8  # ASCII bytes that show up verbatim in the file


def state(step: int) -> dict:
    return {
        "step": step,
        "student": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4) * step},
        "config": {"optim": {"lr": 0.001}},
        "marker": torch.frombuffer(bytearray(MARKER), dtype=torch.uint8).clone(),
        "names": ["a", "b"],
    }


def test_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, state(7))
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7
    assert torch.equal(loaded["student"]["w"], state(7)["student"]["w"])
    assert loaded["config"] == {"optim": {"lr": 0.001}} and loaded["names"] == ["a", "b"]
    save_checkpoint(path, state(8))  # overwrite in place
    assert load_checkpoint(path)["step"] == 8


def test_no_temporary_file_is_left_after_save(tmp_path):
    save_checkpoint(tmp_path / "c.pt", state(1))
    save_checkpoint(tmp_path / "c.pt", state(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(SereError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_file_is_refused(tmp_path, keep):
    path = tmp_path / "c.pt"
    save_checkpoint(path, state(3))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(SereError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "cannot be read" in message and "earlier" in message


def test_flipped_byte_in_the_payload_fails_the_checksum(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, state(3))
    data = bytearray(path.read_bytes())
    at = data.find(MARKER)
    assert at >= 0
    data[at + 5] ^= 0x01  # still ASCII: the file parses, only the content changed
    path.write_bytes(bytes(data))
    with pytest.raises(SereError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "corrupted" in str(err.value)


def test_flipped_byte_in_the_middle_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, state(3))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SereError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_other_files_are_not_checkpoints(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"step": 1}, plain)  # a torch file, but not a sere checkpoint
    with pytest.raises(SereError, match="not a sere training checkpoint"):
        load_checkpoint(plain)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(SereError, match="cannot be read"):
        load_checkpoint(text)


def test_latest_valid_skips_a_corrupted_newest(tmp_path, caplog):
    for step in (100, 200, 300):
        save_checkpoint(tmp_path / f"checkpoint-{step}.pt", state(step))
    newest = tmp_path / "checkpoint-300.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    path, loaded = latest_valid_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoint-200.pt" and loaded["step"] == 200
    assert "checkpoint-300.pt" in caplog.text  # the skip is reported (a logged warning)


def test_latest_valid_prefers_the_highest_step_including_last(tmp_path):
    save_checkpoint(tmp_path / "checkpoint-9.pt", state(9))
    save_checkpoint(tmp_path / "checkpoint-10.pt", state(10))  # numeric, not string, order
    assert latest_valid_checkpoint(tmp_path)[0].name == "checkpoint-10.pt"
    save_checkpoint(tmp_path / "last.pt", state(12))
    path, loaded = latest_valid_checkpoint(tmp_path)
    assert path.name == "last.pt" and loaded["step"] == 12
    (tmp_path / "last.pt").write_bytes(b"garbage")
    assert latest_valid_checkpoint(tmp_path)[1]["step"] == 10


def test_latest_valid_none_when_nothing_usable(tmp_path):
    assert latest_valid_checkpoint(tmp_path / "missing") is None
    assert latest_valid_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-5.pt").write_bytes(b"")
    assert latest_valid_checkpoint(tmp_path) is None


def test_prune_keeps_the_newest_k(tmp_path):
    for step in (5, 10, 40, 100, 1000):
        save_checkpoint(tmp_path / f"checkpoint-{step}.pt", state(step))
    save_checkpoint(tmp_path / "last.pt", state(1000))
    (tmp_path / "notes.txt").write_text("keep me")
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["checkpoint-100.pt",
                                                            "checkpoint-1000.pt"]
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "notes.txt").is_file()
    prune_checkpoints(tmp_path, keep_last=5)
    assert len(step_checkpoints(tmp_path)) == 2
    prune_checkpoints(tmp_path, keep_last=0)
    assert step_checkpoints(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.txt"]


def test_step_checkpoints_ignores_other_names(tmp_path):
    for name in ("checkpoint-3.pt", "checkpoint-abc.pt", "checkpoint-4.pt.tmp", "x-5.pt"):
        (tmp_path / name).write_bytes(b"")
    assert step_checkpoints(tmp_path) == [Path(tmp_path / "checkpoint-3.pt")]
