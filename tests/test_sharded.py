"""Sharded training (issue 25): `train.parallel=fsdp` shards student, teacher and heads with
FSDP2 per transformer block and trains like DDP: on 2 gloo processes, 3 steps give the same
losses and the same saved teacher to float rounding. Its single-file checkpoint
(`train.checkpoint=file`) resumes sharded to the bit, or unsharded; a DDP one resumes sharded.
Its sharded checkpoint (the default) holds the same tensors as the single file, resumes on 2
processes to the bit (after a SIGKILL under torchrun's restarts too), on one unsharded
process, and one process's resumes on 2. FSDP on one process, and the settings it does not
run with, stop with one line before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sere
from sere.cli import main
from sere.errors import SereError
from sere.io.checkpoint import load_checkpoint
from sere.io.sharded import convert_sharded_checkpoint
from sere.io.weights import load_backbone
from sere.train.loop import Pretrainer
from sere.train.optim import clip_per_parameter
from sere.train.sharding import (clip_sharded_per_parameter, keyed_by_name,
                                 load_optimizer_state_by_name, mixed_precision_policy,
                                 optimizer_state_by_name)

from conftest import TINY
from test_elastic import KILL_STEP, TWO_BY_FOUR as ELASTIC_SETTINGS
from test_elastic import WORKER, _assert_identical as assert_identical
from test_elastic import _torchrun as elastic_torchrun
from torchrun_worker import pretrain_lines

# One worker runs the whole module (`make test` runs `pytest -n auto --dist loadgroup`), so
# that its module fixture of torchrun launches runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("sharded")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fsdp_memory import Counts, checkpoint_bytes, count, per_gpu_bytes  # noqa: E402

# 2 processes x 4 images, 3 steps (a checkpoint at step 2 and at the end), at full learning
# rate from the first step, a clip that bites every step and an EMA that moves the teacher by
# a tenth of the way: every part of the step that sharding touches changes the numbers.
# Single-file checkpoints, which FSDP writes with `train.checkpoint=file`.
TWO_BY_FOUR = [*TINY, "optim.batch_size=4", "train.max_steps=3", "optim.warmup_epochs=0",
               "optim.lr=0.1", "optim.clip_grad=0.01", "optim.momentum_teacher=0.9",
               "train.checkpoint=file"]
# The same, sharded, with sharded checkpoints at steps 2 and 3.
SHARDED = [*TWO_BY_FOUR[:-1], "train.parallel=fsdp", "train.checkpoint=sharded"]
STEP_2, STEP_3 = "checkpoint-00000002.dcp", "checkpoint-00000003.dcp"
# Both runs compute the same sums in another order (an all-reduce of whole gradients against
# a reduce-scatter of shards; per-parameter norms from shard norms): fp32 rounding, ~1e-7
# relative per operation. Measured here: losses at most 1e-7 apart (relative), weights at most
# 1e-6 (absolute, where AdamW's first steps, about lr * sign(g), amplify the rounding of
# gradients near 0). The bounds are 100x and 10x that, and still far below what a missing
# gradient average or a wrong EMA would move: a step of lr ~ 3e-3.
LOSS_RTOL = 1e-5
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*runs: tuple[Path, list[str]]) -> subprocess.CompletedProcess:
    """`sere pretrain SETTINGS train.output_dir=FOLDER` for each `(FOLDER, SETTINGS)` of `runs`,
    one after the other in the same 2 gloo processes under torchrun (tests/torchrun_worker.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SERE_TEST_KILL_STEP", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(WORKER),
           *pretrain_lines(runs)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _losses(folder: Path) -> list[dict[str, float]]:
    """Each logged step's loss terms."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    return [{k: v for k, v in r.items() if k.startswith("loss")} for r in records if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path | str]:
    """The folders of one torchrun launch: the same 3-step run on 2 processes with `ddp`, with
    `fsdp`, and with `fsdp` and sharded checkpoints (`dcp`); the elastic test's uninterrupted
    8-step run, sharded (`straight`); and a one-process run's sharded step-2 checkpoint
    continued by 2 FSDP processes (`two`). Also `stdout`: the launch's output."""
    root = tmp_path_factory.mktemp("sharded")
    folders = {name: root / name for name in ("ddp", "fsdp", "dcp", "straight", "two")}
    Pretrainer(sere.load_config([], [*TWO_BY_FOUR, "optim.batch_size=8", "train.max_steps=2",
                                     "train.checkpoint=sharded",
                                     f"train.output_dir={folders['two']}"])).run()
    done = _torchrun((folders["ddp"], [*TWO_BY_FOUR, "train.parallel=ddp"]),
                     (folders["fsdp"], [*TWO_BY_FOUR, "train.parallel=fsdp"]),
                     (folders["dcp"], SHARDED),
                     (folders["straight"], [*ELASTIC_SETTINGS, "train.parallel=fsdp"]),
                     (folders["two"], [*SHARDED, "--resume", "auto"]))
    assert done.returncode == 0, done.stderr[-3000:]
    return {**folders, "stdout": done.stdout}


def _holding(source: Path, folder: Path) -> Path:
    """`folder`, new, holding a copy of the checkpoint (file or sharded folder) `source`."""
    folder.mkdir()
    if source.is_dir():
        shutil.copytree(source, folder / source.name)
    else:
        shutil.copy(source, folder)
    return folder


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory) -> dict[str, Path | str]:
    """One more launch, from the step-2 checkpoints of `runs`: the FSDP run's single file
    resumed sharded (`again`), the DDP run's resumed sharded (`sharded`), and the sharded
    checkpoint resumed on 2 processes (`again_dcp`)."""
    root = tmp_path_factory.mktemp("resumed")
    folders = {"again": _holding(runs["fsdp"] / "checkpoint-00000002.pt", root / "again"),
               "sharded": _holding(runs["ddp"] / "checkpoint-00000002.pt", root / "sharded"),
               "again_dcp": _holding(runs["dcp"] / STEP_2, root / "again_dcp")}
    fsdp_file = [*TWO_BY_FOUR, "train.parallel=fsdp", "--resume", "auto"]
    done = _torchrun((folders["again"], fsdp_file), (folders["sharded"], fsdp_file),
                     (folders["again_dcp"], [*SHARDED, "--resume", "auto"]))
    assert done.returncode == 0, done.stderr[-3000:]
    return {**folders, "stdout": done.stdout}


