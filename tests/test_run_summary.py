"""`sere pretrain` starts with what it is about to do."""

from __future__ import annotations

from PIL import Image

from sere.cli import main as sere_main

from conftest import TINY


def _folder(root, per_class: int = 6):
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(root / name / f"{i}.png")
    (root / "dog" / "broken.png").write_text("not an image")


def _run(tmp_path, capsys, *overrides: str) -> str:
    data = tmp_path / "images"
    _folder(data)
    keep = [t for t in TINY if not t.startswith(("data.dataset", "data.synthetic"))]
    code = sere_main(["pretrain", *keep, "data.dataset=folder", f"data.path={data}",
                      f"train.output_dir={tmp_path / 'run'}", "optim.batch_size=4",
                      "train.threads=1", *overrides])
    assert code == 0
    return capsys.readouterr().out


def test_summary_names_data_steps_device_and_threads(tmp_path, capsys):
    out = _run(tmp_path, capsys, "train.max_steps=2")
    assert "data: 13 images; 2 class folders (cat, dog), labels unused" in out
    # 13 images, batch 4: 3 steps per epoch, 2 epochs = 6 planned, cut to 2
    assert "steps: 3 per epoch, 2 in all" in out
    assert "train.max_steps=2 stops the run before the schedules' end (6 steps)" in out
    assert "device: cpu, 1 compute threads, 0 data workers" in out


def test_max_steps_above_the_plan_says_so(tmp_path, capsys):
    out = _run(tmp_path, capsys, "train.max_steps=50", "optim.epochs=1")
    assert "steps: 3 per epoch, 3 in all" in out
    assert "train.max_steps=50 is above the planned 3 steps" in out
    assert "finished at step 3" in out
