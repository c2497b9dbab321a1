"""Many processes (issue 25): 2 DDP processes of 4 images train as one process of 8; a rank
killed with SIGKILL under `torchrun --max-restarts 1` is restarted with its group, the run
resumes from its last checkpoint and ends bitwise where an uninterrupted run ends; a
half-written checkpoint is never read; a checkpoint resumes on another number of processes only
with the same global batch, and otherwise stops with one line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import sere
from sere.cli import main
from sere.io.checkpoint import load_checkpoint, save_checkpoint
from sere.train.loop import Pretrainer

from conftest import TINY
from torchrun_worker import pretrain_lines

# One worker runs the whole module (`make test` runs `pytest -n auto --dist loadgroup`), so
# that its module fixture of torchrun launches runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("elastic")

WORKER = Path(__file__).parent / "torchrun_worker.py"
# 2 processes x 4 images: 4 steps an epoch, 8 in all, a checkpoint every 2 steps
TWO_BY_FOUR = [*TINY, "optim.batch_size=4"]
KILL_STEP = 5  # rank 1 dies after step 5: the run goes back to step 4's checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(output_dir: Path, *settings: str, kill_step: int | None = None,
             then: list[tuple[Path, list[str]]] = ()) -> subprocess.CompletedProcess:
    """`sere pretrain --resume auto` on 2 gloo processes under torchrun, one restart allowed;
    each `(folder, settings)` of `then` is a further run in the same processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SERE_TEST_KILL_STEP", None)
    if kill_step is not None:
        env["SERE_TEST_KILL_STEP"] = str(kill_step)
    runs = pretrain_lines((folder, [*run_settings, "--resume", "auto"])
                          for folder, run_settings in [(output_dir, settings), *then])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--max-restarts", "1", "--master-addr", "127.0.0.1", "--master-port",
           str(_free_port()), str(WORKER), *runs]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _metrics(folder: Path) -> list[dict]:
    """The records of `metrics.jsonl` without their timing."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    return [{k: v for k, v in r.items() if k != "images_per_second"} for r in records]


def _assert_identical(a, b, where: str = "checkpoint") -> None:
    """`a` and `b` (nested dicts, lists, tensors, arrays, numbers) are equal to the bit."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# 3 steps of 8 images a step, once in one process and once on 2 processes of 4
THREE_STEPS = [*TINY, "train.max_steps=3", "train.save_every=100"]


@dataclass(frozen=True)
class TwoProcessRuns:
    """What one torchrun launch left: an uninterrupted 2-process run of 8 steps (`straight`),
    one that continued a one-process run's step 4 (`continued`), and a 3-step 2-process run
    (`three`) with its one-process twin (`three_alone`, the run itself), with the launch's
    output."""

    straight: Path
    continued: Path
    three: Path
    three_alone: Pretrainer
    stdout: str