def _assert_same_networks(a: dict, b: dict, exact: bool = False) -> None:
    """Student and teacher of checkpoints `a` and `b` agree (to the bit with `exact`)."""
    for net in ("teacher", "student"):  # full tensors, as `sere knn` reads them
        assert a[net].keys() == b[net].keys()
        for name, value in a[net].items():
            assert type(b[net][name]) is torch.Tensor, name
            if exact:
                assert torch.equal(b[net][name], value), name
            else:
                torch.testing.assert_close(b[net][name], value, rtol=WEIGHT_RTOL,
                                           atol=WEIGHT_ATOL, msg=name)


@pytest.mark.slow
def test_fsdp_trains_as_ddp_on_two_processes(runs):
    ddp, fsdp = _losses(runs["ddp"]), _losses(runs["fsdp"])
    assert len(ddp) == len(fsdp) == 3 and ddp[0].keys() == fsdp[0].keys()
    for a, b in zip(ddp, fsdp):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), key
    assert ddp[0] != ddp[-1]  # the steps did change the networks
    a, b = load_checkpoint(runs["ddp"] / "last.pt"), load_checkpoint(runs["fsdp"] / "last.pt")
    assert a["step"] == b["step"] == 3 and b["world_size"] == 2
    _assert_same_networks(a, b)
    moved = next(k for k in a["teacher"] if k.endswith("blocks.0.attn.qkv.weight"))
    start = load_checkpoint(runs["fsdp"] / "checkpoint-00000002.pt")["teacher"][moved]
    assert not torch.equal(start, b["teacher"][moved])  # the EMA moved the sharded teacher
    loaded = load_backbone(runs["fsdp"] / "last.pt")  # what `sere knn` and the others read
    assert torch.equal(loaded.backbone.state_dict()[moved.removeprefix("backbone.")],
                       b["teacher"][moved])


