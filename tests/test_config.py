"""Configuration: defaults, YAML files and `a.b=c` overrides, validation, presets
(docs/design.md#published-recipes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sere.config import (
    Config,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
)
from sere.errors import SereError

PRESETS = Path(__file__).resolve().parents[1] / "src" / "sere" / "configs"
DATA = ["data.path=/some/images"]  # the folder data set needs a path to validate


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


# ---------------------------------------------------------------------------------------------
# Defaults


def test_defaults_load_with_a_data_path():
    cfg = load_config([], DATA)
    assert cfg == apply_overrides(Config(), DATA)
    assert cfg.data.path == "/some/images"
    assert cfg.model.arch == "vit_small" and cfg.model.patch_size == 16
    assert cfg.model.resolved() == dict(embed_dim=384, depth=12, num_heads=6)
    assert cfg.optim.lr == 5e-4 and cfg.optim.min_lr == 1e-6


def test_defaults_without_data_path_are_refused_naming_the_key():
    # dataset=folder is the default and needs a path: refused before any work starts
    with pytest.raises(SereError, match=r"data\.path"):
        load_config()


def test_defaults_hold_the_vit_small_recipe_and_the_authors_values_it_restates():
    # The defaults are the ViT-S/16 recipe of docs/design.md#published-recipes
    # (tests/test_fidelity.py compares every setting with the preset); these are its values.
    cfg = Config()
    assert cfg.loss.tau_spatial == 0.5
    assert cfg.loss.tau_channel == 0.1
    assert cfg.loss.alpha == 0.2 and cfg.loss.beta == 0.5
    assert cfg.loss.warmup_teacher_temp == 0.04 and cfg.loss.teacher_temp == 0.07
    assert cfg.loss.warmup_teacher_patch_temp == 0.04 and cfg.loss.teacher_patch_temp == 0.07
    assert cfg.optim.momentum_teacher == 0.996
    assert cfg.optim.clip_grad == 0.3
    assert cfg.data.global_crops_scale == (0.4, 1.0)
    assert cfg.data.local_crops_number == 10
    # None means "patch grid - 1", i.e. 13 at 224 px / patch 16
    assert cfg.loss.global_grid is None
    assert cfg.data.global_crop_size // cfg.model.patch_size - 1 == 13


# ---------------------------------------------------------------------------------------------
# Layering


def test_yaml_files_then_overrides_layer_in_order(tmp_path):
    first = write_yaml(tmp_path / "a.yaml", {
        "optim": {"lr": 0.001, "epochs": 7, "warmup_epochs": 2},
        "data": {"path": "/first", "local_crops_number": 4},
    })
    second = write_yaml(tmp_path / "b.yaml", {
        "optim": {"lr": 0.002},
        "data": {"path": "/second"},
    })
    cfg = load_config([first, second])
    assert cfg.optim.lr == 0.002  # the later file wins
    assert cfg.optim.epochs == 7  # keys the later file leaves out keep the earlier value
    assert cfg.data.path == "/second"
    assert cfg.data.local_crops_number == 4
    assert cfg.optim.batch_size == Config().optim.batch_size  # untouched: the default

    cfg = load_config([first, second], ["optim.lr=0.003", "data.local_crops_number=2",
                                        "optim.lr=0.004"])
    assert cfg.optim.lr == 0.004  # overrides apply after the files, in order
    assert cfg.data.local_crops_number == 2
    assert cfg.optim.epochs == 7

    cfg = load_config([second, first])
    assert cfg.optim.lr == 0.001 and cfg.data.path == "/first"


def test_override_values_are_read_as_yaml():
    assert parse_override("optim.lr=0.5") == {"optim": {"lr": 0.5}}
    assert parse_override("model.embed_dim=null") == {"model": {"embed_dim": None}}
    assert parse_override("model.embed_dim=None") == {"model": {"embed_dim": None}}
    assert parse_override("data.global_crops_scale=[0.3, 1]") == {
        "data": {"global_crops_scale": [0.3, 1]}}
    cfg = load_config([], DATA + ["data.global_crops_scale=[0.3, 1]", "model.shared_head=false",
                                  "model.embed_dim=64", "model.num_heads=4"])
    assert cfg.data.global_crops_scale == (0.3, 1.0)
    assert isinstance(cfg.data.global_crops_scale[1], float)
    assert cfg.model.shared_head is False
    assert cfg.model.resolved() == dict(embed_dim=64, depth=12, num_heads=4)


def test_override_without_equals_sign_is_refused():
    with pytest.raises(SereError, match="optim.lr"):
        load_config([], DATA + ["optim.lr"])


def test_exponent_notation_without_a_dot_is_a_number():
    # `optim.lr=1e-3` is the example of the CLI help and of parse_override's docstring; PyYAML
    # reads "1e-3" as a string (YAML 1.1 needs a dot), so it must still be accepted as 0.001.
    assert load_config([], DATA + ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)


def test_exponent_notation_without_a_dot_in_a_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 5e-4\n  min_lr: 1e-6\ndata:\n  path: /x\n")
    cfg = load_config([path])
    assert cfg.optim.lr == pytest.approx(5e-4) and cfg.optim.min_lr == pytest.approx(1e-6)


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("override, key", [
    ("bogus=1", "bogus"),
    ("optim.bogus=1", "optim.bogus"),
    ("model.head.depth=2", "model.head"),
])
def test_unknown_override_key_names_the_key(override, key):
    with pytest.raises(SereError, match="unknown configuration key") as err:
        load_config([], DATA + [override])
    assert f"'{key}'" in str(err.value)


def test_unknown_key_in_a_yaml_file_names_the_key(tmp_path):
    nested = write_yaml(tmp_path / "n.yaml", {"model": {"arch": "vit_tiny", "widht": 3}})
    with pytest.raises(SereError, match=r"'model\.widht'"):
        load_config([nested], DATA)
    top = write_yaml(tmp_path / "t.yaml", {"modle": {"arch": "vit_tiny"}})
    with pytest.raises(SereError, match=r"'modle'"):
        load_config([top], DATA)


def test_section_given_as_a_scalar_is_refused():
    with pytest.raises(SereError, match="'model' is a section"):
        load_config([], DATA + ["model=3"])


def test_missing_and_malformed_yaml_files_are_refused(tmp_path):
    with pytest.raises(SereError, match="does not exist"):
        load_config([tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(SereError, match="not valid YAML"):
        load_config([bad])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(SereError, match="mapping"):
        load_config([scalar])


@pytest.mark.parametrize("override, key, what", [
    ("optim.epochs=1.5", "optim.epochs", "integer"),
    ("optim.epochs=true", "optim.epochs", "integer"),
    ("optim.lr=fast", "optim.lr", "number"),
    ("model.shared_head=1", "model.shared_head", "true or false"),
    ("data.global_crops_scale=0.5", "data.global_crops_scale", "list"),
    ("data.global_crops_scale=[0.1, 0.5, 1.0]", "data.global_crops_scale", "exactly 2"),
    ("train.device=tpu", "train.device", "not allowed"),
    ("data.dataset=imagenet", "data.dataset", "not allowed"),
    ("data.path=[a, b]", "data.path", "string"),
])
def test_wrong_types_are_refused_naming_the_key(override, key, what):
    with pytest.raises(SereError) as err:
        load_config([], DATA + [override])
    assert key in str(err.value) and what in str(err.value)


@pytest.mark.parametrize("overrides, key", [
    (["optim.lr=-0.001"], "optim.lr"),
    (["optim.lr=.nan"], "optim.lr"),
    (["optim.min_lr=-1.0"], "optim.min_lr"),
    (["data.global_crop_size=100"], "data.global_crop_size"),  # patch 16
    (["data.local_crop_size=40"], "data.local_crop_size"),
    (["model.patch_size=8", "data.global_crop_size=36"], "data.global_crop_size"),
    (["data.global_crops_scale=[0.0, 1.0]"], "data.global_crops_scale"),
    (["data.global_crops_scale=[0.5, 1.2]"], "data.global_crops_scale"),
    (["data.global_crops_scale=[0.8, 0.5]"], "data.global_crops_scale"),
    (["data.local_crops_scale=[-0.1, 0.4]"], "data.local_crops_scale"),
    (["mask.ratio=[0.5]", "mask.ratio_jitter=[0.5]"], "mask.ratio"),
    (["mask.ratio=[0.0, 0.9]", "mask.ratio_jitter=[0.0, 0.2]"], "mask.ratio"),
    (["mask.ratio=[0.0, 0.3]", "mask.ratio_jitter=[0.0]"], "mask.ratio"),
    (["model.embed_dim=100", "model.num_heads=6"], "model.embed_dim"),
    (["model.num_heads=5"], "model.embed_dim"),  # 384 is not divisible by 5
    (["model.arch=vit_huge"], "model.arch"),
    (["model.in_chans=2"], "model.in_chans"),
    (["model.drop_path=1.0"], "model.drop_path"),
    (["optim.warmup_epochs=200"], "optim.warmup_epochs"),
    (["loss.alpha=-0.1"], "loss.alpha"),
    (["loss.tau_spatial=0"], "loss.tau_spatial"),
    (["model.in_chans=1"], "data.normalize_mean"),  # default mean has 3 entries
])
def test_invalid_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(SereError) as err:
        load_config([], DATA + overrides)
    assert key in str(err.value)


def test_boundary_values_are_accepted():
    cfg = load_config([], DATA + ["optim.lr=0.0", "data.global_crops_scale=[1.0, 1.0]",
                                  "mask.ratio=[0.0, 0.5]", "mask.ratio_jitter=[0.0, 0.49]",
                                  "model.in_chans=1", "data.normalize_mean=[0.5]",
                                  "data.normalize_std=[0.25]"])
    assert cfg.optim.lr == 0.0
    assert cfg.mask.ratio_jitter == (0.0, 0.49)
    assert cfg.model.in_chans == 1


# ---------------------------------------------------------------------------------------------
# Presets (docs/design.md#published-recipes)


def preset(name: str) -> Config:
    return load_config([PRESETS / f"{name}.yaml"], DATA)


@pytest.mark.parametrize("name, arch, lr, min_lr, temp_epochs, norm_last, freeze, g_low, l_high", [
    ("vit_small_ibot_sere", "vit_small", 5e-4, 1e-6, 30, False, 1, 0.40, 0.40),
    ("vit_base_ibot_sere", "vit_base", 7.5e-4, 2e-6, 50, True, 3, 0.32, 0.32),
])
def test_recipe_presets_hold_the_published_numbers(name, arch, lr, min_lr, temp_epochs,
                                                   norm_last, freeze, g_low, l_high):
    cfg = preset(name)
    assert cfg.model.arch == arch and cfg.model.patch_size == 16
    assert cfg.model.out_dim == 8192
    assert cfg.model.shared_head is True
    assert cfg.model.norm_last_layer is norm_last
    assert cfg.model.drop_path == pytest.approx(0.1)
    assert cfg.loss.alpha == pytest.approx(0.2)
    assert cfg.loss.beta == pytest.approx(0.5)
    assert cfg.loss.lambda1 == 1.0 and cfg.loss.lambda2 == 1.0  # iBOT
    assert cfg.loss.teacher_temp == pytest.approx(0.07)
    assert cfg.loss.teacher_patch_temp == pytest.approx(0.07)
    assert cfg.loss.warmup_teacher_temp == pytest.approx(0.04)
    assert cfg.loss.warmup_teacher_patch_temp == pytest.approx(0.04)
    assert cfg.loss.warmup_teacher_temp_epochs == temp_epochs
    assert cfg.optim.lr == pytest.approx(lr)
    assert cfg.optim.min_lr == pytest.approx(min_lr)
    assert cfg.optim.clip_grad == pytest.approx(0.3)
    assert cfg.optim.freeze_last_layer == freeze
    assert cfg.optim.epochs == 100 and cfg.optim.warmup_epochs == 10
    assert cfg.optim.weight_decay == pytest.approx(0.04)
    assert cfg.optim.weight_decay_end == pytest.approx(0.4)
    assert cfg.optim.momentum_teacher == pytest.approx(0.996)
    assert cfg.data.global_crop_size == 224 and cfg.data.local_crop_size == 96
    assert cfg.data.local_crops_number == 10
    assert cfg.data.global_crops_scale == pytest.approx((g_low, 1.0))
    assert cfg.data.local_crops_scale == pytest.approx((0.05, l_high))
    assert cfg.mask.ratio == pytest.approx((0.0, 0.3))
    assert cfg.mask.ratio_jitter == pytest.approx((0.0, 0.2))


def test_recipe_presets_need_a_data_path():
    with pytest.raises(SereError, match=r"data\.path"):
        load_config([PRESETS / "vit_small_ibot_sere.yaml"])


def test_demo_preset_loads_and_is_consistent():
    cfg = load_config([PRESETS / "demo.yaml"])
    assert cfg.data.dataset == "fashion_mnist"
    assert cfg.model.in_chans == 1
    assert len(cfg.data.normalize_mean) == 1 and len(cfg.data.normalize_std) == 1
    assert cfg.data.global_crop_size % cfg.model.patch_size == 0
    assert cfg.data.local_crop_size % cfg.model.patch_size == 0
    assert cfg.loss.alpha == pytest.approx(0.2) and cfg.loss.beta == pytest.approx(0.5)
    assert cfg.model.resolved()["embed_dim"] % cfg.model.resolved()["num_heads"] == 0


# ---------------------------------------------------------------------------------------------
# Saving


@pytest.mark.parametrize("name", ["demo", "vit_small_ibot_sere", "vit_base_ibot_sere"])
def test_save_config_round_trip(tmp_path, name):
    cfg = load_config([PRESETS / f"{name}.yaml"],
                      DATA + ["optim.lr=0.00125", "mask.ratio=[0.1, 0.2, 0.3]",
                              "mask.ratio_jitter=[0.0, 0.05, 0.1]", "model.embed_dim=null"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config([path])
    assert again == cfg
    assert again.mask.ratio == (0.1, 0.2, 0.3)
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    # to_dict is plain YAML-able data: tuples became lists
    assert cfg.to_dict()["data"]["global_crops_scale"] == list(cfg.data.global_crops_scale)


def test_repository_configs_folder_shows_the_presets():
    """README commands use configs/*.yaml from the repository root: the same files as the
    presets shipped in the package."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for name in ("demo", "vit_small_ibot_sere", "vit_base_ibot_sere"):
        shown = root / "configs" / f"{name}.yaml"
        assert shown.is_file(), shown
        assert shown.read_text() == (root / "src/sere/configs" / f"{name}.yaml").read_text()


def _other_value(default) -> str:
    """A value other than `default` for a dataset-specific setting, as an override."""
    if isinstance(default, bool):
        return str(not default).lower()
    if isinstance(default, int):
        return str(default + 8)
    return "wrong" if default == "error" else "/some/folder"


def _walk_dataset_keys(load, defaults, readers: dict, datasets: tuple[str, ...],
                       needs: dict[str, list[str]]) -> int:
    """Set each dataset-specific key under every data set: refused, naming the key and its
    readers, exactly where the data set does not read it. Returns the pairs checked."""
    checked = 0
    for key, readers_of_key in readers.items():
        setting = f"data.{key}={_other_value(getattr(defaults, key))}"
        for dataset in datasets:
            overrides = [f"data.dataset={dataset}", *needs.get(dataset, []), setting]
            if dataset in readers_of_key:
                load(overrides)  # read: accepted
                continue
            with pytest.raises(SereError, match=rf"data\.{key} = .* is read only by "
                                                rf"data\.dataset={readers_of_key[0]}"):
                load(overrides)
            checked += 1
    return checked


def test_every_dataset_specific_key_is_refused_where_unread():
    from sere.config import DATASET_KEYS, DataConfig
    from sere.finetune.config import DATASET_KEYS as FT_KEYS
    from sere.finetune.config import FinetuneDataConfig, load_finetune_config

    pretrain = _walk_dataset_keys(
        lambda o: load_config([], o), DataConfig(), DATASET_KEYS,
        ("folder", "fashion_mnist", "fashion_mnist_scenes", "synthetic"),
        {"folder": ["data.path=/images"]})
    finetune = _walk_dataset_keys(
        lambda o: load_finetune_config([], o), FinetuneDataConfig(), FT_KEYS,
        ("folder", "fashion_mnist", "synthetic"),
        {"folder": ["data.train_path=/train", "data.test_path=/test"]})
    assert (pretrain, finetune) == (19, 12)  # every (key, data set not reading it)
    # The case: the fine-tuning demo (Fashion-MNIST) with a folder's paths.
    from sere.cli.common import resolve_config_path

    with pytest.raises(SereError, match=r"data\.train_path = /mine is read only by "
                                        r"data\.dataset=folder, but data\.dataset is "
                                        r"fashion_mnist"):
        load_finetune_config([resolve_config_path("finetune_demo")], ["data.train_path=/mine"])


def test_load_config_takes_preset_names_as_the_commands_do():
    from sere.cli.common import resolve_config_path

    by_name = load_config(["demo"])
    assert by_name.to_dict() == load_config([resolve_config_path("demo")]).to_dict()
    assert by_name.data.dataset == "fashion_mnist"
    assert load_config(["demo.yaml"]).to_dict() == by_name.to_dict()
    with pytest.raises(SereError, match="nosuch does not exist and is not a preset; presets: "
                                        ".*demo"):
        load_config(["nosuch"])
