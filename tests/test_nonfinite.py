"""Non-finite losses: stop keeps the last checkpoint untouched; skip leaves the weights alone."""

from __future__ import annotations

import json

import pytest
import torch

from sere.errors import SereError
from sere.train.loop import Pretrainer


def _poison(trainer: Pretrainer, bad_steps: set[int]) -> None:
    """Make the loss NaN at the given (0-based) steps."""
    forward = trainer.loss_fn.forward

    def poisoned(*args, **kwargs):
        terms = forward(*args, **kwargs)
        if trainer.step in bad_steps:
            terms.total = terms.total * float("nan")
            terms.spatial = terms.spatial * float("nan")
        return terms

    trainer.loss_fn.forward = poisoned


def test_stop_names_the_step_and_keeps_the_checkpoint(tiny):
    trainer = Pretrainer(tiny("train.max_steps=6", "train.save_every=2"))
    _poison(trainer, {3})
    with pytest.raises(SereError, match=r"non-finite loss at step 3.*loss_spatial"):
        trainer.run()
    run = trainer.output_dir
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert "step 3" in (run / "STOPPED_NONFINITE.txt").read_text()
    assert sorted(p.name for p in run.glob("checkpoint-*.pt")) == ["checkpoint-00000002.pt"]
    from sere.io.checkpoint import load_checkpoint

    assert load_checkpoint(run / "last.pt")["step"] == 2


def test_skip_leaves_weights_and_centers_unchanged(tiny):
    trainer = Pretrainer(tiny("train.max_steps=4", "train.on_nonfinite=skip"))
    _poison(trainer, {2})
    snapshots = {}
    step = trainer.train_step

    def recording(micro):
        # Parameters only: BatchNorm running statistics move in any forward pass, and SERE
        # never reads them (its BatchNorm always uses batch statistics).
        params = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
        snapshots[trainer.step] = (params, trainer.loss_fn.distillation.center.clone())
        return step(micro)

    trainer.train_step = recording
    result = trainer.run()
    assert result.step == 4
    before, center_before = snapshots[2]
    after, center_after = snapshots[3]
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    assert torch.equal(center_before, center_after)
    assert not torch.equal(snapshots[1][0]["head.mlp.0.weight"], before["head.mlp.0.weight"])
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").open()]
    assert records[-1]["nonfinite_steps"] == 1


def test_skip_gives_up_after_too_many_in_a_row(tiny):
    trainer = Pretrainer(tiny("train.max_steps=8", "train.on_nonfinite=skip",
                              "train.max_nonfinite=3"))
    _poison(trainer, {1, 2, 3, 4})
    with pytest.raises(SereError, match=r"3 steps in a row"):
        trainer.run()
    assert trainer.step == 3