@pytest.mark.slow
def test_fsdp_run_resumes_bitwise_and_crosses_to_ddp_and_back(runs, resumed, tmp_path):
    """The single-file checkpoint of a sharded run resumes sharded (to the bit), on one
    unsharded process (as DDP ends, to rounding), and a DDP checkpoint resumes sharded."""
    fsdp_end = load_checkpoint(runs["fsdp"] / "last.pt")
    resumed_end = load_checkpoint(resumed["again"] / "last.pt")
    _assert_same_networks(fsdp_end, resumed_end, exact=True)
    for name, moments in fsdp_end["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(resumed_end["optimizer"]["state"][name][key], value), name
    ddp_end = load_checkpoint(runs["ddp"] / "last.pt")
    one = _holding(runs["fsdp"] / "checkpoint-00000002.pt", tmp_path / "one")
    Pretrainer(sere.load_config([], [*TWO_BY_FOUR, "optim.batch_size=8",
                                     f"train.output_dir={one}"]), resume="auto").run()
    _assert_same_networks(ddp_end, load_checkpoint(one / "last.pt"))
    _assert_same_networks(ddp_end, load_checkpoint(resumed["sharded"] / "last.pt"))


@pytest.mark.slow
def test_a_sharded_run_killed_mid_run_restarts_and_ends_bitwise(runs, tmp_path):
    """tests/test_elastic.py's SIGKILL after step 5 of 8 under torchrun --max-restarts 1, with
    `train.parallel=fsdp` and its sharded checkpoints: the restarted group resumes from step 4
    and ends to the bit where an uninterrupted sharded run (`runs["straight"]`) ends."""
    cut = tmp_path / "cut"
    done = elastic_torchrun(cut, *ELASTIC_SETTINGS, "train.parallel=fsdp", kill_step=KILL_STEP)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exitcode: -9" in done.stderr
    assert f"resuming from {cut / 'checkpoint-00000004.dcp'} at step 4" in done.stdout
    straight = _converted(runs["straight"] / "checkpoint-00000008.dcp")
    assert straight["step"] == 8
    assert_identical(straight, _converted(cut / "checkpoint-00000008.dcp"))


def _converted(checkpoint: Path) -> dict:
    """The sharded `checkpoint` as one file (`sere convert-checkpoint`), loaded, without the
    settings that differ between the runs compared."""
    single = checkpoint.with_suffix(".pt")
    if not single.exists():
        convert_sharded_checkpoint(checkpoint, single)
    state = load_checkpoint(single)
    state["config"]["train"].pop("output_dir")
    state["config"]["train"].pop("checkpoint")
    for group in state["optimizer"]["param_groups"]:  # a list once loaded by name
        group["betas"] = tuple(group["betas"])
    return state


@pytest.mark.slow
def test_sharded_checkpoints_hold_what_the_single_file_holds(runs):
    """Each process writes its own shard file; converted to one file, the end is the FSDP
    run's single-file checkpoint to the bit: networks, centers, AdamW state, random states."""
    assert sorted(p.name for p in (runs["dcp"] / STEP_3).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "run.pt"]
    single = load_checkpoint(runs["fsdp"] / "last.pt")
    single["config"]["train"].pop("output_dir")
    single["config"]["train"].pop("checkpoint")
    assert_identical(single, _converted(runs["dcp"] / STEP_3))


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_two_processes_to_the_bit(runs, resumed):
    again = resumed["again_dcp"]
    assert f"resuming from {again / STEP_2} at step 2" in resumed["stdout"]
    assert_identical(_converted(runs["dcp"] / STEP_3), _converted(again / STEP_3))


@pytest.mark.slow
def test_a_two_process_sharded_checkpoint_resumes_on_one_process(runs, tmp_path):
    """2 -> 1: one unsharded process (FSDP needs two) of the same global batch reads both
    shard files into whole tensors and ends where the sharded run ends, to rounding."""
    one = _holding(runs["dcp"] / STEP_2, tmp_path / "one")
    Pretrainer(sere.load_config([], [*TWO_BY_FOUR, "optim.batch_size=8",
                                     f"train.output_dir={one}"]), resume="auto").run()
    end, resumed = _converted(runs["dcp"] / STEP_3), load_checkpoint(one / "last.pt")
    _assert_same_networks(end, resumed)
    torch.testing.assert_close(dict(resumed["loss"]), dict(end["loss"]))


@pytest.mark.slow
def test_a_one_process_sharded_checkpoint_resumes_on_two_sharded_processes(runs):
    """1 -> 2: a one-process run's sharded checkpoint (one shard file), continued by 2 FSDP
    processes, each reading its half of every tensor: the end of the 2-process run, to
    rounding."""
    two = runs["two"]
    assert sorted(p.name for p in (two / STEP_2).iterdir()) == [".metadata", "__0_0.distcp",
                                                                "run.pt"]
    assert "continuing on 2 processes a checkpoint of 1: the same global batch" in runs["stdout"]
    end, resumed = _converted(runs["dcp"] / STEP_3), _converted(two / STEP_3)
    _assert_same_networks(end, resumed)
    for name, moments in end["optimizer"]["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(resumed["optimizer"]["state"][name][key], value,
                                       rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


def test_fsdp_on_one_process_is_one_line_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "run"
    code = main(["pretrain", *TINY, f"train.output_dir={out}", "train.parallel=fsdp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "train.parallel=fsdp" in err[0] and "torchrun" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("setting, named", [("train.compile=true", "train.compile"),
                                            ("eval.knn_every=2", "eval.knn_every"),
                                            ("train.parallel=zero", "train.parallel")])
def test_settings_fsdp_does_not_run_with_are_refused(setting, named):
    with pytest.raises(SereError, match=named):
        sere.load_config([], [*TINY, "train.parallel=fsdp", setting])


def test_mixed_precision_policy_follows_the_precision():
    assert mixed_precision_policy("fp32").param_dtype is None
    bf16 = mixed_precision_policy("bf16")
    assert bf16.param_dtype == torch.bfloat16 and bf16.reduce_dtype == torch.float32
    assert mixed_precision_policy("fp16").param_dtype == torch.float16


def test_sharded_clip_without_a_process_group_is_the_plain_clip():
    """(The 2-process agreement is the slow test's: its `optim.clip_grad` clips every step.)"""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p, scale in zip(params, (0.1, 2.0, 10.0)):
        p.grad = torch.randn_like(p) * scale
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    norms = clip_per_parameter(params, 1.0)
    torch.testing.assert_close(clip_sharded_per_parameter(copies, 1.0), norms)
    for p, c in zip(params, copies):
        torch.testing.assert_close(c.grad, p.grad)
    assert norms.max() > 1.0 and all(p.grad.norm() <= 1.0 + 1e-5 for p in params)


def test_optimizer_state_by_name_round_trip_keeps_unstepped_parameters_unstepped():
    """What a sharded run saves and loads: AdamW's state keyed by parameter name. A parameter
    without a gradient so far (the frozen last layer) has no state before or after."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    first = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    model[1].weight.grad = None  # frozen this step
    first.step()
    saved = optimizer_state_by_name(model, first)
    assert keyed_by_name(saved) and not keyed_by_name(first.state_dict())
    assert "1.weight" not in saved["state"]
    model.zero_grad(set_to_none=True)  # as a resumed run's are
    second = torch.optim.AdamW(model.parameters(), lr=0.1)
    load_optimizer_state_by_name(model, second, saved)
    assert model[1].weight not in second.state
    for p in (model[0].weight, model[0].bias, model[1].bias):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(second.state[p][key], first.state[p][key])


def test_memory_formula():
    """docs/many-gpus.md#memory-per-gpu: 16 bytes a student parameter, 4 a teacher one; FSDP
    divides them and adds two gathered units and one unit's fp32 gradient."""
    counts = Counts(student=1000, teacher=900, largest_unit=10)
    assert per_gpu_bytes(counts, gpus=4, param_bytes=2) == (19600, 19600 / 4 + 10 * 8)
    assert checkpoint_bytes(counts, gpus=4) == (15600, 15600 / 4)  # no gradients saved
    vit_s = count(["model.arch=vit_small"])
    assert 21_000_000 < vit_s.teacher < vit_s.student  # the student adds local relation heads
