"""Runs end cleanly and never destroy work: an error inside a DataLoader worker ends `sere pretrain`
with one line and exit code 2 (no hang), init.from reads a pickled checkpoint only when trusted,
and a fresh run refuses a folder that holds another run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sere
from sere.cli import main
from sere.data.loader import worker_error_message
from sere.errors import SereError
from sere.train.loop import Pretrainer

from conftest import TINY, tiny_on

SOURCES = str(Path(sere.__file__).resolve().parents[1])


def _good(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(path)


def _pretrain_with_workers(tmp_path: Path, folder: Path, *overrides: str):
    """`sere pretrain` in a subprocess with two DataLoader workers; a hang fails the test."""
    cmd = [sys.executable, "-m", "sere.cli", "pretrain", *tiny_on("folder"),
           "data.num_workers=2", f"data.path={folder}", "optim.batch_size=4",
           "eval.knn_every=null", f"train.output_dir={tmp_path / 'run'}", *overrides]
    env = {**os.environ, "PYTHONPATH": SOURCES, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_strict_error_in_a_worker_ends_the_run_with_one_line(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        _good(folder / f"good{i:02d}.png", i)
    (folder / "broken.jpg").write_bytes(b"not an image")
    done = _pretrain_with_workers(tmp_path, folder, "data.strict=true")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = _error_lines(done.stderr)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: unreadable image {folder / 'broken.jpg'}: ")
    assert lines[0].endswith("(data.strict=true); remove or fix it, or set data.strict=false "
                             "to skip such files")


def test_an_all_broken_folder_ends_the_run_and_counts_the_files_it_read(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"bad{i}.jpg").write_bytes(b"not an image")
    done = _pretrain_with_workers(tmp_path, folder)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = _error_lines(done.stderr)
    assert len(lines) == 1
    assert lines[0].startswith("error: all 4 images could not be decoded (last: ")
    assert "mostly bad" in lines[0] and "50 " not in lines[0].replace(str(tmp_path), "")


@pytest.mark.parametrize("bad, good, expected", [(4, 0, "all 4 images"),
                                                  (52, 2, "50 images in a row")])
def test_mostly_bad_message_counts_the_files_it_tried(tiny, tmp_path, bad, good, expected):
    """In the library, without workers: a sample gives up after trying each file at most once,
    and at most 50 of them, and says how many it tried."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(bad):
        (folder / f"a_bad{i:02d}.jpg").write_bytes(b"not an image")
    for i in range(good):
        _good(folder / f"b_good{i}.png", i)
    cfg = tiny("data.dataset=folder", f"data.path={folder}", "optim.batch_size=2")
    dataset = Pretrainer(cfg).dataset
    with pytest.raises(SereError, match=f"^{expected} could not be decoded .*mostly bad"):
        dataset[(0, 0)]  # files are read in name order from position 0: the broken ones first


