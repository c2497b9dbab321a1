"""`key=value` settings anywhere on a `sere` command line, and `sere config --list / --show`."""

from __future__ import annotations

import dataclasses
import types

import pytest
import yaml

import sere.cli.pretrain as pretrain_cli
from sere.cli import main, parse_args
from sere.cli.common import split_overrides
from sere.cli.config_keys import config_keys
from sere.config import Config, config_from_dict, load_config
from sere.cli import build_parser

SETTINGS = ["optim.batch_size=2", "train.seed=3", "optim.lr=1e-3"]


@pytest.fixture
def built_configs(monkeypatch):
    """The Config each `sere pretrain` builds, without training."""
    built: list[Config] = []

    class FakePretrainer:
        def __init__(self, cfg, resume=None, evaluate=None):
            built.append(cfg)

        def run(self):
            return types.SimpleNamespace(preempted=True)

    from sere.train import loop  # `sere pretrain` imports it when it runs (start-up time)

    monkeypatch.setattr(loop, "Pretrainer", FakePretrainer)
    return built


ORDERS = [
    ["--config", "demo", "--resume", "auto", *SETTINGS],
    ["--resume", "auto", "--config", "demo", *SETTINGS],
    [*SETTINGS, "--config", "demo", "--resume", "auto"],
    ["optim.batch_size=2", "--resume", "auto", "train.seed=3", "--config", "demo",
     "optim.lr=1e-3"],
    ["--resume=auto", "optim.batch_size=2", "--config=demo", "train.seed=3", "optim.lr=1e-3"],
]


def test_settings_in_any_order_give_the_same_config(built_configs, tmp_path):
    """The issue's example (`--resume auto optim.batch_size=2` was refused) and more orders."""
    out = f"train.output_dir={tmp_path}"
    for order in ORDERS:
        assert main(["pretrain", *order, out]) == 0
    expected = load_config([pretrain_cli.resolve_config_path("demo")], [*SETTINGS, out])
    assert len(built_configs) == len(ORDERS)
    for cfg in built_configs:
        assert cfg == expected
    assert expected.optim.batch_size == 2 and expected.train.seed == 3


def test_later_settings_win_wherever_they_stand(built_configs, tmp_path):
    main(["pretrain", "optim.batch_size=2", "--config", "demo", "optim.batch_size=5",
          f"train.output_dir={tmp_path}"])
    assert built_configs[-1].optim.batch_size == 5


def test_every_command_with_settings_takes_them_anywhere():
    args = parse_args(["knn", "eval.k=5", "--checkpoint", "c.pt", "--k", "10", "20",
                       "eval.temperature=0.1", "--workers", "1"])
    assert args.k == [10, 20] and args.workers == 1
    assert args.overrides == ["eval.k=5", "eval.temperature=0.1"]
    args = parse_args(["finetune", "optim.epochs=5", "--checkpoint", "c.pt", "--random-init",
                       "optim.lr=1e-3", "--config", "finetune_demo"])
    assert args.overrides == ["optim.epochs=5", "optim.lr=1e-3"] and args.random_init
    args = parse_args(["demo", "train.seed=1", "--max-test", "50", "optim.epochs=1"])
    assert args.overrides == ["train.seed=1", "optim.epochs=1"] and args.max_test == 50
    args = parse_args(["import-check", "model.arch=vit_base", "--weights", "w.pth", "--config",
                       "vit_small_ibot_sere", "--no-head"])
    assert args.overrides == ["model.arch=vit_base"] and args.no_head


def test_an_option_value_that_looks_like_a_setting_stays_the_value():
    args = parse_args(["knn", "--checkpoint", "run=1.pt", "eval.k=3"])
    assert args.checkpoint == "run=1.pt" and args.overrides == ["eval.k=3"]
    args = parse_args(["pretrain", "--res", "a.b=c.pt", "optim.lr=1"])  # argparse's prefixes
    assert args.resume == "a.b=c.pt" and args.overrides == ["optim.lr=1"]


def test_split_overrides_keeps_options_and_positionals_in_order():
    parser = build_parser()
    kept, overrides = split_overrides(parser, ["--version", "x.y=1", "--", "a=2", "b"])
    assert kept == ["--version", "--", "b"] and overrides == ["x.y=1", "a=2"]


def test_commands_without_settings_still_refuse_them(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["export", "--checkpoint", "c.pt", "--output", "o", "optim.lr=1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: optim.lr=1" in capsys.readouterr().err


def test_a_stray_word_is_refused_in_one_line(capsys, tmp_path):
    code = main(["pretrain", "--config", "demo", "oops", f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'oops'" in err


def leaf_keys(settings, prefix=""):
    """Every leaf key of a settings dataclass by a plain dataclasses.fields walk."""
    keys = []
    for f in dataclasses.fields(settings):
        name = f.name.rstrip("_")
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            keys += leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_config_list_names_every_key_with_default_and_meaning(capsys):
    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    listed = {k.key: k for k in config_keys(Config())}
    assert list(listed) == leaf_keys(Config())
    empty = [key for key, item in listed.items() if not item.meaning.strip()]
    assert not empty, f"settings without a comment in src/sere/config.py: {empty}"
    for key, item in listed.items():
        assert f"  {key} = " in out
        assert item.meaning in out
    assert "  optim.lr = 0.0005  (float)\n      per 256 images of total batch" in out
    assert "  init.from = null  (str | null)" in out


def test_config_list_covers_fine_tuning_keys(capsys):
    from sere.finetune.config import FinetuneConfig

    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    pretraining, finetuning = out.split("sere finetune: its own settings")
    listed = {k.key: k for k in config_keys(FinetuneConfig())}
    assert list(listed) == leaf_keys(FinetuneConfig())
    empty = [key for key, item in listed.items() if not item.meaning.strip()]
    assert not empty, f"settings without a comment in src/sere/finetune/config.py: {empty}"
    for key, item in listed.items():
        assert f"  {key} = " in finetuning and item.meaning in finetuning, key
    assert "  data.unknown_classes = error  (" in finetuning
    assert "data.train_path" not in pretraining and "  optim.layer_decay = " in finetuning


def test_config_list_defaults_are_the_config_defaults():
    defaults = Config().to_dict()
    for item in config_keys(Config()):
        section, name = item.key.split(".")
        assert item.default == defaults[section][name], item.key


def test_config_show_is_what_pretrain_uses(built_configs, capsys, tmp_path):
    argv = ["--config", "demo", "optim.batch_size=2", "--resume", "auto", "train.seed=7",
            f"train.output_dir={tmp_path}"]
    assert main(["config", "--show", *argv]) == 0
    shown = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert main(["pretrain", *argv]) == 0
    assert shown == built_configs[-1]
    assert shown.train.seed == 7 and shown.optim.batch_size == 2


def test_config_show_refuses_what_pretrain_refuses(capsys):
    for bad, fragment in (("optim.learning_rate=1", "optim.learning_rate"),
                          ("train.precision=fp8", "train.precision")):
        code = main(["config", "--show", "--config", "demo", bad])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and fragment in err
        assert err.startswith("error: ")


def test_config_list_takes_no_settings(capsys):
    assert main(["config", "--list", "optim.lr=1"]) == 2
    assert "--show" in capsys.readouterr().err
