"""Slow tests: the demo path on real Fashion-MNIST, and stopping on a signal (one process, and
one rank of two under torchrun)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sere
from sere.cli import main
from sere.eval import visualize
from sere.io.checkpoint import load_checkpoint
from sere.train.loop import Pretrainer

from conftest import TINY

pytestmark = pytest.mark.slow


NO_BF16 = {"cpu_name": "Test CPU", "avx2": True, "avx512_bf16": False, "amx_bf16": False}


def test_demo_path_on_a_fashion_mnist_subset(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: NO_BF16)
    embedded = []  # the t-SNE map's number of images
    tsne = visualize.tsne_embedding
    monkeypatch.setattr(visualize, "tsne_embedding",
                        lambda features: embedded.append(len(features)) or tsne(features))
    code = main(["demo", "--output-dir", str(tmp_path / "demo"), "--max-train", "1000",
                 "--max-test", "300", "data.max_images=512", "optim.epochs=1",
                 "train.log_every=4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "precision: fp32 (auto: Test CPU has no native bf16" in out
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"k-NN top-1: pretrained (\d+\.\d) %, random init (\d+\.\d) %", last)
    assert match, last
    pretrained, random_init = map(float, match.groups())
    assert 20 < pretrained <= 100 and 20 < random_init <= 100  # both far above chance (10 %)
    run = tmp_path / "demo"
    assert (run / "losses.png").stat().st_size > 1000
    assert (run / "pictures" / "tsne_cls.png").stat().st_size > 1000
    assert embedded == [300]  # no more images than the k-NN's test images
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
    assert steps[-1] == 512 // 64


class PretrainingDone(Exception):
    """Raised in place of the demo's evaluation: the test needs only its pretraining."""


def test_demo_chooses_bf16_where_the_cpu_has_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**NO_BF16, "amx_bf16": True})

    def stop(*args, **kwargs):
        raise PretrainingDone

    # pretraining decides and prints the precision; the demo's k-NN and pictures after it
    # are the fp32 test's (bf16 is emulated, slowly, on most CPUs that run the tests)
    monkeypatch.setattr("sere.eval.knn_run.run_knn", stop)
    with pytest.raises(PretrainingDone):
        main(["demo", "--output-dir", str(tmp_path / "demo"), "train.max_steps=1",
              "data.max_images=16", "optim.batch_size=16", "model.depth=1"])
    assert "precision: bf16 (auto: Test CPU computes bf16 natively (AMX-BF16))" in (
        capsys.readouterr().out)
    assert load_checkpoint(tmp_path / "demo" / "last.pt")["step"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sere.cli", "pretrain", *args]


def test_sigterm_checkpoints_mid_epoch_and_resume_matches(tmp_path, one_thread):
    """SIGTERM mid-run: exit 0 with a checkpoint; --resume auto then ends bitwise where an
    uninterrupted run ends."""
    import os
    import signal
    import time

    # one compute thread everywhere: the killed run's process and the in-process runs
    common = [*TINY, "optim.epochs=4", "train.save_every=1000", "data.synthetic_images=64",
              "train.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    Pretrainer(sere.load_config([], [*common, f"train.output_dir={straight}"])).run()
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli(*common, f"train.output_dir={cut}"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and
                                          len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "--resume auto" in out
    stopped = load_checkpoint(cut / "last.pt")["step"]
    total = 4 * (64 // 8)
    assert 3 <= stopped < total
    Pretrainer(sere.load_config([], [*common, f"train.output_dir={cut}"]),
               resume="auto").run()
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(cut / "last.pt")
    assert a["step"] == b["step"] == total
    for part in ("student", "teacher"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), (part, name)
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").open()]
              for d in (straight, cut)]
    assert losses[0] == losses[1]


def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Under torchrun, SIGUSR1 to rank 1 alone: both ranks stop after the same step, rank 0
    writes the checkpoint, and everything exits 0."""
    import os
    import signal
    import time

    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "sere.cli", "pretrain", *TINY, "optim.epochs=50", "optim.batch_size=4",
           "train.save_every=1000", f"train.output_dir={run}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and
                                          len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
    ranks = {}
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e for e in environ if e.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0].split(b"=")[1])] = int(pid)
    assert set(ranks) == {0, 1}
    os.kill(ranks[1], signal.SIGUSR1)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "--resume auto" in out
    state = load_checkpoint(run / "last.pt")
    total = 50 * (32 // 8)
    assert 2 <= state["step"] < total
    assert len(state["rng"]) == 2  # both ranks took part in the final checkpoint