def test_a_small_mostly_bad_folder_stops_the_run_too(tiny, tmp_path):
    """Under 64 files the run judges after one pass over the folder (it never read 64 before)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        if i % 5 == 0:
            _good(folder / f"{i:02d}.png", i)
        else:
            (folder / f"{i:02d}.jpg").write_bytes(b"not an image")
    cfg = tiny("data.dataset=folder", f"data.path={folder}", "optim.batch_size=2",
               "train.max_steps=4")  # fewer than 64 reads: the old rule never judged
    with pytest.raises(SereError, match=r"of the first \d+ image files could not be decoded .*"
                                        r"mostly bad"):
        Pretrainer(cfg).run()


def test_worker_error_message_unwraps_only_the_dataloader_report():
    wrapped = ("Caught SereError in DataLoader worker process 0.\nOriginal Traceback (most "
               "recent call last):\n  File \"x.py\", line 1, in f\n    raise SereError(m)\n"
               "sere.errors.SereError: the folder is bad; fix it\n")
    assert worker_error_message(wrapped) == "the folder is bad; fix it"
    assert worker_error_message("the folder is bad; fix it") == "the folder is bad; fix it"


class Opaque:
    """Stands for the Python objects (argparse namespaces, numpy scalars...) that training
    checkpoints carry besides tensors."""

    def __init__(self):
        self.value = 3


def test_init_from_a_pickled_checkpoint_needs_init_trust_pickle(tiny, tmp_path, capsys):
    source = Pretrainer(tiny("train.output_dir=" + str(tmp_path / "source")))
    pickled = tmp_path / "full_checkpoint.pth"
    torch.save({"teacher": source.teacher.state_dict(), "args": Opaque()}, pickled)
    code = main(["pretrain", *TINY, f"train.output_dir={tmp_path / 'refused'}",
                 f"init.from={pickled}", "train.max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"error: {pickled} holds ") and "Opaque besides tensors" in err
    assert err.endswith("if you trust its source, pass init.trust_pickle=true")
    assert "--trust-pickle" not in err and "\n" not in err

    cfg = tiny(f"init.from={pickled}", "init.trust_pickle=true", "train.output_dir="
               + str(tmp_path / "trusted"))
    trusted = Pretrainer(cfg)
    for name, value in source.teacher.backbone.state_dict().items():
        assert torch.equal(trusted.student.backbone.state_dict()[name], value), name


def test_library_and_import_check_still_name_trust_pickle(tmp_path):
    from sere.io.pretrained import read_weights

    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Opaque()}, pickled)
    with pytest.raises(SereError, match=r"pass trust_pickle=True \(--trust-pickle\)$"):
        read_weights(pickled)


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", *TINY, f"train.output_dir={run}", "train.max_steps=4"]
    assert main(args) == 0
    before = {name: (run / name).read_bytes() for name in ("last.pt", "metrics.jsonl",
                                                            "config.yaml")}
    assert len(before["metrics.jsonl"].splitlines()) == 4
    capsys.readouterr()
    assert main([*args[:-1], "train.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {run} already holds a run (last.pt); continue it with --resume auto, "
                   "or start over in another folder (train.output_dir=...) or after deleting "
                   "this one")
    assert {name: (run / name).read_bytes() for name in before} == before
    # --resume auto still continues it.
    assert main([*args[:-1], "train.max_steps=6", "--resume", "auto"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6


def test_resuming_an_older_checkpoint_is_refused_and_branching_works(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", *TINY, f"train.output_dir={run}", "train.max_steps=4"]
    assert main([*args[:-1], "train.max_steps=2"]) == 0
    older = tmp_path / "kept" / "at-2.pt"  # a copy of last.pt at step 2, kept aside
    older.parent.mkdir()
    shutil.copy(run / "last.pt", older)
    assert main([*args, "--resume", "auto"]) == 0  # last.pt now at step 4
    before = {name: (run / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert main([*args, "--resume", str(older)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {older} is at step 2 but {run} already holds step 4 "
                          "(last.pt); resuming it there would roll the run back"), err
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing rolled back
    # The advice: copy the checkpoint into a new folder and resume there.
    branch = Path(re.search(r"mkdir (\S+) &&", err).group(1))
    assert branch == tmp_path / "run-from-2"
    branch.mkdir()
    shutil.copy(older, branch)
    assert main([*args[:-2], f"train.output_dir={branch}", "train.max_steps=3", "--resume",
                 str(branch / older.name)]) == 0
    assert json.loads((branch / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_fresh_run_refuses_metrics_without_a_checkpoint_but_not_an_empty_log(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")  # what a run that failed before its first step leaves
    (run / "config.yaml").write_text("{}\n")
    Pretrainer(tiny())
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    with pytest.raises(SereError, match="metrics.jsonl of an earlier run .*another folder"):
        Pretrainer(tiny())
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'


def _labelled_folder_with_a_broken_image(root: Path) -> Path:
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(5):
            _good(root / name / f"{i}.png", 10 * c + i)
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    return root / "dog" / "broken.png"


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_names_an_unreadable_image_in_one_line_with_workers(tiny, tmp_path, workers):
    from sere.io.checkpoint import save_checkpoint
    from sere.io.weights import random_backbone
    cfg = tiny()
    checkpoint = tmp_path / "random.pt"
    save_checkpoint(checkpoint, {"config": cfg.to_dict(), "step": 0, "teacher": {
        f"backbone.{k}": v for k, v in random_backbone(cfg, 0).state_dict().items()}})
    broken = _labelled_folder_with_a_broken_image(tmp_path / "images")
    cmd = [sys.executable, "-m", "sere.cli", "knn", "--checkpoint", str(checkpoint),
           "--train-dir", str(tmp_path / "images"), "--test-dir", str(tmp_path / "images"),
           "--workers", str(workers), "--no-random",
           "--no-cache"]
    env = {**os.environ, "PYTHONPATH": SOURCES, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = _error_lines(done.stderr)
    assert lines == [f"error: unreadable image {broken}: cannot identify image file "
                     f"'{broken}'; an evaluation reads every image of its folders: remove or "
                     "fix the file"]
