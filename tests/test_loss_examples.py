"""The loss classes take plain numbers and show it: each carries a runnable `>>>` example in
its docstring, and these examples run (and must pass) here."""

from __future__ import annotations

import doctest

import pytest

from sere.losses import distillation, objective, relation

LOSS_CLASSES = [distillation.DistillationLoss, relation.SpatialRelationLoss,
                relation.ChannelRelationLoss, objective.SEREObjective]


@pytest.mark.parametrize("module", [distillation, relation, objective],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.failed == 0
    assert result.attempted > 0


@pytest.mark.parametrize("cls", LOSS_CLASSES, ids=lambda c: c.__name__)
def test_every_loss_class_has_an_example_and_a_reference(cls):
    assert ">>> " in cls.__doc__
    assert "docs/design.md#" in cls.__doc__
