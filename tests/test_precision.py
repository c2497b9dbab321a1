"""train.precision=auto follows the CPU's bf16 capability (issue: bf16 emulated on most CPUs)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

import sere
from sere.cli import main as sere_main
from sere.errors import SereError
from sere.runtime import choose_precision, native_bf16_feature

from conftest import TINY

CPU = torch.device("cpu")
NO_BF16 = {"cpu_name": "Test CPU", "architecture": "x86_64", "avx2": True,
           "avx512_bf16": False, "amx_bf16": False}
AVX512_BF16 = {**NO_BF16, "avx512_bf16": True}
AMX = {**NO_BF16, "amx_bf16": True, "amx_tile": True}
ARM_BF16 = {"cpu_name": "Test Arm", "architecture": "aarch64", "neon": True, "bf16": True}


@pytest.fixture
def cpu_caps(monkeypatch):
    """Factory: `cpu_caps(mapping)` makes `torch.cpu.get_capabilities()` report `mapping`."""
    return lambda caps: monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


@pytest.mark.parametrize("caps, feature", [(NO_BF16, None), (AVX512_BF16, "AVX512-BF16"),
                                           (AMX, "AMX-BF16"), (ARM_BF16, "Arm BF16"),
                                           ({"architecture": "aarch64", "neon": True}, None)])
def test_native_bf16_feature(caps, feature):
    assert native_bf16_feature(caps) == feature


@pytest.mark.parametrize("caps, expected", [(NO_BF16, "fp32"), (AVX512_BF16, "bf16"),
                                            (AMX, "bf16"), (ARM_BF16, "bf16")])
def test_auto_follows_the_capability(cpu_caps, caps, expected):
    cpu_caps(caps)
    choice = choose_precision("auto", CPU)
    assert choice.name == expected
    assert ("no native bf16" in choice.reason) == (expected == "fp32")


def test_auto_on_a_gpu_is_fp16():
    assert choose_precision("auto", torch.device("cuda")).name == "fp16"


def test_explicit_bf16_without_native_support_warns_once_and_runs(cpu_caps, caplog):
    cpu_caps(NO_BF16)
    with caplog.at_level(logging.WARNING, logger="sere.runtime"):
        choice = choose_precision("bf16", CPU)
    assert choice.name == "bf16"
    assert len(caplog.records) == 1 and "emulates" in caplog.records[0].getMessage()
    caplog.clear()
    cpu_caps(AMX)
    with caplog.at_level(logging.WARNING, logger="sere.runtime"):
        assert choose_precision("bf16", CPU).name == "bf16"
    assert not caplog.records


def test_fp16_on_the_cpu_is_an_error():
    with pytest.raises(SereError, match="fp16 needs a GPU"):
        choose_precision("fp16", CPU)


def test_presets_use_auto():
    presets = sorted((Path(sere.__file__).parent / "configs").glob("*.yaml"))
    assert len(presets) >= 6
    for path in presets:
        assert yaml.safe_load(path.read_text())["train"]["precision"] == "auto", path.name


@pytest.mark.parametrize("caps, expected", [(NO_BF16, "precision: fp32 (auto: Test CPU has no "
                                                      "native bf16"),
                                            (AMX, "precision: bf16 (auto: Test CPU computes "
                                                  "bf16 natively (AMX-BF16))")])
def test_pretrain_says_which_precision_and_why(tmp_path, cpu_caps, capsys, caps, expected):
    cpu_caps(caps)
    overrides = [t for t in TINY if not t.startswith("train.precision")]
    code = sere_main(["pretrain", *overrides, f"train.output_dir={tmp_path / 'run'}",
                      "train.max_steps=1", "train.precision=auto"])
    assert code == 0
    out = capsys.readouterr().out
    assert expected in out
    assert out.index("precision:") < out.index("finished at step 1")
