"""Sharded checkpoints (issue 25) in one process: `train.checkpoint=sharded` writes a
`checkpoint-<step>.dcp` folder with torch.distributed.checkpoint that resumes to the bit and
converts to the single file every other command reads, with the same tensors; a half-written
one is never read; a missing or truncated shard, another global batch and a folder given where
a file is read are one line each, exit 2, nothing overwritten. (Several processes, 2 -> 1 and
1 -> 2: tests/test_sharded.py, slow.)"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import sere
from sere.cli import main
from sere.errors import SereError
from sere.io.checkpoint import (furthest_step, load_checkpoint, load_run_state,
                                prune_checkpoints, save_checkpoint)
from sere.io.sharded import convert_sharded_checkpoint, load_sharded
from sere.io.sharded_files import RUN_STATE
from sere.io.weights import load_backbone
from sere.runtime.files import publish_folder, remove_leftover_temporaries, temporary_name
from sere.train.loop import Pretrainer
from sere.train.sharding import optimizer_state_by_name

from conftest import TINY
from test_elastic import _assert_identical as assert_identical

# one process of 8 images, 4 steps an epoch: a sharded checkpoint at steps 2 (mid-epoch) and 4;
# the head's last layer is frozen in the first epoch, so it has no AdamW state in either; drop
# path draws from torch's generator, which a resumed run must continue as it was
SHARDED = [*TINY, "train.checkpoint=sharded", "train.max_steps=4", "model.drop_path=0.1"]
STEP_2, STEP_4 = "checkpoint-00000002.dcp", "checkpoint-00000004.dcp"


def _config(folder: Path, *settings: str) -> sere.Config:
    return sere.load_config([], [*SHARDED, f"train.output_dir={folder}", *settings])


def _live_state(run: Pretrainer) -> dict:
    """What a run holds now, as a single-file checkpoint would (optimiser keyed by name)."""
    optimizer = optimizer_state_by_name(run.student, run.optimizer)
    for group in optimizer["param_groups"]:  # a list once loaded by name
        group["betas"] = tuple(group["betas"])
    return {"student": dict(run.student.state_dict()), "teacher": dict(run.teacher.state_dict()),
            "loss": dict(run.loss_fn.state_dict()), "optimizer": optimizer,
            "rng": torch.get_rng_state()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict]:
    """A 4-step run with sharded checkpoints, and its state at the end."""
    folder = tmp_path_factory.mktemp("sharded") / "run"
    run = Pretrainer(_config(folder))
    run.run()
    return folder, _live_state(run)


def _copy(straight, folder: Path, name: str = STEP_2) -> Path:
    """`folder` holding a copy of the checkpoint `name` of the straight run."""
    folder.mkdir()
    shutil.copytree(straight[0] / name, folder / name)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_sharded_checkpoint_resumes_to_the_bit_and_converts_to_the_same_tensors(
        straight, tmp_path):
    folder, end = straight
    assert sorted(p.name for p in (folder / STEP_4).iterdir()) == [".metadata", "__0_0.distcp",
                                                                   RUN_STATE]
    again = _copy(straight, tmp_path / "again")
    resumed = Pretrainer(_config(again), resume="auto")
    assert resumed.step == 2
    resumed.run()
    state = _live_state(resumed)
    assert_identical(state, end)
    assert "head.last_layer.weight" not in state["optimizer"]["state"]  # never stepped
    converted = convert_sharded_checkpoint(folder / STEP_4, tmp_path / "last.pt")
    assert converted.step == 4 and converted.world_size == 1
    single = load_checkpoint(tmp_path / "last.pt")  # the loader of every other command
    for part in ("student", "teacher", "loss"):
        assert_identical(dict(single[part]), end[part], part)
    assert_identical(single["rng"][0]["torch"], end["rng"])
    assert_identical(single["optimizer"]["state"], end["optimizer"]["state"])
    assert single["step"] == 4
    assert_identical(single["rng"], load_run_state(folder / STEP_4)["rng"])
    backbone = load_backbone(tmp_path / "last.pt").backbone.state_dict()
    for name, value in backbone.items():
        assert torch.equal(value, end["teacher"][f"backbone.{name}"]), name


def test_the_converted_file_resumes(straight, tmp_path):
    """A converted checkpoint continues as the sharded one does (here: to the bit)."""
    folder = _copy(straight, tmp_path / "run")
    convert_sharded_checkpoint(folder / STEP_2, tmp_path / "step2.pt")
    shutil.rmtree(folder / STEP_2)
    shutil.move(tmp_path / "step2.pt", folder / "last.pt")
    resumed = Pretrainer(_config(folder, "train.checkpoint=file"), resume="auto")
    assert resumed.step == 2
    resumed.run()
    assert_identical(_live_state(resumed), straight[1])


def test_a_half_written_sharded_checkpoint_is_never_read_and_is_removed(straight, tmp_path,
                                                                        caplog):
    caplog.set_level(logging.INFO, logger="sere")
    folder = _copy(straight, tmp_path / "run")
    half = folder / f".{STEP_4}.tmp-99999"  # what a run killed while writing step 4 leaves
    shutil.copytree(straight[0] / STEP_4, half)
    (half / ".metadata").unlink()
    resumed = Pretrainer(_config(folder), resume="auto")
    assert resumed.step == 2 and not half.exists()
    assert "left by a write that was killed half-way" in caplog.text


def _run_line(capsys, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_missing_shard_is_one_line_and_changes_nothing(straight, tmp_path, capsys):
    folder = _copy(straight, tmp_path / "run")
    (folder / STEP_2 / "__0_0.distcp").unlink()
    before = _files(folder)
    code, err = _run_line(capsys, "pretrain", *SHARDED, f"train.output_dir={folder}",
                          "--resume", str(folder / STEP_2))
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"error: sharded checkpoint {folder / STEP_2} lacks the shard file "
                      "__0_0.distcp (one of 1 that its .metadata names); copy the whole folder "
                      "again, or use an earlier checkpoint")
    code, err = _run_line(capsys, "convert-checkpoint", str(folder / STEP_2), "--output",
                          str(folder / "last.pt"))
    assert code == 2 and len(err) == 1 and "lacks the shard file __0_0.distcp" in err[0]
    assert _files(folder) == before


def test_a_sharded_checkpoint_without_a_tensor_asked_for_is_one_line(straight):
    with pytest.raises(SereError, match=r"does not fit this configuration \(Missing key in "
                       r"checkpoint state_dict: student.absent.\); the loss weights"):
        load_sharded(straight[0] / STEP_4, {"student": {"absent": torch.zeros(2)}})


def test_a_truncated_shard_is_named(straight, tmp_path, capsys):
    folder = _copy(straight, tmp_path / "run")
    shard = folder / STEP_2 / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    code, err = _run_line(capsys, "convert-checkpoint", str(folder / STEP_2), "--output",
                          str(tmp_path / "out.pt"))
    assert code == 2 and len(err) == 1
    assert "shard file __0_0.distcp is truncated (1000 of" in err[0]
    assert not (tmp_path / "out.pt").exists()


def test_another_global_batch_from_a_sharded_checkpoint_is_one_line(straight, tmp_path, capsys):
    folder = _copy(straight, tmp_path / "run")
    state = load_checkpoint(folder / STEP_2 / RUN_STATE)
    state["world_size"], state["rng"] = 2, [state["rng"][0]] * 2  # as if 2 x 8 images a step
    save_checkpoint(folder / STEP_2 / RUN_STATE, state)
    before = _files(folder)
    code, err = _run_line(capsys, "pretrain", *SHARDED, f"train.output_dir={folder}",
                          "--resume", "auto")
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"error: {folder / STEP_2} was saved with a global batch of 16 images a "
                      "step (2 processes); this run's is 8 (1 x optim.batch_size=8), which "
                      "would change every schedule: resume with optim.batch_size=16 to keep it")
    assert _files(folder) == before


@pytest.mark.parametrize("command", [["export", "--output", "unused", "--checkpoint"],
                                     ["import-check", *TINY, "--config", "vit_small_ibot_sere",
                                      "--weights"]],
                         ids=["export", "init.from"])
def test_a_sharded_checkpoint_where_one_file_is_read_says_how_to_convert(straight, capsys,
                                                                         command):
    path = straight[0] / STEP_4
    code, err = _run_line(capsys, *command, str(path))
    assert code == 2 and err == [
        f"error: {path} is a sharded checkpoint (a folder of shards); make one file of it "
        f"first: sere convert-checkpoint {path} --output {path.parent}/checkpoint-00000004.pt"]


def test_convert_refuses_an_existing_output_and_what_is_not_sharded(straight, tmp_path, capsys):
    (tmp_path / "taken.pt").write_bytes(b"keep")
    code, err = _run_line(capsys, "convert-checkpoint", str(straight[0] / STEP_4), "--output",
                          str(tmp_path / "taken.pt"))
    assert code == 2 and err == [f"error: {tmp_path / 'taken.pt'} exists; choose another "
                                 "--output or delete it first"]
    assert (tmp_path / "taken.pt").read_bytes() == b"keep"
    code, err = _run_line(capsys, "convert-checkpoint", str(tmp_path), "--output",
                          str(tmp_path / "out.pt"))
    assert code == 2 and len(err) == 1 and "is not a sharded checkpoint" in err[0]


def test_resume_without_config_reads_the_sharded_checkpoints_settings(straight, tmp_path,
                                                                      capsys):
    """`sere pretrain --resume DIR` without --config takes the settings saved in `run.pt`."""
    from sere.cli import parse_args
    from sere.cli.pretrain import pretrain_config

    args = parse_args(["pretrain", "--resume", str(straight[0] / STEP_2),
                       "train.max_steps=3"])
    cfg = pretrain_config(args)
    assert cfg.model.embed_dim == 32 and cfg.train.checkpoint == "sharded"
    assert cfg.train.max_steps == 3


def test_publishing_a_folder_replaces_an_older_one_whole(tmp_path):
    final = tmp_path / STEP_2
    final.mkdir()
    (final / "old").write_text("old")
    temporary = temporary_name(final)
    temporary.mkdir()
    (temporary / "new").write_text("new")
    publish_folder(temporary, final)
    assert [p.name for p in tmp_path.iterdir()] == [STEP_2]
    assert [p.name for p in final.iterdir()] == ["new"]
    left = tmp_path / f".{STEP_4}.tmp-4242"  # a writer killed before its rename
    left.mkdir()
    (left / "__0_0.distcp").write_bytes(b"half")
    assert remove_leftover_temporaries(tmp_path) == [left]
    assert [p.name for p in tmp_path.iterdir()] == [STEP_2]


def test_old_sharded_checkpoints_are_pruned_as_files_are(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step:08d}.dcp").mkdir()
        (tmp_path / f"checkpoint-{step:08d}.dcp" / "__0_0.distcp").write_bytes(b"x")
    (tmp_path / "checkpoint-00000008.pt").write_bytes(b"x")
    prune_checkpoints(tmp_path, keep_last=2, keep_every=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-00000004.dcp", "checkpoint-00000006.dcp", "checkpoint-00000008.dcp",
        "checkpoint-00000008.pt"]
    assert furthest_step(tmp_path)[0] == 8
