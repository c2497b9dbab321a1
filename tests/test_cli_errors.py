"""The `sere` command turns user errors into one clean line and exit code 2."""

from __future__ import annotations

import pytest
import torch

from sere.cli import main, resolve_config_path
from sere.errors import SereError
from sere.io.checkpoint import save_checkpoint


def run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_override_key(capsys, tmp_path):
    code, err = run(capsys, ["pretrain", "--config", "demo", f"train.output_dir={tmp_path}",
                             "optim.learning_rate=0.1"])
    assert_clean_error(code, err, "optim.learning_rate")
    assert not (tmp_path / "config.yaml").exists()  # refused before any work


def test_unknown_top_level_key(capsys, tmp_path):
    code, err = run(capsys, ["pretrain", "--config", "demo", f"train.output_dir={tmp_path}",
                             "trian.seed=1"])
    assert_clean_error(code, err, "trian")


def test_invalid_value(capsys, tmp_path):
    code, err = run(capsys, ["pretrain", "--config", "demo", f"train.output_dir={tmp_path}",
                             "data.global_crop_size=30"])
    assert_clean_error(code, err, "data.global_crop_size")


def test_nonexistent_data_path(capsys, tmp_path):
    missing = tmp_path / "no-such-images"
    code, err = run(capsys, ["pretrain", "--config", "demo", "data.dataset=folder",
                             f"data.path={missing}", f"train.output_dir={tmp_path / 'out'}",
                             "train.device=cpu"])
    assert_clean_error(code, err, str(missing))


def test_folder_dataset_without_path(capsys, tmp_path):
    code, err = run(capsys, ["pretrain", "--config", "vit_small_ibot_sere",
                             f"train.output_dir={tmp_path}"])
    assert_clean_error(code, err, "data.path")


def test_exponent_override_from_the_help_text_is_accepted(capsys, tmp_path):
    # `optim.lr=1e-3` is the example in the command's own help; it must not be the error.
    missing = tmp_path / "no-such-images"
    code, err = run(capsys, ["pretrain", "--config", "demo", "optim.lr=1e-3",
                             "data.dataset=folder", f"data.path={missing}",
                             f"train.output_dir={tmp_path / 'out'}", "train.device=cpu"])
    assert_clean_error(code, err, str(missing))


def test_bad_preset_name(capsys):
    code, err = run(capsys, ["pretrain", "--config", "vit_huge_recipe"])
    assert_clean_error(code, err, "vit_huge_recipe", "demo", "vit_small_ibot_sere")


def test_resolve_config_path_accepts_names_and_files(tmp_path):
    assert resolve_config_path("demo").name == "demo.yaml"
    assert resolve_config_path("demo.yaml").name == "demo.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("optim: {lr: 0.1}\n")
    assert resolve_config_path(str(own)) == own
    with pytest.raises(SereError):
        resolve_config_path(str(tmp_path / "other.yaml"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "missing", "foreign"])
def test_knn_with_a_bad_checkpoint(capsys, tmp_path, damage):
    path = tmp_path / "last.pt"
    if damage == "garbage":
        path.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    elif damage in ("truncated", "flipped"):
        save_checkpoint(path, {"step": 1, "config": {}, "teacher": {"w": torch.ones(64)}})
        data = bytearray(path.read_bytes())
        if damage == "truncated":
            data = data[:len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "foreign":
        torch.save({"step": 1}, path)
    code, err = run(capsys, ["knn", "--checkpoint", str(path), "--no-random"])
    assert_clean_error(code, err, str(path))


def test_pretrain_resume_from_a_bad_checkpoint(capsys, tmp_path):
    path = tmp_path / "checkpoint-5.pt"
    path.write_bytes(b"")
    code, err = run(capsys, ["pretrain", "--resume", str(path)])
    assert_clean_error(code, err, str(path))


def test_python_m_sere_cli_runs_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sere.cli", "knn", "--help"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "--checkpoint" in done.stdout