@pytest.fixture(scope="module")
def two_process(tmp_path_factory) -> TwoProcessRuns:
    """The one-process runs, then one launch that runs the 2 x 4 runs from scratch and
    continues the one-process 4-step run on 2 processes of 4."""
    root = tmp_path_factory.mktemp("elastic")
    Pretrainer(sere.load_config([], [*TINY, "optim.batch_size=8", "train.max_steps=4",
                                     f"train.output_dir={root / 'continued'}"])).run()
    alone = Pretrainer(sere.load_config([], [*THREE_STEPS, "optim.batch_size=8",
                                             f"train.output_dir={root / 'three_alone'}"]))
    alone.run()
    done = _torchrun(root / "straight", *TWO_BY_FOUR,
                     then=[(root / "continued", TWO_BY_FOUR),
                           (root / "three", [*THREE_STEPS, "optim.batch_size=4"])])
    assert done.returncode == 0, done.stderr[-3000:]
    return TwoProcessRuns(root / "straight", root / "continued", root / "three", alone,
                          done.stdout)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(two_process):
    """Same global batch (2 x 4 vs 1 x 8): same losses and weights, only rank 0 writes."""
    single, two = two_process.three_alone, two_process.three
    records = [[json.loads(line) for line in (d / "metrics.jsonl").open()]
               for d in (Path(single.cfg.train.output_dir), two)]
    assert [r["step"] for r in records[1]] == [1, 2, 3]  # one writer, not two
    for a, b in zip(*records):
        for key in ("loss", "loss_cls", "loss_patch", "loss_spatial", "loss_channel"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    teacher = load_checkpoint(two / "last.pt")["teacher"]
    for name, value in single.teacher.state_dict().items():
        torch.testing.assert_close(teacher[name], value, rtol=1e-3, atol=1e-5, msg=name)
    center = load_checkpoint(two / "last.pt")["loss"]["distillation.center"]
    torch.testing.assert_close(center, single.loss_fn.distillation.center, rtol=1e-4, atol=1e-6)
    assert len(list(Path(two).glob("checkpoint-*.pt"))) == 1


@pytest.fixture(scope="module")
def straight(two_process) -> Path:
    """The folder of an uninterrupted 2-process run of 8 steps."""
    return two_process.straight


@pytest.mark.slow
def test_a_rank_killed_mid_run_restarts_and_ends_bitwise_as_an_uninterrupted_run(
        straight, tmp_path):
    cut = tmp_path / "cut"
    done = _torchrun(cut, *TWO_BY_FOUR, kill_step=KILL_STEP)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exitcode: -9" in done.stderr  # rank 1 did die by SIGKILL, and torchrun saw it
    assert f"resuming from {cut / 'last.pt'} at step 4" in done.stdout
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(cut / "last.pt")
    assert a["step"] == b["step"] == 8 and b["world_size"] == 2
    for state in (a, b):  # the one setting that differs
        state["config"]["train"].pop("output_dir")
    # student, teacher and heads, centers, optimiser, every rank's RNG state, config, step
    _assert_identical(a, b)
    assert _metrics(straight) == _metrics(cut)
    assert [r["step"] for r in _metrics(cut)] == list(range(1, 9))  # step 5 logged once


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process_with_the_same_global_batch(
        straight, tmp_path):
    """Step 4 of the 2 x 4 run, continued by one process of 8: the same images each step, so
    the end matches the 2-process end to float rounding (as one process matches DDP)."""
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(straight / "checkpoint-00000004.pt", folder)
    one = Pretrainer(sere.load_config([], [*TINY, "optim.batch_size=8",
                                           f"train.output_dir={folder}"]), resume="auto")
    assert one.step == 4
    one.run()
    end = load_checkpoint(straight / "last.pt")
    for name, value in one.teacher.state_dict().items():
        torch.testing.assert_close(value, end["teacher"][name], rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(one.loss_fn.distillation.center,
                               end["loss"]["distillation.center"], rtol=1e-4, atol=1e-6)
    losses = [[r["loss"] for r in _metrics(d) if r["step"] > 4] for d in (straight, folder)]
    assert len(losses[1]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_processes_with_the_same_global_batch(
        two_process):
    """4 steps of one process of 8 images, continued by 2 processes of 4 under torchrun: the
    end matches the uninterrupted 2-process run to float rounding."""
    folder = two_process.continued
    assert "continuing on 2 processes a checkpoint of 1: the same global batch" in (
        two_process.stdout)
    a, b = load_checkpoint(two_process.straight / "last.pt"), load_checkpoint(folder / "last.pt")
    assert b["step"] == 8 and b["world_size"] == 2
    for name, value in a["teacher"].items():
        torch.testing.assert_close(b["teacher"][name], value, rtol=1e-3, atol=1e-5, msg=name)
    losses = [[r["loss"] for r in _metrics(d)] for d in (two_process.straight, folder)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_a_half_written_checkpoint_is_never_read_and_is_removed(tiny, tmp_path, caplog):
    """What a writer killed mid-write leaves (the temporary files of an atomic write, here of
    a later step) is skipped by `--resume auto` and deleted when the run starts."""
    caplog.set_level(logging.INFO, logger="sere")
    Pretrainer(tiny("train.max_steps=2")).run()
    run = tmp_path / "run"
    whole = (run / "last.pt").read_bytes()
    later = {".checkpoint-00000004.pt.tmp-99999": whole[: len(whole) // 2],
             ".last.pt.tmp-99999": whole[:100]}
    for name, data in later.items():
        (run / name).write_bytes(data)
    resumed = Pretrainer(tiny("train.max_steps=4"), resume="auto")
    assert resumed.step == 2
    assert not any((run / name).exists() for name in later)
    assert (run / "last.pt").read_bytes() == whole
    assert "left by a write that was killed half-way" in caplog.text


def _saved_by_two_processes(path: Path) -> None:
    """Make the checkpoint at `path` look saved by 2 processes (two RNG states)."""
    state = load_checkpoint(path)
    state["world_size"], state["rng"] = 2, [state["rng"][0], state["rng"][0]]
    save_checkpoint(path, state)


def test_another_global_batch_on_another_number_of_processes_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", *TINY, "train.max_steps=2", f"train.output_dir={run}"]
    assert main(args) == 0
    for path in run.glob("*.pt"):
        _saved_by_two_processes(path)  # 2 x 8 images a step; this run would make 1 x 8
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main([*args[:-2], "train.max_steps=4", f"train.output_dir={run}",
                 "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {run / 'last.pt'} was saved with a global batch of 16 images a "
                   "step (2 processes); this run's is 8 (1 x optim.batch_size=8), "
                   "which would change every schedule: resume with optim.batch_size=16 to "
                   "keep it")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_the_same_global_batch_on_another_number_of_processes_resumes(tiny, tmp_path):
    Pretrainer(tiny("train.max_steps=2")).run()
    _saved_by_two_processes(tmp_path / "run" / "last.pt")
    resumed = Pretrainer(tiny("train.max_steps=4", "optim.batch_size=16"), resume="auto")
    assert resumed.step == 2 and resumed.schedules.total_batch == 16
