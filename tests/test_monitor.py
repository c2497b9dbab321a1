"""The collapse monitor recognises each kind of collapse and stays quiet on healthy outputs."""

from __future__ import annotations

import json
import math

import torch

from sere.train.loop import Pretrainer
from sere.train.monitor import collapse_stats, effective_rank

K, C, B = 64, 16, 32


def _stats(logits, embeddings, relation_map=None, temp=0.1):
    return collapse_stats(logits, torch.zeros(1, K), temp, embeddings, relation_map,
                          num_heads=2, tau=0.5)


def test_healthy_outputs_raise_no_warning():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, generator=g)
    stats = _stats(logits, torch.randn(B, C, generator=g),
                   torch.randn(B, C, 4, 4, generator=g) * 5)
    assert stats.warnings() == []
    assert 1.0 < stats.cls_effective_rank <= C
    assert 0 < stats.teacher_entropy < math.log(K)


def test_uniform_collapse_is_flagged():
    stats = _stats(torch.zeros(B, K), torch.randn(B, C))
    assert math.isclose(stats.teacher_entropy, math.log(K), rel_tol=1e-5)
    assert any("uniform collapse" in w for w in stats.warnings())


def test_dominant_collapse_is_flagged():
    logits = torch.zeros(B, K)
    logits[:, 3] = 50.0  # every image says "class 3"
    stats = _stats(logits, torch.randn(B, C))
    assert stats.teacher_mean_kl_uniform > 0.99 * math.log(K)
    assert any("dominant collapse" in w for w in stats.warnings())


def test_dimensional_collapse_is_flagged():
    direction = torch.randn(1, C)
    embeddings = torch.randn(B, 1) * direction + 1e-4 * torch.randn(B, C)
    assert effective_rank(embeddings) < 1.1
    assert effective_rank(torch.randn(4 * C, C)) > 0.8 * C
    assert any("dimensional collapse" in w for w in _stats(torch.randn(B, K),
                                                          embeddings).warnings())


def test_flat_relations_are_flagged():
    constant = torch.ones(B, C, 4, 4)  # every patch alike: every relation row is flat
    stats = _stats(torch.randn(B, K), torch.randn(B, C), constant)
    assert math.isclose(stats.relation_entropy, math.log(16), rel_tol=1e-5)
    assert any("relations" in w for w in stats.warnings())


def test_statistics_are_logged(tiny):
    result = Pretrainer(tiny("train.max_steps=2")).run()
    record = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("teacher_entropy", "teacher_mean_kl_uniform", "cls_effective_rank",
                "relation_entropy"):
        assert math.isfinite(record[key]) and record[key] >= 0, key
